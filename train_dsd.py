"""Double similarity distillation (DSD): pixel-wise and category-wise similarities of the student's maps matched
to the teacher's, as winycg/CIRKD's train_kd.py with its DSD loss (scripts/train_kd/train_dsd.sh).

Y. Feng, X. Sun, W. Diao, J. Li, X. Gao, "Double Similarity Distillation for Semantic Image Segmentation",
IEEE Transactions on Image Processing 30, 2021, https://arxiv.org/abs/2107.08591.

    python -m torch.distributed.launch --nproc_per_node=8 train_dsd.py --gpu-id 0,1,2,3,4,5,6,7 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth \
        --batch-size 16 --lr 0.02 --max-iterations 40000 --crop-size 512,1024

Loss: task loss (+0.4 aux) + --lambda-psd x PSD ("PSD Loss") + --lambda-csd x CSD ("CSD Loss")
(+ --lambda-kd x KD on the logits, "KD Loss": 0 by default, as the original script). PSD compares the
attention-map residuals between the maps of a list: [aux logits, head feature, logits] when both networks have
an aux head, [head feature, logits] otherwise (as the original's SegFormer path). The original put the student's
logits twice in the list of a student without an aux head ([logits, feature, logits]), which gave the logits
exactly zero PSD gradient; here a list never holds one map twice. CSD compares the class-by-class similarities
of the spatially softmaxed logits (--csd-temperature).
"""
import sys

from losses import CriterionDoubleSimKD, CriterionKD
from utils.errors import run_main
from utils.method import DistillationMethod
from utils.options import build_parser, non_negative_float, positive_float, validate_args
from utils.train_loop import run_training

METHOD = 'dsd'
YEAR = 2021


def similarity_maps(outputs, with_aux):
    """The maps whose pair-wise similarities DSD compares, the logits last (CSD reads them)."""
    if with_aux:
        return [outputs.aux, outputs.features, outputs.logits]
    return [outputs.features, outputs.logits]


class DSDDistillation(DistillationMethod):
    """{'PSD Loss', 'CSD Loss'} (+ 'KD Loss'); nothing trained besides the student."""

    def __init__(self, args, nets):
        super().__init__()
        self.lambda_kd = args.lambda_kd
        self.lambda_psd = args.lambda_psd
        self.lambda_csd = args.lambda_csd
        self.kd = CriterionKD(temperature=args.kd_temperature)
        self.dsd = CriterionDoubleSimKD(temperature=args.csd_temperature)
        # the teacher's list has the student's structure: the aux map only when both networks have one
        self.with_aux = nets.student.has_aux and nets.teacher.has_aux

    def forward(self, s_outputs, t_outputs, labels):
        terms = {}
        if self.lambda_kd:
            terms['KD Loss'] = self.lambda_kd * self.kd(s_outputs.logits, t_outputs.logits)
        if self.lambda_psd or self.lambda_csd:
            psd, csd = self.dsd(similarity_maps(s_outputs, self.with_aux), similarity_maps(t_outputs, self.with_aux))
            if self.lambda_psd:
                terms['PSD Loss'] = self.lambda_psd * psd
            if self.lambda_csd:
                terms['CSD Loss'] = self.lambda_csd * csd
        return terms


def parse_args(argv=None):
    parser = build_parser('Double similarity distillation for semantic segmentation', distillation=True)
    group = parser.add_argument_group('DSD')
    group.add_argument('--lambda-psd', type=non_negative_float, default=1000.0,
                       help='weight of the pixel-wise similarity term')
    group.add_argument('--lambda-csd', type=non_negative_float, default=10.0,
                       help='weight of the category-wise similarity term')
    group.add_argument('--csd-temperature', type=positive_float, default=4.0,
                       help='temperature of the spatial softmax of the logits in the category-wise term')
    group.add_argument('--lambda-kd', type=non_negative_float, default=0.0,
                       help='weight of KD on the logits (0 in the original script)')
    group.add_argument('--kd-temperature', type=positive_float, default=1.0, help='softmax temperature of KD')
    return validate_args(parser, parser.parse_args(argv))


def build_method(args, nets):
    if not (args.lambda_kd or args.lambda_psd or args.lambda_csd):
        return None
    return DSDDistillation(args, nets)


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: build_method(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
