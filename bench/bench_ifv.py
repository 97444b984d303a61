"""Forward + backward time of the IFV loss against the original algorithm (a Python loop over the classes).

    .venv/bin/python bench/bench_ifv.py [--repeats 7] [--threads 2]

Shapes of a training step with the default student and teacher (resnet18 / resnet101 DeepLabV3): batch 4,
64 x 64 features with 128 student and 256 teacher channels, 512 x 512 labels, for ADE20K (150 classes) and
Cityscapes (19). The two candidates run interleaved (round robin, in a new random order every round);
the table shows the median over the rounds and the ratio to the original algorithm.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.table import interleaved_medians, print_ratio_table  # noqa: E402
from losses.ifv import CriterionIFV  # noqa: E402
from tests.reference.skd_ifvd import original_ifv  # noqa: E402


def time_once(loss_fn, student, teacher, labels):
    student.grad = None
    start = time.perf_counter()
    loss_fn(student, teacher, labels).backward()
    return time.perf_counter() - start


def bench_shape(num_class, repeats, batch=4, size=64, student_channels=128, teacher_channels=256, label_size=512,
                seed=0):
    generator = torch.Generator().manual_seed(seed)
    # post-ReLU features, as the networks give
    student = torch.randn(batch, student_channels, size, size, generator=generator).relu_().requires_grad_()
    teacher = torch.randn(batch, teacher_channels, size, size, generator=generator).relu_()
    labels = torch.randint(-1, num_class, (batch, label_size, label_size), generator=generator)
    ifv = CriterionIFV(num_class)
    candidates = {
        'CriterionIFV': ifv,
        'original IFV algorithm': lambda s, t, y: original_ifv(s, t, y, num_class),
    }
    return interleaved_medians(candidates, lambda loss_fn: time_once(loss_fn, student, teacher, labels), repeats,
                               seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [('ADE20K', 150), ('Cityscapes', 19)]
    results = {label: bench_shape(num_class, args.repeats) for label, num_class in shapes}
    print(f'\nIFV forward + backward, batch 4, 64x64 features (128 student / 256 teacher channels), 512x512 '
          f'labels, {args.threads} thread(s), median over {args.repeats} interleaved rounds\n')
    print_ratio_table(results, shapes, 'original IFV algorithm', 'x original', digits=(1, 3))


if __name__ == '__main__':
    main()
