"""Structured knowledge distillation (SKD): pixel-wise KD, pair-wise distillation of the features and an
adversarial discriminator, as the original zju-SWJ/HWD train_skd.py.

Y. Liu, K. Chen, C. Liu, Z. Qin, Z. Luo, J. Wang, "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019, https://arxiv.org/abs/1903.04197.

    python -m torch.distributed.launch --nproc_per_node=4 train_skd.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux) + --lambda-kd x KD ("KD Loss") + --lambda-pa x PairWise(features) ("PairWise
Loss") + --lambda-adv x AdvG ("Adv_G Loss"); the discriminator's step: --lambda-d x hinge ("Adv_D Loss").
Crops of at least 512 x 512 (the discriminator needs 64 x 64 logits).
"""
import sys

from losses import CriterionPairWise
from utils.adversarial import AdversarialDistillation, add_adversarial_args, check_adversarial_args
from utils.errors import run_main
from utils.options import build_parser, validate_args
from utils.train_loop import run_training

METHOD = 'skd'
YEAR = 2019
MIN_CROP = 512  # the discriminator's 64 x 64 logits at output stride 8


class SKDDistillation(AdversarialDistillation):
    def __init__(self, args, nets):
        super().__init__(args, nets)
        self.lambda_pa = args.lambda_pa
        self.pairwise = CriterionPairWise()

    def feature_terms(self, s_outputs, t_outputs, labels):
        if not self.lambda_pa:
            return {}
        return {'PairWise Loss': self.lambda_pa * self.pairwise(s_outputs.features, t_outputs.features)}


def parse_args(argv=None):
    parser = build_parser('Structured knowledge distillation for semantic segmentation', distillation=True)
    add_adversarial_args(parser.add_argument_group('SKD'), '--lambda-pa', 10.0, 'weight of the pair-wise term')
    args = validate_args(parser, parser.parse_args(argv))
    return check_adversarial_args(parser, args)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: SKDDistillation(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
