"""Forward + backward time of the CIRKD terms against the original algorithms, side by side in one process.

    .venv/bin/python bench/bench_cirkd.py [--repeats 15] [--threads 2]

At Cityscapes shapes per process: N = 2 images, 64 x 64 features (128 student, 256 teacher channels),
512 x 512 labels (about 5% ignored), 19 classes, the default memories (20000 pixel / 2000 region slots per
class, 4096 // 19 + 1 = 216 and 1024 // 19 + 1 = 54 negatives per class).

- memory term: StudentSegContrast (enqueue, both losses, backward into the head) against the original
  algorithm restated in tests/reference/cirkd.py (loops over images and classes for the enqueue, over
  classes for the negatives, log_softmax / softmax / kl_div), each with its own queues and an identical
  head;
- mini-batch term: CriterionMiniBatchCrossImagePair against the original's loop over the N^2 image pairs.

The candidates of a term run interleaved (every round in a new random order), the table shows the medians
over the rounds and the ratio to the original. Also prints the memory the default queues take per process.
"""
import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losses.cirkd import CriterionMiniBatchCrossImagePair, StudentSegContrast  # noqa: E402
from tests.reference.cirkd import PlainMemoryContrast, original_minibatch_pair_loss  # noqa: E402

DATASETS = (('Cityscapes', 19), ('Pascal VOC', 21), ('ADE20K', 150), ('COCO-Stuff', 182))


def make_inputs(batch=2, size=64, label_size=512, num_class=19, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, 128, size, size, generator=generator).relu_().requires_grad_()
    teacher = torch.randn(batch, 256, size, size, generator=generator).relu_()
    # class regions of 8 x 8 label pixels, about 5% ignored
    coarse = torch.randint(0, num_class, (batch, label_size // 8, label_size // 8), generator=generator)
    coarse[torch.rand(coarse.shape, generator=generator) < 0.05] = -1
    labels = F.interpolate(coarse.unsqueeze(1).float(), (label_size, label_size), mode='nearest').squeeze(1).long()
    return student, teacher, labels


def time_once(fn, student, params):
    student.grad = None
    for p in params:
        p.grad = None
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


def run_interleaved(candidates, student, params, repeats, seed=0):
    times = {name: [] for name in candidates}
    order = list(candidates)
    rng = random.Random(seed)
    for name in order:  # warm-up
        time_once(candidates[name], student, params[name])
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            times[name].append(time_once(candidates[name], student, params[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_memory(repeats, num_class=19):
    student, teacher, labels = make_inputs(num_class=num_class)
    torch.manual_seed(0)
    module = StudentSegContrast(num_class, pixel_contrast_size=4096 // num_class + 1,
                                region_contrast_size=1024 // num_class + 1, generator=torch.Generator().manual_seed(0))
    module.train()
    plain = PlainMemoryContrast(module, copy.deepcopy(module.project_head), generator=torch.Generator().manual_seed(0))

    def ours():
        pixel, region = module(student, teacher, labels)
        return 0.1 * pixel + 0.1 * region

    def original():
        pixel, region = plain(student, teacher, labels)
        return 0.1 * pixel + 0.1 * region

    candidates = {'StudentSegContrast': ours, 'original algorithm (loops)': original}
    params = {'StudentSegContrast': list(module.parameters()),
              'original algorithm (loops)': list(plain.head.parameters())}
    return run_interleaved(candidates, student, params, repeats)


def bench_minibatch(repeats):
    student, teacher, _ = make_inputs()
    criterion = CriterionMiniBatchCrossImagePair(0.1)
    candidates = {'CriterionMiniBatchCrossImagePair': lambda: criterion(student, teacher),
                  'original algorithm (pair loop)': lambda: original_minibatch_pair_loss(student, teacher, 0.1)}
    return run_interleaved(candidates, student, {name: [] for name in candidates}, repeats)


def print_table(title, results, original):
    print(f'\n{title}\n')
    print('| candidate | median (ms) | x original |')
    print('|---|---:|---:|')
    for name, median in results.items():
        print(f'| {name} | {median * 1e3:.1f} | {median / results[original]:.2f} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = (f'N=2, 64x64 features (128 / 256 channels), 512x512 labels, {args.threads} thread(s), '
              f'median of {args.repeats} interleaved rounds')
    print_table(f'memory term (enqueue + pixel + region, forward + backward), 19 classes; {shapes}',
                bench_memory(args.repeats), 'original algorithm (loops)')
    print_table(f'mini-batch term (forward + backward); {shapes}', bench_minibatch(args.repeats),
                'original algorithm (pair loop)')
    print('\nqueue memory per process (float32, 256 channels, 20000 pixel / 2000 region slots per class)\n')
    print('| data set | classes | pixel queue (MB) | region queue (MB) |')
    print('|---|---:|---:|---:|')
    for name, classes in DATASETS:
        pixel = classes * 20000 * 256 * 4 / 1e6
        region = classes * 2000 * 256 * 4 / 1e6
        print(f'| {name} | {classes} | {pixel:.0f} | {region:.0f} |')


if __name__ == '__main__':
    main()
