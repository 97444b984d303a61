"""Intra-class feature variation distillation (IFVD): pixel-wise KD, the IFV term on the features and an
adversarial discriminator, as the original zju-SWJ/HWD train_ifvd.py.

Y. Wang, W. Zhou, T. Jiang, X. Bai, Y. Xu, "Intra-class Feature Variation Distillation for Semantic
Segmentation", ECCV 2020, https://arxiv.org/abs/2010.07157.

    python -m torch.distributed.launch --nproc_per_node=4 train_ifvd.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux) + --lambda-kd x KD ("KD Loss") + --lambda-ifv x IFV(features, labels) ("IFV
Loss") + --lambda-adv x AdvG ("Adv_G Loss"); the discriminator's step: --lambda-d x hinge ("Adv_D Loss").
Crops of at least 512 x 512 (the discriminator needs 64 x 64 logits).
"""
import sys

from losses import CriterionIFV
from utils.adversarial import AdversarialDistillation, add_adversarial_args, check_adversarial_args
from utils.errors import run_main
from utils.options import build_parser, validate_args
from utils.train_loop import run_training

METHOD = 'ifvd'
YEAR = 2020
MIN_CROP = 512  # the discriminator's 64 x 64 logits at output stride 8


class IFVDDistillation(AdversarialDistillation):
    def __init__(self, args, nets):
        super().__init__(args, nets)
        self.lambda_ifv = args.lambda_ifv
        self.ifv = CriterionIFV(classes=nets.num_class)

    def feature_terms(self, s_outputs, t_outputs, labels):
        if not self.lambda_ifv:
            return {}
        return {'IFV Loss': self.lambda_ifv * self.ifv(s_outputs.features, t_outputs.features, labels)}


def parse_args(argv=None):
    parser = build_parser('Intra-class feature variation distillation for semantic segmentation',
                          distillation=True)
    add_adversarial_args(parser.add_argument_group('IFVD'), '--lambda-ifv', 20.0, 'weight of the IFV term')
    args = validate_args(parser, parser.parse_args(argv))
    return check_adversarial_args(parser, args)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: IFVDDistillation(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
