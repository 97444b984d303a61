"""Evaluate a segmentation checkpoint: pixAcc and mIoU (per-class table), optional saved predictions.

    python eval.py --dataset citys --model deeplabv3 --backbone resnet18 --method hwd \
        --pretrained hwd_deeplabv3_resnet18_citys_best_model.pth [--scales 0.75 1.0 1.25 --flip-eval]
    python -m torch.distributed.launch --nproc_per_node=4 eval.py ...   (or torchrun)

Each image is evaluated exactly once whatever the number of processes, and the confusion matrices
are summed, so the printed numbers do not depend on it. The results also go to
{save_dir}/{model}_{backbone}_{dataset}_{method}_val.json (see utils/results.py). With --save-pred,
colour PNGs go to {save_dir}/{model}_{backbone}_{dataset}_{method}/ (plus labelIds/ for Cityscapes, ready
for the official evaluation script, and panels/ with image | ground truth | prediction for the first
images). `--split test` predicts the test images (Cityscapes, VOC, ADE20K, and COCO-Stuff when settings.py
names its test images) into the same folders, without metrics, as the original's test.py; a labelled test
split (CamVid's) is evaluated like val, with metrics and a ..._test.json, as CIRKD's eval.py did for CamVid.
"""
import argparse
import logging
import os
import sys

import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset import DATASETS, build_dataset, check_ignore_label, dataset_info
from models.model_zoo import check_model_name, load_trained_model
from utils.distributed import (
    add_launcher_args,
    barrier,
    cleanup,
    cpu_fallback_warning,
    get_world_size,
    init_distributed,
)
from utils.errors import UserError, run_main
from utils.evaluation import ShardSampler, evaluate
from utils.flops import format_complexity
from utils.logger import setup_logging
from utils.metric import format_iou_table, format_summary
from utils.options import check_output_folder, non_negative_int, positive_float, positive_int
from utils.palette import cityscapes_trainid_to_labelid, colorize, colorize_rgb
from utils.results import file_sha256, metrics_record, write_json
from utils.visualize import denormalize_image, save_panel

logger = logging.getLogger(__name__)

# Panels image | ground truth | prediction are drawn for the images with these first data set indices.
NUM_PANELS = 4
COMPLEXITY_INPUT = (1, 3, 512, 512)


def build_parser():
    parser = argparse.ArgumentParser(
        description='Semantic segmentation evaluation (pixAcc, mIoU) with multi-scale and flip.')
    group = parser.add_argument_group('model and data')
    group.add_argument('--model', type=str, default='deeplabv3', help='model name')
    group.add_argument('--backbone', type=str, default='resnet18', help='backbone name')
    group.add_argument('--dataset', type=str, default='citys', choices=DATASETS, help='data set name')
    group.add_argument('--method', type=str, default='cirkd',
                       help='method name, used in the output folder and log file names')
    group.add_argument('--data', type=str, default=None, metavar='DIR',
                       help='data set root (default: the root in settings.py, e.g. DATA_CS; with --split test, '
                            'the folder of the test images for ade20k and coco, e.g. DATA_ADE20K_TEST)')
    group.add_argument('--split', type=str, default='val', choices=('val', 'test'),
                       help='val: metrics; test: predictions of the test images, with metrics where the test '
                            'split is labelled (camvid)')
    group.add_argument('--workers', '-j', type=non_negative_int, default=8, metavar='N', help='data loader workers')
    group.add_argument('--ignore-label', type=int, default=-1, help='label value not counted')
    group = parser.add_argument_group('checkpoint and output')
    group.add_argument('--pretrained', type=str, default='./ckpt/deeplabv3_resnet101_citys_best_model.pth',
                       help='segmentation checkpoint (state dict of the whole network)')
    group.add_argument('--save-dir', default='./outputs/', help='directory for the log and predictions')
    group.add_argument('--save-pred', action='store_true', default=False, help='save predictions')
    group = parser.add_argument_group('test-time augmentation')
    group.add_argument('--scales', default=[1.0], type=positive_float, nargs='+',
                       help='image scales whose predictions are averaged (e.g. 0.75 1.0 1.25)')
    group.add_argument('--flip-eval', action='store_true', default=False,
                       help='also average the prediction of the horizontally flipped image')
    group.add_argument('--tile-width', type=positive_int, default=None, metavar='W',
                       help='predict vertical strips W pixels wide one at a time and put their logits side by side '
                            "(CIRKDv2 evaluated its SegFormers on Cityscapes with 1024: two halves of each image)")
    add_launcher_args(parser)
    return parser


def run_name(args):
    return f'{args.model}_{args.backbone}_{args.dataset}_{args.method}'


class PredictionWriter:
    """Saves, per image: the colour PNG; Cityscapes labelIds; a panel for the first NUM_PANELS images."""

    def __init__(self, out_dir, dataset, sampler, num_panels=NUM_PANELS):
        self.out_dir = out_dir
        self.dataset = dataset
        self.sampler = sampler
        self.num_panels = num_panels
        self.label_id_dir = os.path.join(out_dir, 'labelIds') if dataset == 'citys' else None
        self.panel_dir = os.path.join(out_dir, 'panels')
        for folder in (out_dir, self.label_id_dir, self.panel_dir if num_panels else None):
            if folder:
                os.makedirs(folder, exist_ok=True)

    def __call__(self, position, image, label, pred, names):
        if isinstance(names, str):
            names = [names]
        for i in range(pred.shape[0]):
            name = os.path.basename(str(names[i]))
            colorize(pred[i], self.dataset).save(os.path.join(self.out_dir, name + '.png'))
            if self.label_id_dir:
                Image.fromarray(cityscapes_trainid_to_labelid(pred[i])).save(
                    os.path.join(self.label_id_dir, name + '.png'))
            if self.sampler.indices[position] < self.num_panels and i == 0:
                columns = [('image', denormalize_image(image[i]))]
                if label is not None:
                    columns.append(('ground truth', colorize_rgb(label[i], self.dataset)))
                columns.append(('prediction', colorize_rgb(pred[i], self.dataset)))
                save_panel(os.path.join(self.panel_dir, name + '.png'), columns)


def run(args):
    check_output_folder(args.save_dir, '--save-dir')
    ctx = init_distributed(args)
    check_model_name(args.model, args.backbone)  # before any data is read
    info = dataset_info(args.dataset, args.data)
    if args.split not in info.classes:
        raise UserError(f'--split {args.split}: data set {args.dataset} has no {args.split} split here')
    check_ignore_label(args.dataset, args.ignore_label, info.num_class)
    name = run_name(args)
    out_dir = os.path.join(args.save_dir, name)
    setup_logging(args.save_dir, ctx.rank, filename=f'{name}_{args.split}.txt', mode='a+')
    warning = cpu_fallback_warning(args, ctx.device)
    if warning:
        logger.warning(warning)
    logger.info('eval.py arguments: %s', ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))

    dataset = build_dataset(args.dataset, args.split, data_root=args.data, ignore_label=args.ignore_label)
    model = load_trained_model(args.model, args.backbone, info.num_class, args.pretrained).to(ctx.device)
    if ctx.is_main:
        logger.info(format_complexity(model, COMPLEXITY_INPUT))

    sampler = ShardSampler(dataset)
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=args.workers,
                        pin_memory=ctx.device.type == 'cuda')
    labelled = info.classes[args.split].labelled
    writer = None
    if args.save_pred or not labelled:
        writer = PredictionWriter(out_dir, args.dataset, sampler)
    logger.info('Start %s: %d images on %d process(es), scales %s, flip %s', 'validation' if labelled
                else 'test prediction', len(dataset), ctx.world_size,
                ' '.join(f'{s:g}' for s in args.scales), 'on' if args.flip_eval else 'off')
    with torch.no_grad():
        matrix = evaluate(model, loader, info.num_class, ctx.device, scales=args.scales, flip=args.flip_eval,
                          progress=ctx.is_main, on_prediction=writer, labelled=labelled, tile_width=args.tile_width)
    if labelled:
        pix_acc, miou, iou = matrix.compute()
        logger.info('Per-class IoU:\n%s', format_iou_table(iou, info.class_names))
        logger.info(format_summary(pix_acc, miou))
        if ctx.is_main:
            result = {'dataset': args.dataset, 'split': args.split, 'images': len(dataset),
                      'model': args.model, 'backbone': args.backbone, 'method': args.method,
                      'scales': list(args.scales), 'flip': args.flip_eval, 'tile_width': args.tile_width,
                      'checkpoint': os.path.basename(args.pretrained),
                      'checkpoint_path': os.path.abspath(args.pretrained),
                      'sha256': file_sha256(args.pretrained), 'processes': get_world_size(),
                      **metrics_record(pix_acc, miou, iou, info.class_names)}
            path = os.path.join(args.save_dir, f'{name}_{args.split}.json')
            write_json(path, result)
            logger.info('results written to %s', path)
    if writer is not None:
        logger.info('predictions saved in %s', out_dir)
    barrier()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    finally:
        cleanup()


if __name__ == '__main__':
    sys.exit(run_main(main))
