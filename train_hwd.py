"""Holistic Weighted Distillation: train a student segmentation network from a frozen teacher.

    python -m torch.distributed.launch --nproc_per_node=4 train_hwd.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth \
        --activation --L MSE --process E --parameter 0.1 --shift 1.0 --DivPixel None

Loss: task loss (+0.4 aux) + --lambda-hwd x CriterionHWD(student logits, teacher logits, labels).
Without --save-dir / --log-dir, every HWD setting gets its own folder, as in the original:
./hwd/Activation_MSE_E0.1_Shift1.0 for the command above.
"""
import os
import sys

from losses import CriterionHWD, LossSettingError
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, finite_float, non_negative_float, positive_float, validate_args
from utils.train_loop import run_training

METHOD = 'hwd'
YEAR = 2023
# The setting the paper recommends (README of the original).
RECOMMENDED_FLAGS = ['--activation', '--L', 'MSE', '--process', 'E', '--parameter', '0.1', '--shift', '1.0',
                     '--DivPixel', 'None']
SETTINGS_ROOT = './hwd'


class HWDDistillation(DistillationMethod):
    """{'HWD Loss': lambda x HWD between the student's and the teacher's logits}."""

    def __init__(self, criterion, weight):
        super().__init__()
        self.criterion = criterion
        self.weight = weight

    def forward(self, s_outputs, t_outputs, labels):
        return {'HWD Loss': self.weight * self.criterion(s_outputs.logits, t_outputs.logits, labels)}


def make_criterion(args):
    return CriterionHWD(norm=True, L=args.L, process=args.process, parameter=args.parameter,
                        DivPixel=args.DivPixel, shift=args.shift, activation=args.activation,
                        temperature=args.temperature)


def setting_folder(args):
    """The original's folder of one HWD setting, e.g. ./hwd/Activation_MSE_E0.1_Shift1.0_DivN. The
    flags the original lacks (--lambda-hwd, --temperature) and a shift with --process T (which the original
    left out, so two such settings shared a folder) are added when they are not the defaults."""
    name = ('Activation_' if args.activation else 'Logit_') + f'{args.L}_{args.process}{args.parameter}'
    if args.shift != 0.0:
        name += f'_Shift{args.shift}'
    if args.DivPixel != 'None':
        name += f'_Div{args.DivPixel}'
    if args.lambda_hwd != 3.0:
        name += f'_Lambda{args.lambda_hwd}'
    if args.temperature != 4.0:
        name += f'_Tau{args.temperature}'
    return os.path.join(SETTINGS_ROOT, name)


def parse_args(argv=None):
    parser = build_parser('Holistic Weighted Distillation for semantic segmentation', distillation=True)
    group = parser.add_argument_group('HWD')
    group.add_argument('--lambda-hwd', type=non_negative_float, default=3.0, help='weight of the HWD loss')
    group.add_argument('--temperature', type=positive_float, default=4.0, help='softmax temperature tau')
    group.add_argument('--L', type=str, default='MSE', choices=['MSE', 'L1', 'SMOOTHL1', 'KL'],
                       help='channel distance (KL needs --activation)')
    group.add_argument('--process', type=str, default='E', choices=['E', 'T'],
                       help='weight processing: E = (1 - beta^w) / (1 - beta), T = w / tau\'')
    group.add_argument('--activation', action='store_true', default=False,
                       help='measure the distance on the softmax maps instead of the raw logits')
    group.add_argument('--parameter', type=finite_float, default=0.1,
                       help='beta of --process E, tau\' of --process T')
    group.add_argument('--shift', type=finite_float, default=0.0, help='added to the normalised distances')
    group.add_argument('--DivPixel', type=str, default='None', choices=['None', 'N', 'SqrtN', 'N2'],
                       help='divide the distance by 1 + the class\'s pixel count (N), its root or its square')
    args = parser.parse_args(argv)
    try:
        make_criterion(args)  # the loss checks its own settings (e.g. --L KL without --activation)
    except LossSettingError as error:
        parser.error(str(error))
    return validate_args(parser, args, default_dir=setting_folder(args))


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: HWDDistillation(make_criterion(args), args.lambda_hwd))


if __name__ == '__main__':
    sys.exit(run_main(main))
