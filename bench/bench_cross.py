"""Seconds per iteration of distillation across network families against the same family, for every
distillation method, on this machine's CPU.

    .venv/bin/python bench/bench_cross.py [--methods kd,hwd] [--iters 10 --large-iters 3 --warmup 2]
        [--crop 64 --batch 4 --large-batch 2 --threads 2 --quick]

Two students, each distilled from two teachers with fresh weights (saved to temporary files and read by the
scripts as any teacher): a CNN, `psp_mobile` on MobileNetV3-Small (output stride 8), and a SegFormer, `segformer`
on MiT-B0 (stride 4); the teachers `deeplabv3_mobile` on MobileNetV2 (a CNN, stride 8) and `segformer` on MiT-B0
(stride 4). Across families the methods resize the student's logits to the teacher's and bring its features to
the teacher's channels and size (utils.method's contract); this measures what that costs per iteration.

Each run is the script's real step: the script's own parser and method factory, `utils.train_build.build_run`
and `Stepper.step(micro_batches, iteration, seed=False)` (bench/table.py), fed batches of a toy Cityscapes that
are read before the clock starts. The same-family and the cross-family run of a row take their timed iterations
in turn (the order alternating), so a slow phase of a shared machine hits both alike; each column is the median
over --iters iterations after --warmup. Both runs of a row use one crop: --crop, or where a method needs more
(SKD / IFVD / Af-DCD: MIN_CROP x the stride of the teacher's map it concerns / 8, for the larger of the two
teachers' needs) that crop with
--large-batch and --large-iters. The teachers' multiply-adds at that crop are printed too: the ratio holds the
difference of the teachers' cost as well as the cost of crossing the families.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.table import (  # noqa: E402
    build_script_step,
    extra_flags,
    markdown_table,
    method_list,
    network_list,
    plain_loader,
    save_fresh_network,
    script_argv,
    smallest_crop,
    write_toy_citys,
)
from models.model_zoo import build_segmentation_model, describe_network  # noqa: E402
from utils.flops import count_flops  # noqa: E402
from utils.scripts import training_scripts  # noqa: E402

NUM_CLASS = 19  # Cityscapes
STUDENTS = ('psp_mobile:mobilenetv3_small', 'segformer:MiT_B0')
TEACHERS = ('deeplabv3_mobile:mobile', 'segformer:MiT_B0')


def distillation_scripts():
    """{method: TrainingScript} of the scripts that distil (utils.scripts' order)."""
    return {name: script for name, script in training_scripts().items() if script.distillation}


def parse_args(argv=None):
    methods = tuple(distillation_scripts())
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', type=method_list(methods), default=list(methods),
                        help=f'comma-separated distillation methods (default: all: {",".join(methods)})')
    parser.add_argument('--students', type=network_list, default=','.join(STUDENTS),
                        help=f'students, MODEL[:BACKBONE],... (default: {",".join(STUDENTS)})')
    parser.add_argument('--teachers', type=network_list, default=','.join(TEACHERS),
                        help='one teacher per family, MODEL[:BACKBONE],... (default: '
                             f'{",".join(TEACHERS)})')
    parser.add_argument('--crop', type=int, default=64, help='square crop side (default 64)')
    parser.add_argument('--batch', type=int, default=4, help='batch size at --crop (at least 2: BatchNorm)')
    parser.add_argument('--large-batch', type=int, default=2,
                        help="batch size where a method's smallest crop is above --crop (SKD, IFVD)")
    parser.add_argument('--iters', type=int, default=10, help='timed iterations per run')
    parser.add_argument('--large-iters', type=int, default=3, help='timed iterations per run at the large crops')
    parser.add_argument('--warmup', type=int, default=2, help='untimed first iterations per run')
    parser.add_argument('--threads', type=int, default=2, help='torch threads')
    parser.add_argument('--quick', action='store_true',
                        help="add the scripts' QUICK_FLAGS (e.g. CIRKD's small memories)")
    args = parser.parse_args(argv)
    if min(args.batch, args.large_batch) < 2:
        parser.error('--batch and --large-batch must be at least 2 (BatchNorm in one process)')
    for flag in ('crop', 'iters', 'large_iters', 'threads'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be positive')
    if args.warmup < 0:
        parser.error('--warmup must be zero or positive')
    families = {}
    for teacher in args.teachers:
        families.setdefault(_family(teacher), teacher)
    if len(families) != len(args.teachers):
        parser.error('--teachers: give one teacher per family (a CNN and a SegFormer)')
    for student in args.students:
        if _family(student) not in families or len(families) < 2:
            parser.error(f'--teachers: {":".join(student)} needs a teacher of its own family and one of another')
    args.teachers = families
    return args


def _family(network):
    return describe_network(*network, 1).family


def _setting(args, script, teachers):
    """(crop, batch, timed iterations) of a row: both of its teachers must fit the crop."""
    needed = max(smallest_crop(script, teacher) for teacher in teachers)
    if needed > args.crop:
        return needed, args.large_batch, args.large_iters
    return args.crop, args.batch, args.iters


def _teacher_gmacs(teacher, crop):
    with torch.device('meta'):
        net = build_segmentation_model(*teacher, NUM_CLASS, False)
    return count_flops(net, (1, 3, crop, crop)) / 1e9


def _time_row(args, script, student, teachers, files, data, setting):
    """{'same', 'cross': median seconds per iteration}: both runs built, then stepped in turn on the same
    batches (read before the clock starts)."""
    crop, batch, iters = setting
    total = args.warmup + iters
    steppers = {}
    flags = None
    for kind, teacher in teachers.items():
        argv = script_argv(script, student, teacher, files[teacher], data, crop, batch, total)
        flags, built = build_script_step(script, argv + extra_flags(script, args.quick))
        steppers[kind] = built.stepper
    batches = [micro_batch for _, micro_batch in zip(range(total), plain_loader(flags), strict=False)]
    times = {kind: [] for kind in steppers}
    kinds = list(steppers)
    for iteration, micro_batch in enumerate(batches, start=1):
        order = kinds if iteration % 2 else kinds[::-1]
        for kind in order:
            start = time.perf_counter()
            steppers[kind].step([micro_batch], iteration, seed=False)
            if iteration > args.warmup:
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values) for kind, values in times.items()}


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    scripts = distillation_scripts()
    work = tempfile.mkdtemp(prefix='bench_cross_')
    try:
        files = {}
        for teacher in args.teachers.values():
            path = os.path.join(work, f'teacher_{teacher[0]}_{teacher[1]}.pth')
            files[teacher] = save_fresh_network(teacher, NUM_CLASS, path)
        data = {}
        rows = []
        started = time.time()
        for method in args.methods:
            script = scripts[method]
            for student in args.students:
                own = _family(student)
                teachers = {'same': args.teachers[own],
                            'cross': next(t for family, t in args.teachers.items() if family != own)}
                setting = _setting(args, script, teachers.values())
                crop = setting[0]
                if crop not in data:
                    data[crop] = write_toy_citys(os.path.join(work, f'citys_{crop}'), crop)
                medians = _time_row(args, script, student, teachers, files, data[crop], setting)
                rows.append((method, student, teachers, setting, medians))
                print(f'[{time.time() - started:6.0f}s] {method:6s} {":".join(student):30s} same '
                      f'{medians["same"]:.4f} s/it, cross {medians["cross"]:.4f} s/it', file=sys.stderr, flush=True)
        _print_table(args, rows)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)


def _print_table(args, rows):
    print(f'Distillation across families: seconds per iteration of the real step (median), CPU, {args.threads} '
          f'threads, teachers with fresh weights; cross / same > 1: crossing the families costs more.')
    print()
    header = ['method', 'student', 'crop, batch', 'timed its', 'same-family teacher', 'same s/it',
              'cross-family teacher', 'cross s/it', 'cross / same', 'teacher GMACs same / cross']
    lines = []
    for method, student, teachers, (crop, batch, iters), medians in rows:
        same, cross = teachers['same'], teachers['cross']
        lines.append([method, ':'.join(student), f'{crop}, {batch}', iters, ':'.join(same), f'{medians["same"]:.4f}',
                      ':'.join(cross), f'{medians["cross"]:.4f}', f'{medians["cross"] / medians["same"]:.2f}',
                      f'{_teacher_gmacs(same, crop):.2f} / {_teacher_gmacs(cross, crop):.2f}'])
    print('\n'.join(markdown_table(header, lines, numeric={2, 3, 5, 7, 8, 9})))


if __name__ == '__main__':
    main()
