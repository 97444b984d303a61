"""eval.py end to end on the toy Cityscapes data: numbers against an independent computation, one
process against two, saved predictions (colours, labelIds, panels), the test split, and the errors."""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as eval_script
from dataset import CITYSCAPES_TRAINID_TO_LABELID, build_dataset
from dataset.class_names import CITYSCAPES_CLASSES
from dataset.toy import make_toy_dataset
from models.model_zoo import get_segmentation_model
from utils.errors import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ['--model', 'deeplabv3', '--backbone', 'resnet18', '--dataset', 'citys', '--method', 'hwd']
RUN = 'deeplabv3_resnet18_citys_hwd'
LOG_PREFIX = re.compile(r'^\S+ \S+ \S+ \w+: ', re.M)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """The same random network saved with its aux head (keys prefixed `module.`, as saved from DDP)
    and without it; returns (with_aux, without_aux, network without aux in eval mode)."""
    folder = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    net = get_segmentation_model('deeplabv3', 'resnet18', 19, aux=True)
    # Spread the BN statistics so the random network predicts many classes, not one.
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith('running_mean'):
                buffer.normal_(0, 0.5)
    state = net.state_dict()
    with_aux, without_aux = folder / 'with_aux.pth', folder / 'without_aux.pth'
    torch.save({'module.' + k: v for k, v in state.items()}, with_aux)
    plain = {k: v for k, v in state.items() if not k.startswith('auxlayer.')}
    torch.save(plain, without_aux)
    bare = get_segmentation_model('deeplabv3', 'resnet18', 19, aux=False)
    bare.load_state_dict(plain)
    return with_aux, without_aux, bare.eval()


@pytest.fixture(scope='module')
def val_root(toy_root):
    return toy_root('citys', num_train=4, num_val=3, size=(64, 128), seed=0)


def run_eval(args):
    """eval.py's main in this process; returns its exit status."""
    try:
        return run_main(eval_script.main, [str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


def log_lines(save_dir, split='val'):
    text = (save_dir / f'{RUN}_{split}.txt').read_text()
    return LOG_PREFIX.sub('', text).splitlines()


def result_block(lines):
    """The per-class table and the summary line, as printed."""
    start = lines.index('Per-class IoU:')
    end = next(i for i, line in enumerate(lines) if line.startswith('Overall validation'))
    return lines[start:end + 1]


def parse_result(lines):
    block = result_block(lines)
    summary = re.fullmatch(r'Overall validation pixAcc: (\d+\.\d{3}), mIoU: (\d+\.\d{3})', block[-1])
    assert summary, block[-1]
    iou = [row.split()[-1] for row in block[2:-1]]
    return float(summary.group(1)), float(summary.group(2)), iou


def independent_metrics(net, root, scales, flip):
    """pixAcc and mIoU (percent) and per-class IoU strings, computed directly with numpy; and the
    predictions by image name."""
    dataset = build_dataset('citys', 'val', data_root=root)
    hist = np.zeros((19, 19), np.int64)
    preds = {}
    with torch.no_grad():
        for image, label, name in dataset:
            image = torch.as_tensor(image)[None]
            h, w = image.shape[-2:]
            total = 0
            for s in scales:
                x = F.interpolate(image, scale_factor=s, mode='bilinear', align_corners=True)
                up = F.interpolate(net(x)[0], size=(h, w), mode='bilinear', align_corners=True)
                if flip:
                    flipped = net(torch.flip(x, dims=[3]))[0]
                    up = (up + torch.flip(F.interpolate(flipped, size=(h, w), mode='bilinear',
                                                        align_corners=True), dims=[3])) / 2
                total = total + up
            pred = (total / len(scales)).argmax(1)[0].numpy()
            preds[name] = pred
            label = np.asarray(label)
            keep = label >= 0
            np.add.at(hist, (label[keep], pred[keep]), 1)
    diag = np.diag(hist).astype(np.float64)
    union = hist.sum(0) + hist.sum(1) - diag
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = np.where(union > 0, diag / union, np.nan)
    shown = ['-' if np.isnan(v) else f'{v * 100:.3f}' for v in iou]
    return 100 * diag.sum() / hist.sum(), 100 * np.nanmean(iou), shown, preds


@pytest.mark.slow
def test_eval_one_scale_against_direct_computation_and_saved_files(val_root, checkpoints, tmp_path):
    with_aux, _, net = checkpoints
    save_dir = tmp_path / 'out'
    status = run_eval(MODEL + ['--data', val_root, '--pretrained', with_aux, '--save-dir', save_dir,
                               '--save-pred', '--workers', '0', '--no-cuda'])
    assert status == 0
    lines = log_lines(save_dir)
    assert any(re.fullmatch(r'Params: \d+\.\d\dM FLOPs: \d+\.\d\dG', line) for line in lines)
    pix_acc, miou, iou = parse_result(lines)
    ref_acc, ref_miou, ref_iou, preds = independent_metrics(net, val_root, (1.0,), False)
    assert pix_acc == pytest.approx(ref_acc, abs=6e-4) and miou == pytest.approx(ref_miou, abs=6e-4)
    assert iou == ref_iou
    assert '-' in iou  # some classes occur in neither labels nor predictions: left out of the mean
    # the JSON beside the text log: what a paper table needs, the same numbers as printed
    record = json.loads((save_dir / f'{RUN}_val.json').read_text())
    assert (record['dataset'], record['split'], record['images'], record['scales'], record['flip']) == (
        'citys', 'val', 3, [1.0], False)
    assert record['checkpoint'] == os.path.basename(with_aux)
    assert record['sha256'] == hashlib.sha256(open(with_aux, 'rb').read()).hexdigest()
    assert round(record['pixAcc'], 3) == pix_acc and round(record['mIoU'], 3) == miou
    assert list(record['IoU']) == list(CITYSCAPES_CLASSES)
    assert ['-' if v is None else f'{v:.3f}' for v in record['IoU'].values()] == iou
    # Not a trivial comparison: several classes predicted, some of them right somewhere.
    assert len(np.unique(np.concatenate([p.ravel() for p in preds.values()]))) >= 4
    assert len(set(iou) - {'-', '0.000'}) >= 2

    out = save_dir / RUN
    names = sorted(preds)
    assert sorted(p.stem for p in out.glob('*.png')) == names
    assert all(re.fullmatch(r'[a-z]+_\d{6}_\d{6}_leftImg8bit', n) for n in names)
    for name in names:
        colour = Image.open(out / f'{name}.png')
        assert colour.mode == 'P'
        assert np.array_equal(np.array(colour), preds[name])  # trainIds, official colours
        assert colour.getpalette()[:6] == [128, 64, 128, 244, 35, 232]
        label_ids = np.array(Image.open(out / 'labelIds' / f'{name}.png'))
        assert label_ids.dtype == np.uint8
        assert np.array_equal(label_ids, np.array(CITYSCAPES_TRAINID_TO_LABELID)[preds[name]])
    panels = sorted(p.stem for p in (out / 'panels').glob('*.png'))
    assert panels == names  # 3 images, all among the first few
    panel = Image.open(out / 'panels' / f'{names[0]}.png')
    assert panel.width > 3 * 128 and panel.height > 64


@pytest.mark.slow
def test_eval_scales_flip_two_processes_match_one_and_direct(val_root, checkpoints, tmp_path):
    _, without_aux, net = checkpoints
    args = MODEL + ['--data', val_root, '--pretrained', without_aux, '--workers', '0', '--no-cuda',
                    '--scales', '0.75', '1.25', '--flip-eval']
    one = tmp_path / 'one'
    assert run_eval(args + ['--save-dir', one]) == 0
    two = tmp_path / 'two'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node=2', os.path.join(REPO, 'eval.py')]
                          + [str(a) for a in args] + ['--save-dir', str(two)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Start validation: 3 images on 2 process(es)' in done.stdout
    assert result_block(log_lines(two)) == result_block(log_lines(one))
    # Rank 0 alone printed the table (once).
    assert done.stdout.count('Overall validation pixAcc') == 1

    pix_acc, miou, iou = parse_result(log_lines(one))
    ref_acc, ref_miou, ref_iou, _ = independent_metrics(net, val_root, (0.75, 1.25), True)
    assert pix_acc == pytest.approx(ref_acc, abs=6e-4) and miou == pytest.approx(ref_miou, abs=6e-4)
    assert iou == ref_iou


def test_test_split_writes_predictions_without_metrics(checkpoints, tmp_path):
    root = make_toy_dataset('citys', tmp_path / 'cs', num_train=0, num_val=0, num_test=2, size=(64, 128))
    save_dir = tmp_path / 'out'
    status = run_eval(MODEL + ['--data', root, '--pretrained', checkpoints[1], '--save-dir', save_dir,
                               '--split', 'test', '--workers', '0', '--no-cuda'])
    assert status == 0
    lines = log_lines(save_dir, 'test')
    assert not any(line.startswith('Overall validation') for line in lines)
    out = save_dir / RUN
    expected = sorted(p.stem for p in (root / 'leftImg8bit' / 'test').rglob('*.png'))
    assert len(expected) == 2
    assert sorted(p.stem for p in (out / 'labelIds').glob('*.png')) == expected
    assert sorted(p.stem for p in out.glob('*.png')) == expected


def test_ade20k_test_images_without_labels(tmp_path):
    """--split test on ADE20K: --data is the folder of the test images (settings.py DATA_ADE20K_TEST) or the data
    set's root, which holds them in release_test/testing/; the predictions are written, no metric."""
    root = tmp_path / 'ADEChallengeData2016'
    images = root / 'release_test' / 'testing'
    images.mkdir(parents=True)
    (root / 'images' / 'training').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ('ADE_test_00000001', 'ADE_test_00000002'):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / f'{name}.jpg')
    torch.manual_seed(0)
    checkpoint = tmp_path / 'psp_mobile_ade20k.pth'
    torch.save(get_segmentation_model('psp_mobile', 'mobile', 150, False).state_dict(), checkpoint)
    for data in (images, root):
        save_dir = tmp_path / f'out_{data.name}'
        status = run_eval(['--model', 'psp_mobile', '--backbone', 'mobile', '--dataset', 'ade20k', '--method', 'kd',
                           '--data', data, '--pretrained', checkpoint, '--save-dir', save_dir, '--split', 'test',
                           '--workers', '0', '--no-cuda'])
        assert status == 0, data
        out = save_dir / 'psp_mobile_mobile_ade20k_kd'
        assert sorted(p.stem for p in out.glob('*.png')) == ['ADE_test_00000001', 'ADE_test_00000002']
        prediction = Image.open(out / 'ADE_test_00000001.png')
        assert prediction.size == (56, 40)
        text = (save_dir / 'psp_mobile_mobile_ade20k_kd_test.txt').read_text()
        assert 'Overall validation' not in text


def test_error_checkpoint_of_another_network(val_root, tmp_path, capsys):
    other = tmp_path / 'psp.pth'
    torch.save(get_segmentation_model('psp', 'resnet18', 19, aux=False).state_dict(), other)
    status = run_eval(MODEL + ['--data', val_root, '--pretrained', other, '--save-dir', tmp_path,
                               '--workers', '0', '--no-cuda'])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith('error: ') and str(other) in err and 'Traceback' not in err


@pytest.mark.parametrize('scale', ['0', '-0.5', 'nan', 'abc'])
def test_error_scale_not_positive(scale, capsys):
    assert run_eval(['--scales', '1.0', scale]) == 2
    err = capsys.readouterr().err
    assert '--scales' in err and (f'{scale!r}' in err or scale in err)


def test_error_missing_data_and_bad_flags(checkpoints, tmp_path, capsys):
    common = MODEL + ['--pretrained', checkpoints[1], '--save-dir', tmp_path, '--workers', '0', '--no-cuda']
    assert run_eval(common + ['--data', tmp_path / 'nowhere']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'nowhere' in err and '--data' in err
    assert run_eval(common + ['--data', tmp_path, '--split', 'test', '--dataset', 'voc']) == 2
    err = capsys.readouterr().err  # no list file and nothing to scan: the message names both
    assert 'ImageSets/Segmentation/test.txt' in err and 'DATALIST_VOC_TEST' in err
    assert run_eval(common + ['--data', tmp_path, '--ignore-label', '3']) == 2
    assert '--ignore-label' in capsys.readouterr().err
