"""DIST (inter- and intra-class Pearson correlation of the logits): train a student segmentation network
from a frozen teacher, as the original zju-SWJ/HWD train_dist.py.

T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
https://arxiv.org/abs/2205.10536.

    python -m torch.distributed.launch --nproc_per_node=4 train_dist.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux) + --lambda-dist x (--dist-beta x inter + --dist-gamma x intra) on the raw logits
("DIST Loss"). The original fixed the three weights at 1 (the defaults here).
"""
import sys

from losses import CriterionDIST
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, validate_args
from utils.train_loop import run_training

METHOD = 'dist'
YEAR = 2022


class DISTDistillation(DistillationMethod):
    """{'DIST Loss': lambda x DIST between the student's and the teacher's logits}."""

    def __init__(self, beta, gamma, weight):
        super().__init__()
        self.criterion = CriterionDIST(beta=beta, gamma=gamma)
        self.weight = weight

    def forward(self, s_outputs, t_outputs, labels):
        return {'DIST Loss': self.weight * self.criterion(s_outputs.logits, t_outputs.logits)}


def parse_args(argv=None):
    parser = build_parser('DIST distillation for semantic segmentation', distillation=True)
    group = parser.add_argument_group('DIST')
    group.add_argument('--lambda-dist', type=non_negative_float, default=1.0, help='weight of the DIST term')
    group.add_argument('--dist-beta', type=non_negative_float, default=1.0,
                       help='weight of the inter-class relation (per pixel, across classes)')
    group.add_argument('--dist-gamma', type=non_negative_float, default=1.0,
                       help='weight of the intra-class relation (per class, across pixels)')
    return validate_args(parser, parser.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD,
                        lambda nets: DISTDistillation(args.dist_beta, args.dist_gamma, args.lambda_dist))


if __name__ == '__main__':
    sys.exit(run_main(main))
