"""Attention transfer (AT) on the features, with pixel-wise KD on the logits: train a student segmentation network
from a frozen teacher, as winycg/CIRKD's train_kd.py with its AT loss (scripts/train_kd/train_at.sh).

S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017, https://arxiv.org/abs/1612.03928.

    python -m torch.distributed.launch --nproc_per_node=8 train_at.py --gpu-id 0,1,2,3,4,5,6,7 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth \
        --batch-size 16 --lr 0.02 --max-iterations 40000 --crop-size 512,1024

Loss: task loss (+0.4 aux) + --lambda-kd x KD on the logits ("KD Loss") + --lambda-at x AT between the head
features ("AT Loss"): each feature's spatial attention map (the channel mean of its squares, L2-normalised per
image) and the mean squared difference of the two maps. The channel mean makes the term independent of the
channel counts: nothing is trained besides the student.
"""
import sys

from losses import CriterionAT, CriterionKD
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, positive_float, validate_args
from utils.train_loop import run_training

METHOD = 'at'
YEAR = 2017


class ATDistillation(DistillationMethod):
    """{'KD Loss', 'AT Loss'}: KD on the logits, attention transfer on the head features."""

    def __init__(self, args):
        super().__init__()
        self.lambda_kd = args.lambda_kd
        self.lambda_at = args.lambda_at
        self.kd = CriterionKD(temperature=args.kd_temperature)
        self.at = CriterionAT()

    def forward(self, s_outputs, t_outputs, labels):
        terms = {}
        if self.lambda_kd:
            terms['KD Loss'] = self.lambda_kd * self.kd(s_outputs.logits, t_outputs.logits)
        if self.lambda_at:
            terms['AT Loss'] = self.lambda_at * self.at(s_outputs.features, t_outputs.features)
        return terms


def parse_args(argv=None):
    parser = build_parser('Attention transfer for semantic segmentation', distillation=True)
    group = parser.add_argument_group('AT')
    group.add_argument('--lambda-kd', type=non_negative_float, default=1.0, help='weight of KD on the logits')
    group.add_argument('--kd-temperature', type=positive_float, default=1.0, help='softmax temperature of KD')
    group.add_argument('--lambda-at', type=non_negative_float, default=10000.0,
                       help='weight of attention transfer on the features')
    return validate_args(parser, parser.parse_args(argv))


def build_method(args, nets):
    if not (args.lambda_kd or args.lambda_at):
        return None
    return ATDistillation(args)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: build_method(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
