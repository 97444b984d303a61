"""Augmentation-free dense contrastive distillation (Af-DCD): masked feature mimicking and an omni-contrastive
term on the backbone's last stage, with pixel-wise KD on the logits, as OSVAI/Af-DCD's train_ocmgd.py.

J. Fan, C. Li, X. Liu, M. Song, A. Yao, "Augmentation-free Dense Contrastive Knowledge Distillation for Efficient
Semantic Segmentation", NeurIPS 2023, https://arxiv.org/abs/2312.04168.

    python -m torch.distributed.launch --nproc_per_node=8 train_afdcd.py --gpu-id 0,1,2,3,4,5,6,7 \
        --dataset citys --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth \
        --batch-size 16 --lr 0.02 --max-iterations 40000 --crop-size 512,1024 \
        --lambda-fd 2e-6 --lambda-ctr 0.005

Loss: task loss (+0.4 aux) + --lambda-kd x KD on the logits ("KD Loss") + --lambda-fd x the masked feature
mimicking ("FD Loss": a random --mask-ratio of the student's last-stage pixels is dropped, a projector trained
with the student rebuilds the teacher's last stage from the rest; a sum over the elements divided by the batch,
hence the small weight) + --lambda-ctr x the omni-contrastive term ("CTR Loss": within 4 x 4 patches of the 4 x 4
max-pooled maps, each student sample of a channel group is contrasted with the teacher's sample of the same pixel
and group against the teacher's samples of the other groups). The loss module's gradient is clipped to L2 norm 15
before each step, as the original. The masks are drawn from a generator seeded from --seed, the iteration and the
image's place in the global batch. The teacher's last stage needs a channel count divisible by the 16 groups and
a pooled size of at least one 4 x 4 patch: with a stride-8 backbone a crop of at least 128 pixels a side.
"""
import argparse
import sys

from losses import CriterionKD, OmniContrastiveFeatureLoss
from models.model_zoo import describe_network, output_sizes
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, positive_float, probability, validate_args
from utils.train_loop import run_training

METHOD = 'afdcd'
YEAR = 2023
MIN_CROP = 128  # one 4 x 4 patch of the 4 x 4-pooled last stage at stride 8
MIN_CROP_MAP = 'last_stage'
CHANNEL_GROUPS = 16  # the original's M_ocd
POOL = 4  # the original's pool_size
PATCH = (4, 4)  # the original's patch_size
MAX_GRAD_NORM = 15.0  # the original clips the loss module's gradient to this L2 norm


class AfDCDDistillation(DistillationMethod):
    """{'KD Loss', 'FD Loss', 'CTR Loss'}; the alignment and the projector are trained with the student, their
    gradient clipped."""

    uses_stages = True

    def __init__(self, args, nets):
        super().__init__()
        self.lambda_kd = args.lambda_kd
        self.lambda_fd = args.lambda_fd
        self.lambda_ctr = args.lambda_ctr
        self.kd = CriterionKD(temperature=args.kd_temperature)
        self.criterion = None
        if self.lambda_fd or self.lambda_ctr:
            self.criterion = OmniContrastiveFeatureLoss(
                nets.student.stage_channels[-1], nets.teacher.stage_channels[-1], M_ocd=CHANNEL_GROUPS,
                pool_size=POOL, patch_size=PATCH, rand_mask=args.rand_mask, mask_ratio=args.mask_ratio,
                enhance_projector=args.enhance_projector, dataset=args.dataset)
            self.criterion.generator = self.add_generator('afdcd_mask')
            self.clip_gradients(self.criterion, MAX_GRAD_NORM)

    def forward(self, s_outputs, t_outputs, labels):
        terms = {}
        if self.lambda_kd:
            terms['KD Loss'] = self.lambda_kd * self.kd(s_outputs.logits, t_outputs.logits)
        if self.criterion is not None:
            fd, ctr = self.criterion(s_outputs.stages[-1], t_outputs.stages[-1])
            if self.lambda_fd:
                terms['FD Loss'] = self.lambda_fd * fd
            if self.lambda_ctr:
                terms['CTR Loss'] = self.lambda_ctr * ctr
        return terms


def check_teacher_stage(parser, args):
    """The omni-contrastive term's needs, checked before anything is built: channel groups and whole patches."""
    spec = describe_network(args.teacher_model, args.teacher_backbone, 1)
    channels = spec.stage_channels[-1]
    if channels % CHANNEL_GROUPS:
        parser.error(f'the {args.teacher_model} {args.teacher_backbone} teacher\'s last stage has {channels} channels, '
                     f'not divisible into the {CHANNEL_GROUPS} groups of the contrastive term; choose another teacher')
    height, width = output_sizes(args.teacher_model, args.teacher_backbone, tuple(args.crop_size))['stages'][-1]
    pool = 1 if args.dataset == 'camvid' else POOL  # the original does not pool CamVid's maps
    if height // pool < PATCH[0] or width // pool < PATCH[1]:
        smallest = pool * max(PATCH) * spec.stage_strides[-1]
        parser.error(f'--crop-size {args.crop_size[0]},{args.crop_size[1]}: the teacher\'s last stage is then '
                     f'{height} x {width}, too small for one {PATCH[0]} x {PATCH[1]} patch after the {pool} x {pool} '
                     f'pooling of the contrastive term; use a crop of at least {smallest} on each side')


def parse_args(argv=None):
    parser = build_parser('Augmentation-free dense contrastive distillation for semantic segmentation',
                          distillation=True)
    group = parser.add_argument_group('Af-DCD')
    group.add_argument('--lambda-kd', type=non_negative_float, default=1.0, help='weight of KD on the logits')
    group.add_argument('--kd-temperature', type=positive_float, default=1.0, help='softmax temperature of KD')
    group.add_argument('--lambda-fd', type=non_negative_float, default=4e-5,
                       help='weight of the masked feature mimicking (a sum over the elements; the Cityscapes '
                            'scripts use 2e-6)')
    group.add_argument('--lambda-ctr', type=non_negative_float, default=0.001,
                       help='weight of the omni-contrastive term (the Cityscapes scripts use 0.005)')
    group.add_argument('--mask-ratio', type=probability, default=0.75,
                       help="share of the student's last-stage pixels masked before the projector, in [0, 1]")
    group.add_argument('--rand-mask', action=argparse.BooleanOptionalAction, default=True,
                       help='random masks (--no-rand-mask: the fixed central block of the original)')
    group.add_argument('--enhance-projector', action='store_true',
                       help='the two-branch projector of four 3 x 3 convolutions instead of two')
    args = validate_args(parser, parser.parse_args(argv))
    if args.lambda_fd or args.lambda_ctr:
        check_teacher_stage(parser, args)
    return args


def build_method(args, nets):
    if not (args.lambda_kd or args.lambda_fd or args.lambda_ctr):
        return None
    return AfDCDDistillation(args, nets)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: build_method(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
