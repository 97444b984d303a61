"""CIRKDv2: CIRKD's pixel relations plus channel relations, after a graph-convolution context block on the
student's feature, as winycg/CIRKD's train_cirkdv2.py (scripts/train_cirkdv2/*).

C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge Distillation for Semantic
Segmentation", CVPR 2022, https://arxiv.org/abs/2204.06986, and its extension CIRKDv2, "Cross-Image Relational
Knowledge Distillation with Contextual Modeling for Efficient Semantic Segmentation",
https://github.com/winycg/CIRKD.

    python -m torch.distributed.launch --nproc_per_node=8 train_cirkdv2.py --gpu-id 0,1,2,3,4,5,6,7 \
        --dataset citys --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth \
        --batch-size 8 --lr 0.01 --max-iterations 80000 --crop-size 512,1024 --lambda-fitnet 1

Loss: task loss (+0.4 aux) + --lambda-kd x KD ("KD Loss"); with --lambda-fitnet > 0 the student's feature first
goes through a GCN context block (trained with the student) and every later term sees its output: --lambda-fitnet
x FitNet ("FitNet Loss"); CIRKD's mini-batch pixel pairs and memory pixel-to-pixel / pixel-to-region terms
("Mini-batch p2p Loss", "Memory p2p Loss", "Memory p2r Loss"); the channel terms on 4 x 4-pooled features: channel
relations across the images of the mini-batch ("Batch c2c Loss", --lambda-minibatch-channel), against a memory
of teacher channel vectors ("Memory c2c Loss", --lambda-memory-channel) and the channels' mean squared
difference ("Channel MSE Loss", --lambda-channel-kd). The channel memory holds --channel-memory-size rows of the
pooled area (ceil(h / 4) x ceil(w / 4) of the teacher's feature: 512 for 512 x 1024 crops at stride 8), 256 rows
enqueued per iteration: 20 MB with the Cityscapes defaults, on every GPU; the pixel memories as CIRKD.
"""
import argparse
import sys

from losses import GCN, CriterionFitNet, StudentSegChannelContrast
from losses.cirkd_channel import pooled_positions
from models.model_zoo import output_sizes
from utils.cirkd_memory import PixelRelationTerms, add_memory_args, check_memory_args
from utils.errors import run_main
from utils.options import build_parser, non_negative_float, positive_int, validate_args
from utils.train_loop import run_training

METHOD = 'cirkdv2'
YEAR = 2025
# Memories small enough for a short run on a few tiny images.
QUICK_FLAGS = ['--pixel-memory-size', '64', '--region-memory-size', '8', '--pixel-contrast-size', '190',
               '--region-contrast-size', '38', '--channel-memory-size', '512', '--channel-contrast-size', '64']
CHANNEL_UPDATE_SIZE = 256  # teacher channel vectors enqueued per iteration (the original's)
MINIBATCH_POOL_FROM = 256  # the mini-batch pixel term pools maps this large 4 x 4 first (the original's rule)


def channel_dim(args):
    """The pooled area of the teacher's feature the channel memory's rows have."""
    return pooled_positions(*output_sizes(args.teacher_model, args.teacher_backbone, tuple(args.crop_size))['features'])


def uses_gcn(args):
    """--gcn / --no-gcn, or CIRKDv2's choice: the GCN unless the student is SegFormer (its own script has none)."""
    if args.gcn is not None:
        return args.gcn
    return args.student_model != 'segformer'


class CIRKDv2Distillation(PixelRelationTerms):
    """The terms of CIRKDv2: CIRKD's (utils/cirkd_memory.py) after the GCN, FitNet and the channel terms; the GCN,
    the FitNet convolution and the projection heads are trained with the student; the pixel and channel memories
    and their generators are the method's state."""

    def __init__(self, args, nets):
        # CIRKDv2 pools maps of 256 or more a side (SegFormer's at 1024 x 1024 crops) 4 x 4 before the mini-batch
        # pixel term
        super().__init__(args, nets, 'cirkdv2_memory', minibatch_pool_from=MINIBATCH_POOL_FROM)
        self.lambda_fitnet = args.lambda_fitnet
        self.lambda_minibatch_channel = args.lambda_minibatch_channel
        self.lambda_memory_channel = args.lambda_memory_channel
        self.lambda_channel_kd = args.lambda_channel_kd
        s_channels, t_channels = nets.student.feature_channels, nets.teacher.feature_channels
        self.gcn = self.fitnet = None
        if self.lambda_fitnet:
            if uses_gcn(args):
                self.gcn = GCN(s_channels, norm_layer=nets.norm_layer)
            self.fitnet = CriterionFitNet(s_channels, t_channels)
        self.channel = None
        if self.lambda_minibatch_channel or self.lambda_memory_channel or self.lambda_channel_kd:
            self.channel = StudentSegChannelContrast(
                s_channels, t_channels, channel_dim(args), channel_memory_size=args.channel_memory_size,
                channel_contrast_size=args.channel_contrast_size,
                contrast_kd_temperature=args.contrast_kd_temperature, contrast_temperature=args.contrast_temperature,
                update_size=CHANNEL_UPDATE_SIZE, norm_layer=nets.norm_layer)
            # the same draws on every process, so that the channel memory stays equal
            self.channel.generator = self.add_generator('cirkdv2_channel', shared=True)

    def forward(self, s_outputs, t_outputs, labels):
        s_feat, t_feat = s_outputs.features, t_outputs.features.detach()
        terms = self.kd_term(s_outputs.logits, t_outputs.logits)
        if self.fitnet is not None:
            if self.gcn is not None:
                s_feat = self.gcn(s_feat)  # every later term sees the GCN's output
            terms['FitNet Loss'] = self.lambda_fitnet * self.fitnet(s_feat, t_feat)
        terms.update(self.pixel_terms(s_feat, t_feat, labels))
        if self.channel is not None:
            batch, memory, mse = self.channel(s_feat, t_feat)
            if self.lambda_minibatch_channel:
                terms['Batch c2c Loss'] = self.lambda_minibatch_channel * batch
            if self.lambda_memory_channel:
                terms['Memory c2c Loss'] = self.lambda_memory_channel * memory
            if self.lambda_channel_kd:
                terms['Channel MSE Loss'] = self.lambda_channel_kd * mse
        return terms


def parse_args(argv=None):
    parser = build_parser('CIRKDv2: cross-image pixel and channel relational distillation for semantic '
                          'segmentation', distillation=True)
    group = parser.add_argument_group('CIRKDv2')
    add_memory_args(group)
    group.add_argument('--lambda-fitnet', type=non_negative_float, default=1.0,
                       help='weight of FitNet after the GCN (0: neither; the scripts use 1 or 10)')
    group.add_argument('--gcn', action=argparse.BooleanOptionalAction, default=None,
                       help='the GCN context block before the feature terms (default: on, off for a SegFormer '
                            'student, as the original scripts)')
    group.add_argument('--lambda-minibatch-channel', type=non_negative_float, default=1.0,
                       help='weight of the mini-batch channel-relation term')
    group.add_argument('--lambda-memory-channel', type=non_negative_float, default=0.1,
                       help='weight of the memory channel-relation term')
    group.add_argument('--lambda-channel-kd', type=non_negative_float, default=100.0,
                       help='weight of the channel MSE term')
    group.add_argument('--channel-memory-size', type=positive_int, default=10000,
                       help=f'teacher channel vectors kept in the memory (at least {CHANNEL_UPDATE_SIZE}, the '
                            'vectors enqueued per iteration)')
    group.add_argument('--channel-contrast-size', type=positive_int, default=2048,
                       help='channel vectors drawn from the memory per iteration')
    args = check_memory_args(parser, validate_args(parser, parser.parse_args(argv)))
    if args.channel_memory_size < CHANNEL_UPDATE_SIZE:
        parser.error(f'--channel-memory-size {args.channel_memory_size}: at least {CHANNEL_UPDATE_SIZE} (the '
                     'teacher channel vectors enqueued per iteration)')
    if args.channel_contrast_size > args.channel_memory_size:
        parser.error(f'--channel-contrast-size {args.channel_contrast_size} draws more channel vectors than '
                     f'--channel-memory-size {args.channel_memory_size} holds; lower it')
    if args.gcn and not args.lambda_fitnet:
        parser.error('--gcn: the GCN runs before FitNet only; give --lambda-fitnet a weight')
    return args


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: CIRKDv2Distillation(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
