"""Forward + backward time of CIRKDv2's channel terms against the original algorithm, side by side in one
process, and the memory CIRKDv2's queues take.

    .venv/bin/python bench/bench_cirkdv2.py [--batches 1,2,4,8] [--repeats 5] [--threads 1] [--smoke]

At Cityscapes shapes per process (winycg/CIRKD's scripts: 512 x 1024 crops, a stride-8 teacher): student and
teacher features of 512 channels at 64 x 128 (DeepLabV3-R18 after the GCN, DeepLabV3-R101), pooled 4 x 4 to
16 x 32, so dim = 512; the default memory of 10000 rows, 2048 contrast rows, 256 rows enqueued per forward.

- all channel terms: StudentSegChannelContrast (pooling, head, the three terms with the scripts' weights 1,
  0.1 and 100, the enqueue, backward into the student's feature and the head) against the original algorithm
  restated in tests/reference/cirkdv2.py (its loop over the N^2 image pairs, float32 accumulator), each with
  its own memory and an identical head;
- the mini-batch channel term alone (on the pooled, projected, normalised rows) against the original's pair
  loop.

The candidates run interleaved (every round in a new random order); the table shows the medians over the
rounds and the ratio to the original. `--smoke`: tiny shapes, for the tests.
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.table import interleaved_medians, markdown_table  # noqa: E402
from losses.cirkd import average_pool_4x4, cross_image_relation_kl  # noqa: E402
from losses.cirkd_channel import StudentSegChannelContrast, pooled_positions  # noqa: E402
from tests.reference.cirkdv2 import PlainChannelContrast  # noqa: E402

# (what the weights are, the scripts' lambda_minibatch_channel, lambda_memory_channel, lambda_channel_kd)
WEIGHTS = (1.0, 0.1, 100.0)
# The queues of CIRKDv2's defaults: pixel / region memories per class and the channel memory.
PIXEL_MEMORY, REGION_MEMORY, CHANNEL_MEMORY = 20000, 2000, 10000
# (setting, dim): the channel memory's width follows from the crop and the teacher's stride
CHANNEL_WIDTHS = (('512 x 1024 crop, stride 8 (Cityscapes)', 512),
                  ('512 x 512 crop, stride 8 (ADE20K, VOC, COCO)', 256),
                  ('1024 x 1024 crop, stride 4 (SegFormer, Cityscapes)', 4096))
# (data set, classes, teacher, its feature channels = the width of the pixel / region memories): CIRKDv2's
# teachers (DeepLabV3-R101's head feature; SegFormer-MiT-B4's fused decoder feature, Cityscapes only)
PIXEL_REGION_SETTINGS = (('Cityscapes', 19, 'DeepLabV3-R101', 512), ('Cityscapes', 19, 'SegFormer-MiT-B4', 768),
                         ('Pascal VOC', 21, 'DeepLabV3-R101', 512), ('ADE20K', 150, 'DeepLabV3-R101', 512),
                         ('COCO-Stuff-164K', 182, 'DeepLabV3-R101', 512))

FULL = dict(channels=512, height=64, width=128, memory=CHANNEL_MEMORY, contrast=2048, update=256)
SMOKE = dict(channels=8, height=8, width=12, memory=40, contrast=16, update=8)


def make_inputs(batch, channels, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, channels, height, width, generator=generator).relu_().requires_grad_()
    teacher = torch.randn(batch, channels, height, width, generator=generator).relu_()
    return student, teacher


def weighted(terms):
    return sum(weight * term for weight, term in zip(WEIGHTS, terms, strict=True))


def time_backward(candidate):
    """Seconds of one forward + backward of `candidate` = (loss builder, tensors whose gradients it clears)."""
    make_loss, tensors = candidate
    for tensor in tensors:
        tensor.grad = None
    start = time.perf_counter()
    make_loss().backward()
    return time.perf_counter() - start


def bench_batch(batch, shapes, repeats, inner):
    """{candidate: median seconds} of the two comparisons at one batch size."""
    student, teacher = make_inputs(batch, shapes['channels'], shapes['height'], shapes['width'])
    dim = pooled_positions(shapes['height'], shapes['width'])
    torch.manual_seed(0)
    module = StudentSegChannelContrast(shapes['channels'], shapes['channels'], dim,
                                       channel_memory_size=shapes['memory'], channel_contrast_size=shapes['contrast'],
                                       update_size=shapes['update'])
    module.generator = torch.Generator().manual_seed(0)
    plain = PlainChannelContrast(module, copy.deepcopy(module.project_head), torch.Generator().manual_seed(0))

    # the mini-batch term alone, on rows as the module forms them
    with torch.no_grad():
        projected = module.project_head(average_pool_4x4(student))
        rows = F.normalize(projected.reshape(batch, -1, dim), p=2, dim=-1).requires_grad_()
        t_rows = F.normalize(average_pool_4x4(teacher).reshape(batch, -1, dim), p=2, dim=-1)

    def pair_loop():
        total = torch.tensor(0.)
        for i in range(batch):
            for j in range(batch):
                log_p_s = F.log_softmax(rows[i] @ rows[j].t() / 0.1, dim=1)
                p_t = F.softmax(t_rows[i] @ t_rows[j].t() / 0.1, dim=1)
                total = total + F.kl_div(log_p_s, p_t, reduction='batchmean')
        return total / (batch * batch)

    head, plain_head = list(module.parameters()), list(plain.head.parameters())
    candidates = {
        'all terms: StudentSegChannelContrast': (lambda: weighted(module(student, teacher)), [student, *head]),
        'all terms: original (pair loop)': (lambda: weighted(plain(student, teacher)), [student, *plain_head]),
        'mini-batch c2c: blocked': (lambda: cross_image_relation_kl(rows.flatten(0, 1), t_rows.flatten(0, 1), batch,
                                                                    0.1), [rows]),
        'mini-batch c2c: original (pair loop)': (pair_loop, [rows]),
    }
    return interleaved_medians(candidates, time_backward, repeats, inner=inner)


def speed_rows(results):
    rows = []
    for batch, medians in results.items():
        all_ours = medians['all terms: StudentSegChannelContrast']
        all_original = medians['all terms: original (pair loop)']
        pair_ours, pair_original = medians['mini-batch c2c: blocked'], medians['mini-batch c2c: original (pair loop)']
        rows.append([batch, f'{all_ours * 1e3:.2f}', f'{all_original * 1e3:.2f}', f'{all_ours / all_original:.2f}',
                     f'{pair_ours * 1e3:.2f}', f'{pair_original * 1e3:.2f}', f'{pair_ours / pair_original:.2f}'])
    return rows


def memory_tables():
    """The lines of the two memory tables (MB = 1e6 bytes, float32)."""
    channel = markdown_table(['setting', 'dim', 'channel memory (MB)'],
                             [[setting, dim, f'{CHANNEL_MEMORY * dim * 4 / 1e6:.1f}']
                              for setting, dim in CHANNEL_WIDTHS], numeric=(1, 2))
    rows = []
    for name, classes, teacher, channels in PIXEL_REGION_SETTINGS:
        pixel = classes * PIXEL_MEMORY * channels * 4 / 1e6
        region = classes * REGION_MEMORY * channels * 4 / 1e6
        rows.append([name, classes, teacher, channels, f'{pixel:,.0f}', f'{region:,.0f}', f'{pixel + region:,.0f}'])
    pixel_region = markdown_table(['data set', 'classes', 'teacher', 'Ct', 'pixel memory (MB)', 'region memory (MB)',
                                   'total (MB)'], rows, numeric=(1, 3, 4, 5, 6))
    return channel, pixel_region


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', default='1,2,4,8', help='images per process, comma-separated')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (1: on a shared machine, more threads mostly time the scheduler)')
    parser.add_argument('--inner', type=int, default=2, help='each round\'s time: the best of this many runs')
    parser.add_argument('--smoke', action='store_true', help='tiny shapes (for the tests)')
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(',') if b.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = SMOKE if args.smoke else FULL
    dim = pooled_positions(shapes['height'], shapes['width'])
    results = {batch: bench_batch(batch, shapes, args.repeats, args.inner) for batch in args.batches}
    print(f'\nchannel terms, forward + backward (ms): {shapes["channels"]} channels, {shapes["height"]} x '
          f'{shapes["width"]} features, dim {dim}, memory {shapes["memory"]} x {dim}, {shapes["contrast"]} contrast '
          f'rows; {args.threads} thread(s), median of {args.repeats} interleaved rounds (best of {args.inner})\n')
    header = ['batch', 'all terms', 'original', 'x original', 'mini-batch c2c', 'original loop', 'x original loop']
    print('\n'.join(markdown_table(header, speed_rows(results), numeric=range(7))))
    channel, pixel_region = memory_tables()
    print(f'\nchannel memory per process ({CHANNEL_MEMORY} rows x dim x 4 bytes)\n')
    print('\n'.join(channel))
    print(f'\npixel / region memories per process (classes x ({PIXEL_MEMORY} + {REGION_MEMORY}) x Ct x 4 bytes)\n')
    print('\n'.join(pixel_region))


if __name__ == '__main__':
    main()
