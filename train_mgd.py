"""Masked generative distillation (MGD) of the features: train a student segmentation network from a frozen
teacher, as the original zju-SWJ/HWD train_mgd.py.

Z. Yang, Z. Li, M. Shao, D. Shi, Z. Yuan, C. Yuan, "Masked Generative Distillation", ECCV 2022,
https://arxiv.org/abs/2205.01529.

    python -m torch.distributed.launch --nproc_per_node=4 train_mgd.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux) + --alpha-mgd x MGD(student features, teacher features) ("MGD Loss"): a random
--lambda-mgd of the student's feature pixels is masked and a small generator, trained with the student,
rebuilds the teacher's features from the rest. Its channel counts come from the networks. The masks are
drawn from a generator seeded from --seed, the iteration and the micro-batch's place in the global batch.
"""
import sys

from losses import CriterionMGD
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, probability, validate_args
from utils.train_loop import run_training

METHOD = 'mgd'
YEAR = 2022


class MGDDistillation(DistillationMethod):
    """{'MGD Loss': alpha x MGD between the student's and the teacher's features}; the generator is
    trained with the student."""

    def __init__(self, student_channels, teacher_channels, lambda_mgd, alpha):
        super().__init__()
        self.criterion = CriterionMGD(student_channels, teacher_channels, lambda_mgd,
                                      generator=self.add_generator('mgd'))
        self.alpha = alpha

    def forward(self, s_outputs, t_outputs, labels):
        return {'MGD Loss': self.alpha * self.criterion(s_outputs.features, t_outputs.features)}


def parse_args(argv=None):
    parser = build_parser('Masked generative distillation for semantic segmentation', distillation=True)
    group = parser.add_argument_group('MGD')
    group.add_argument('--alpha-mgd', type=non_negative_float, default=2e-5, help='weight of the MGD term')
    group.add_argument('--lambda-mgd', type=probability, default=0.75,
                       help='probability of masking a feature pixel, in [0, 1]')
    return validate_args(parser, parser.parse_args(argv))


def build_method(args, nets):
    if args.alpha_mgd == 0:
        return None  # nothing to distil: no generator to train
    return MGDDistillation(nets.student.feature_channels, nets.teacher.feature_channels,
                           args.lambda_mgd, args.alpha_mgd)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: build_method(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
