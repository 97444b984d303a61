"""Every network of the model zoo: parameters (against CIRKDv2's counts), multiply-adds, output stride and
feature channels, built on the meta device (no weights, nothing computed: the whole zoo in about half a minute
on two cores).

    .venv/bin/python bench/bench_zoo.py [--models psp_mobile,segformer:MiT_B0] [--size 512x512,1024x2048] [--jobs 2]

One row per (model, backbone) of `models.model_zoo.MODEL_BACKBONES` and head width (DeepLabV3 and PSPNet on a
ResNet exist in two widths: HWD's / CIRKD v1's and CIRKDv2's), 19 classes (Cityscapes), the aux head on for the
ResNets (as the scripts train them and as CIRKD counts them). FLOPs are multiply-adds of one image
(`utils.flops.count_flops`; the convention and how it compares with the published figures is in its docstring).
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.table import markdown_table  # noqa: E402
from models.model_zoo import MODEL_BACKBONES, build_segmentation_model, has_aux_head, head_widths  # noqa: E402
from utils.flops import count_flops, count_params  # noqa: E402

NUM_CLASS = 19  # Cityscapes

# Parameter counts of winycg/CIRKD's networks (https://github.com/winycg/CIRKD, commit dab64db), 19 classes,
# the aux head on for the ResNets: (model, backbone, head width) -> parameters.
CIRKDV2_PARAMS = {
    ('segformer', 'MiT_B0', None): 3_719_283,
    ('segformer', 'MiT_B1', None): 13_682_387,
    ('segformer', 'MiT_B2', None): 27_362_003,
    ('segformer', 'MiT_B3', None): 47_237_843,
    ('segformer', 'MiT_B4', None): 64_008_403,
    ('segformer', 'MiT_B5', None): 84_608_723,
    ('deeplabv3_mobilenet_ssseg', 'mobilenetv3_small', 128): 3_298_739,
    ('deeplabv3_mobilenet_ssseg', 'mobilenetv3_large', 128): 6_769_091,
    ('deeplabv3_mobilenet_ssseg', 'mobilenetv2_ssseg', 128): 3_233_171,
    ('psp_mobile', 'mobilenetv3_small', 128): 2_589_747,
    ('psp_mobile', 'mobilenetv3_large', 128): 6_110_019,
    ('psp_mobile', 'mobilevit_xx_small', 128): 1_794_051,
    ('psp_mobile', 'mobilevit_x_small', 128): 2_968_515,
    ('psp_mobile', 'mobilevit_small', 128): 6_825_779,
    ('psp_mobile', 'mobilenetv2', 128): 2_654_739,
    ('deeplab_mobile', 'mobilevit_xx_small', 128): 2_372_483,
    ('deeplab_mobile', 'mobilevit_x_small', 128): 3_591_875,
    ('deeplab_mobile', 'mobilevit_small', 128): 7_546_931,
    ('deeplab_mobile', 'mobilenetv2', 128): 3_233_171,
    ('deeplabv3', 'resnet18', 512): 22_762_918,
    ('deeplabv3', 'resnet101', 512): 79_084_262,
    ('upernet_lite', 'resnet18', 128): 16_569_638,
    ('upernet', 'resnet18', 512): 41_085_350,
    ('upernet_lite', 'resnet101', 128): 55_171_686,
    ('upernet', 'resnet101', 512): 85_511_910,
}
DEFAULT_SIZES = ((512, 512), (1024, 2048))


def _sizes(text):
    sizes = []
    for item in text.split(','):
        height, _, width = item.strip().partition('x')
        if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
            raise argparse.ArgumentTypeError(f'{text!r}: expected HxW[,HxW...] with positive integers, '
                                             'e.g. 512x512,1024x2048')
        sizes.append((int(height), int(width)))
    return tuple(sizes)


def _selection(text):
    """'model' or 'model:backbone', comma-separated -> [(model, backbone or None)], checked against the zoo."""
    selected = []
    for item in (part.strip() for part in text.split(',') if part.strip()):
        model, _, backbone = item.partition(':')
        if model not in MODEL_BACKBONES:
            raise argparse.ArgumentTypeError(f'{item!r}: unknown network; choose from {", ".join(MODEL_BACKBONES)}')
        if backbone and backbone not in MODEL_BACKBONES[model]:
            raise argparse.ArgumentTypeError(f'{item!r}: {model} has the backbones '
                                             f'{", ".join(MODEL_BACKBONES[model])}')
        selected.append((model, backbone or None))
    if not selected:
        raise argparse.ArgumentTypeError('--models: name at least one network')
    return selected


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', type=_selection, default=None, metavar='MODEL[:BACKBONE],...',
                        help='networks to list (default: the whole zoo)')
    parser.add_argument('--size', type=_sizes, default=DEFAULT_SIZES, metavar='HxW,...',
                        help='input sizes of the FLOPs columns (default: 512x512,1024x2048)')
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1,
                        help='processes counting in parallel (default: the CPU count; 1: in this process)')
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error('--jobs must be at least 1')
    return args


def configurations(selection=None):
    """[(model, backbone, head width)] of the zoo (or of the selected networks), both widths where there are two."""
    chosen = []
    for model, backbones in MODEL_BACKBONES.items():
        for backbone in backbones:
            if selection is None or any(model == m and b in (None, backbone) for m, b in selection):
                chosen += [(model, backbone, width) for width in head_widths(model, backbone)]
    return chosen


def measure(model, backbone, width, sizes):
    """{'params', 'macs' (one per size), 'output_stride', 'feature_channels'} of a network built on the meta
    device."""
    with torch.device('meta'):
        net = build_segmentation_model(model, backbone, NUM_CLASS, has_aux_head(model, backbone), head_width=width)
    return {'params': count_params(net), 'macs': [count_flops(net, (1, 3) + size) for size in sizes],
            'output_stride': net.output_stride, 'feature_channels': net.feature_channels}


def match_cell(ours, reference):
    """'=' when the counts agree, else the signed difference (ours - reference); empty without a reference."""
    if reference is None:
        return ''
    return '=' if ours == reference else f'{ours - reference:+,}'


def _measure_all(chosen, sizes, jobs):
    """measure() of every configuration, in order; counting on the meta device is Python-bound (one op at a
    time through the meta kernels), so separate processes share the work."""
    if jobs == 1:
        return [measure(*config, sizes) for config in chosen]
    context = multiprocessing.get_context('spawn')  # a fresh interpreter: no forked torch state
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        # the slow networks (deep ResNets, MiT) are spread over the workers by handing out one at a time
        return list(pool.map(measure, *zip(*chosen, strict=True), [sizes] * len(chosen)))


def table(sizes, selection=None, jobs=1):
    header = ['network', 'backbone', 'head width', 'params', 'CIRKDv2 params', 'match']
    header += [f'GMACs {h}x{w}' for h, w in sizes] + ['output stride', 'feature channels']
    rows = []
    chosen = configurations(selection)
    for (model, backbone, width), found in zip(chosen, _measure_all(chosen, sizes, jobs), strict=True):
        reference = CIRKDV2_PARAMS.get((model, backbone, width))
        rows.append([model, backbone, width if width is not None else '', f'{found["params"]:,}',
                     f'{reference:,}' if reference is not None else '', match_cell(found['params'], reference)]
                    + [f'{macs / 1e9:.2f}' for macs in found['macs']]
                    + [f'/{found["output_stride"]}', found['feature_channels']])
    numeric = set(range(2, len(header)))
    return markdown_table(header, rows, numeric=numeric)


def main(argv=None):
    args = parse_args(argv)
    print(f'The model zoo: {NUM_CLASS} classes, aux head on for the ResNets; parameters against CIRKDv2 '
          '(winycg/CIRKD); FLOPs as multiply-adds of one image, counted on the meta device.')
    print()
    print('\n'.join(table(args.size, args.models, args.jobs)))


if __name__ == '__main__':
    main()
