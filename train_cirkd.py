"""Cross-image relational knowledge distillation (CIRKD): pixel-wise KD, pixel-pair relations across the
images of the mini-batch, and pixel-to-pixel / pixel-to-region relations against class memories of teacher
embeddings, as the original zju-SWJ/HWD train_cirkd.py.

C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge Distillation for
Semantic Segmentation", CVPR 2022, https://arxiv.org/abs/2204.06986.

    python -m torch.distributed.launch --nproc_per_node=4 train_cirkd.py --gpu-id 0,1,2,3 --dataset citys \
        --teacher-model deeplabv3 --teacher-backbone resnet101 \
        --teacher-pretrained ckpt/deeplabv3_resnet101_citys_best_model.pth \
        --student-model deeplabv3 --student-backbone resnet18 \
        --student-pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux) + --lambda-kd x KD ("KD Loss") + --lambda-minibatch-pixel x mini-batch pixel
pairs ("Mini-batch p2p Loss") + --lambda-memory-pixel x memory pixel-to-pixel ("Memory p2p Loss") +
--lambda-memory-region x memory pixel-to-region ("Memory p2r Loss"). The memory sizes are per class; the
contrast sizes are totals, divided among the classes as the original does (flag // classes + 1). Every
process holds the same memories (the teacher embeddings of the whole global batch are enqueued, with draws
from a generator seeded alike on every process); they take memory on every GPU:
classes x (pixel + region memory size) x teacher feature channels x 4 bytes (0.43 GB for Cityscapes with
the defaults, 3.4 GB for ADE20K).
"""
import sys

from utils.cirkd_memory import PixelRelationTerms, add_memory_args, check_memory_args
from utils.errors import run_main
from utils.options import build_parser, validate_args
from utils.train_loop import run_training

METHOD = 'cirkd'
YEAR = 2022
# Memories small enough for a short run on a few tiny images (19 classes x 64 pixels, 8 regions).
QUICK_FLAGS = ['--pixel-memory-size', '64', '--region-memory-size', '8', '--pixel-contrast-size', '190',
               '--region-contrast-size', '38']


class CIRKDDistillation(PixelRelationTerms):
    """KD, the mini-batch relation term and the two memory terms (utils/cirkd_memory.py)."""

    def __init__(self, args, nets):
        super().__init__(args, nets, 'cirkd_memory')

    def forward(self, s_outputs, t_outputs, labels):
        return {**self.kd_term(s_outputs.logits, t_outputs.logits),
                **self.pixel_terms(s_outputs.features, t_outputs.features, labels)}


def parse_args(argv=None):
    parser = build_parser('Cross-image relational knowledge distillation for semantic segmentation',
                          distillation=True)
    add_memory_args(parser.add_argument_group('CIRKD'))
    return check_memory_args(parser, validate_args(parser, parser.parse_args(argv)))


def main(argv=None):
    args = parse_args(argv)
    return run_training(args, METHOD, lambda nets: CIRKDDistillation(args, nets))


if __name__ == '__main__':
    sys.exit(run_main(main))
