"""FitNet hints on the features, with pixel-wise KD on the logits: train a student segmentation network from a
frozen teacher, as winycg/CIRKD's train_kd.py with its FitNet loss (scripts/train_kd/train_fitnet.sh).

A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin Deep Nets",
ICLR 2015, https://arxiv.org/abs/1412.6550.

    python -m torch.distributed.launch --nproc_per_node=8 train_fitnet.py --gpu-id 0,1,2,3,4,5,6,7 \
        --dataset citys --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth \
        --batch-size 16 --lr 0.02 --max-iterations 40000 --crop-size 512,1024

Loss: task loss (+0.4 aux) + --lambda-kd x KD on the logits ("KD Loss") + --lambda-fitnet x FitNet ("FitNet
Loss"): the mean squared error between the student's head feature, mapped to the teacher's channels by a 1 x 1
convolution trained with the student, and the teacher's.
"""
import sys

from losses import CriterionFitNet, CriterionKD
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, positive_float, validate_args
from utils.train_loop import run_training

METHOD = 'fitnet'
YEAR = 2015


class FitNetDistillation(DistillationMethod):
    """{'KD Loss', 'FitNet Loss'}; the 1 x 1 convolution of the hint is trained with the student."""

    def __init__(self, args, nets):
        super().__init__()
        self.lambda_kd = args.lambda_kd
        self.lambda_fitnet = args.lambda_fitnet
        self.kd = CriterionKD(temperature=args.kd_temperature)
        self.fitnet = None
        if self.lambda_fitnet:
            self.fitnet = CriterionFitNet(nets.student.feature_channels, nets.teacher.feature_channels)

    def forward(self, s_outputs, t_outputs, labels):
        terms = {}
        if self.lambda_kd:
            terms['KD Loss'] = self.lambda_kd * self.kd(s_outputs.logits, t_outputs.logits)
        if self.fitnet is not None:
            terms['FitNet Loss'] = self.lambda_fitnet * self.fitnet(s_outputs.features, t_outputs.features)
        return terms


def parse_args(argv=None):
    parser = build_parser('FitNet hints for semantic segmentation', distillation=True)
    group = parser.add_argument_group('FitNet')
    group.add_argument('--lambda-kd', type=non_negative_float, default=1.0, help='weight of KD on the logits')
    group.add_argument('--kd-temperature', type=positive_float, default=1.0, help='softmax temperature of KD')
    group.add_argument('--lambda-fitnet', type=non_negative_float, default=10.0,
                       help='weight of the FitNet hint on the features')
    return validate_args(parser, parser.parse_args(argv))


def build_method(args, nets):
    if not (args.lambda_kd or args.lambda_fitnet):
        return None
    return FitNetDistillation(args, nets)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: build_method(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
