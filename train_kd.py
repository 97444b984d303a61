"""Pixel-wise knowledge distillation (KD) on the logits: train a student segmentation network from a frozen
teacher. Not a script of the original; the KD term is the one its SKD, IFVD and CIRKD scripts use.

    python -m torch.distributed.launch --nproc_per_node=4 train_kd.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux) + --lambda-kd x KD(student logits, teacher logits, --kd-temperature) ("KD Loss").
"""
import sys

from losses import CriterionKD
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, positive_float, validate_args
from utils.train_loop import run_training

METHOD = 'kd'
YEAR = 2015  # Hinton et al.


class KDDistillation(DistillationMethod):
    """{'KD Loss': lambda x KD between the student's and the teacher's logits}."""

    def __init__(self, temperature, weight):
        super().__init__()
        self.criterion = CriterionKD(temperature=temperature)
        self.weight = weight

    def forward(self, s_outputs, t_outputs, labels):
        return {'KD Loss': self.weight * self.criterion(s_outputs.logits, t_outputs.logits)}


def parse_args(argv=None):
    parser = build_parser('Pixel-wise knowledge distillation for semantic segmentation', distillation=True)
    group = parser.add_argument_group('KD')
    group.add_argument('--lambda-kd', type=non_negative_float, default=1.0, help='weight of the KD term')
    group.add_argument('--kd-temperature', type=positive_float, default=1.0, help='softmax temperature of KD')
    return validate_args(parser, parser.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: KDDistillation(args.kd_temperature, args.lambda_kd))


if __name__ == '__main__':
    sys.exit(run_main(main))
