"""Forward + backward time of the distillation losses, side by side in one process.

    .venv/bin/python bench/bench_losses.py [--repeats 40] [--threads 2]

Compares CriterionHWD (recommended flags, with DivPixel None and N), CriterionCWD, and a plain
re-statement of the original HWD algorithm (per-image, per-class counting loop; log of a softmax) at
Cityscapes and ADE20K shapes: batch 4, 64 x 64 logits, 512 x 512 labels. The candidates run interleaved
(round robin, every round in a new random order, each candidate run --inner times back to back and the
best kept) so that load from other processes hits them alike; the table shows the medians over the
rounds and the ratio to CWD.

On this CPU much of the time of these losses goes to page faults on freshly allocated N x C x H*W
tensors, and whether a block faults depends on glibc's adaptive thresholds, i.e. on what ran before:
left alone, the C=150 figures jump by 1.5x between candidates that allocate alike. So the allocator is
pinned (through mallopt) in two settings and both are reported: `mmap`, every big tensor is mapped
fresh and faults (the pessimistic case), and `heap`, freed memory is kept (the arithmetic alone).
"""
import argparse
import ctypes
import ctypes.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.table import interleaved_medians, print_ratio_table  # noqa: E402
from losses import CriterionCWD, CriterionHWD  # noqa: E402
from tests.reference.hwd import original_hwd_loss  # noqa: E402

RECOMMENDED = dict(activation=True, L='MSE', process='E', parameter=0.1, shift=1.0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def pin_allocator(mode):
    """Fix glibc's thresholds (setting them disables their adaptation); False when not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    if mode == 'mmap':
        return bool(mallopt(M_MMAP_THRESHOLD, 1 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 20))
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def make_candidates():
    cwd = CriterionCWD(4.0)
    hwd_none = CriterionHWD(DivPixel='None', **RECOMMENDED)
    hwd_n = CriterionHWD(DivPixel='N', **RECOMMENDED)
    return {
        'CWD': lambda s, t, y: cwd(s, t),
        'HWD (DivPixel None)': hwd_none,
        'HWD (DivPixel N)': hwd_n,
        'original HWD algorithm (None)': lambda s, t, y: original_hwd_loss(s, t, y, DivPixel='None', **RECOMMENDED),
        'original HWD algorithm (N)': lambda s, t, y: original_hwd_loss(s, t, y, DivPixel='N', **RECOMMENDED),
    }


def time_once(loss_fn, student, teacher, labels):
    student.grad = None
    start = time.perf_counter()
    loss_fn(student, teacher, labels).backward()
    return time.perf_counter() - start


def bench_shape(num_class, repeats, inner, batch=4, logit_size=64, label_size=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, num_class, logit_size, logit_size, generator=generator).requires_grad_()
    teacher = torch.randn(batch, num_class, logit_size, logit_size, generator=generator)
    labels = torch.randint(-1, num_class, (batch, label_size, label_size), generator=generator)
    candidates = make_candidates()
    # best of `inner` back-to-back runs: drops the runs another process pre-empted and the page faults the
    # previous candidate's memory pattern left behind
    return interleaved_medians(candidates, lambda loss_fn: time_once(loss_fn, student, teacher, labels), repeats,
                               seed, inner)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=40)
    parser.add_argument('--inner', type=int, default=3, help='back-to-back runs per round (best taken)')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--allocator', nargs='+', choices=['mmap', 'heap'], default=['mmap', 'heap'],
                        help='glibc settings to measure under (see the module docstring)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [('Cityscapes', 19), ('ADE20K', 150)]
    for mode in args.allocator:
        pinned = pin_allocator(mode)
        results = {label: bench_shape(num_class, args.repeats, args.inner) for label, num_class in shapes}
        print(f'\nallocator: {mode if pinned else "default (mallopt unavailable)"}; forward + backward, batch 4, '
              f'64x64 logits, 512x512 labels, {args.threads} thread(s), median over {args.repeats} rounds of '
              f'the best of {args.inner} runs\n')
        print_ratio_table(results, shapes, 'CWD', 'x CWD')


if __name__ == '__main__':
    main()
