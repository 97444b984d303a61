"""Channel-wise distillation (CWD): train a student segmentation network from a frozen teacher.

    python -m torch.distributed.launch --nproc_per_node=4 train_cwd.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux) + --lambda-logit x CWD(logits) ("Logit Loss") [+ --lambda-feat x CWD(adapter(student
features), teacher features) ("Feat Loss"), the adapter trained with the student; built only when
--lambda-feat > 0].
"""
import sys

from losses import CriterionCWD, FeatureAdapter
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, positive_float, validate_args
from utils.train_loop import run_training

METHOD = 'cwd'
YEAR = 2021


class CWDDistillation(DistillationMethod):
    """{'Logit Loss': logit term [, 'Feat Loss': feature term]}; the adapter exists only when used."""

    def __init__(self, temperature, lambda_logit, lambda_feat, adapter=None):
        super().__init__()
        self.criterion = CriterionCWD(temperature=temperature)
        self.lambda_logit = lambda_logit
        self.lambda_feat = lambda_feat
        self.adapter = adapter

    def forward(self, s_outputs, t_outputs, labels):
        terms = {'Logit Loss': self.lambda_logit * self.criterion(s_outputs.logits, t_outputs.logits)}
        if self.adapter is not None:
            terms['Feat Loss'] = self.lambda_feat * self.criterion(self.adapter(s_outputs.features),
                                                                     t_outputs.features)
        return terms


def parse_args(argv=None):
    parser = build_parser('Channel-wise distillation for semantic segmentation', distillation=True)
    group = parser.add_argument_group('CWD')
    group.add_argument('--lambda-logit', type=non_negative_float, default=3.0, help='weight of CWD on the logits')
    group.add_argument('--lambda-feat', type=non_negative_float, default=0.0,
                       help='weight of CWD on the features (after a 1x1 conv + BN + ReLU adapter)')
    group.add_argument('--temperature', type=positive_float, default=4.0, help='softmax temperature tau')
    return validate_args(parser, parser.parse_args(argv))


def build_method(args, nets):
    adapter = None
    if args.lambda_feat > 0:
        adapter = FeatureAdapter(nets.student.feature_channels, nets.teacher.feature_channels,
                                 nets.norm_layer)
    return CWDDistillation(args.temperature, args.lambda_logit, args.lambda_feat, adapter)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: build_method(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
