"""Train a segmentation network without distillation (the baseline of the HWD paper).

    python -m torch.distributed.launch --nproc_per_node=4 train_baseline.py --gpu-id 0,1,2,3 --dataset citys \
        --model deeplabv3 --backbone resnet18 --pretrained-base pretrained/resnet18-imagenet.pth

Loss: task loss (+0.4 aux).
"""
import sys

from utils.errors import run_main
from utils.options import build_parser, validate_args
from utils.train_loop import run_training

METHOD = 'baseline'
YEAR = 0  # no method: the first row of comparisons


def parse_args(argv=None):
    parser = build_parser('Semantic segmentation training without distillation', distillation=False)
    return validate_args(parser, parser.parse_args(argv))


def main(argv=None):
    return run_training(parse_args(argv), METHOD)


if __name__ == '__main__':
    sys.exit(run_main(main))
