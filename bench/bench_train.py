"""Seconds per iteration of every training script's loop against the bare step of the same run, on this
machine's CPU.

    .venv/bin/python bench/bench_train.py [--scripts hwd,skd] [--iters 30 --large-iters 4 --warmup 2 --repeats 3]
        [--student psp_mobile --teacher deeplabv3_mobile --crop 64 --large-crop 512 --batch 4 --large-batch 2]

The scripts are those of utils.scripts (every `train_*.py` that declares a METHOD), each with its
RECOMMENDED_FLAGS (and its QUICK_FLAGS with --quick). For each script, two measurements, each in its own process
(so that the peak memory, ru_maxrss, is its own; --in-process runs them in this one, for quick checks):
- `bare + loader`: the loop's own step in a plain loop. The command line goes through the script's own parser
  and checks; `utils.train_build.build_run` builds what the loop builds (student, method, teacher, optimizer over
  the parameter groups, the same seeded initial weights), and `Stepper.step(micro_batches, iteration,
  seed=False)` runs each iteration (poly lr, forward, the method's terms, backward, the optimizer step, the
  method's own optimizers), fed by a plain shuffled DataLoader over the same training set with the same batch
  and workers. No seeded sampler, no reseeding per micro-batch, no meter, no logging, no saving;
- `loop`: the script's real `main(argv)`: the seeded sampler, the reseeding before every micro-batch, the loss
  meter, a log line every --log-iter and the latest checkpoint and resume file every --save-every iterations
  (the scripts' default is every 400, at each validation; validation is skipped).

The data: a toy Cityscapes (dataset.toy) with images of 2 x crop by 4 x crop, as Cityscapes' 1024 x 2048 against
512 crops; the teacher: a fresh network saved to a file. A script with a MIN_CROP (SKD and IFVD: the
discriminator's 64 x 64 logits; Af-DCD: one patch of the pooled last stage) runs at --large-crop (default: its
MIN_CROP scaled by the stride of the teacher's map it concerns / 8) with --large-batch and --large-iters.

Seconds per iteration, from the time stamps taken after every iteration (after its logging and saving): the
median (the typical step) and the mean (which carries the logging and saving iterations) over the iterations
after --warmup, each the best of --repeats runs, interleaved (other load on a shared machine only ever adds
time). The goal: loop <= 1.10 x (bare + loader) for every script; data loading is the same in both, the rest of
the loop must not show. Also printed: the minor page faults per iteration (memory the allocator gave back to the
system and takes again: kernel time in the step) and the peak resident memory. Environment variables pass to
both flavours (e.g. glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_).
"""
import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import utils.train_loop as train_loop  # noqa: E402
from bench.table import (  # noqa: E402
    build_script_step,
    extra_flags,
    iterations,
    method_list,
    network_name,
    plain_loader,
    save_fresh_network,
    script_argv,
    script_module,
    smallest_crop,
    write_toy_citys,
)
from utils.scripts import training_scripts  # noqa: E402

MODES = ('bare', 'loop')
LABELS = {'bare': 'bare + loader', 'loop': 'loop'}
GOAL = 1.10
NUM_CLASS = 19  # Cityscapes


def parse_args(argv=None):
    scripts = training_scripts()
    names = tuple(scripts)
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scripts', type=method_list(names), default=list(names),
                        help=f'comma-separated methods whose scripts to measure (default: all: {",".join(names)})')
    parser.add_argument('--student', type=network_name, default='psp_mobile', help='student network, MODEL[:BACKBONE]')
    parser.add_argument('--teacher', type=network_name, default='deeplabv3_mobile',
                        help='teacher network, MODEL[:BACKBONE]')
    parser.add_argument('--crop', type=int, default=64, help='square crop side of the scripts without a MIN_CROP')
    parser.add_argument('--large-crop', type=int, default=None,
                        help="square crop side of the scripts with a MIN_CROP (default: the smallest they accept "
                             "with the teacher: MIN_CROP x the stride of the teacher's map it concerns / 8)")
    parser.add_argument('--batch', type=int, default=4, help='batch size (at least 2: BatchNorm)')
    parser.add_argument('--large-batch', type=int, default=2, help='batch size at --large-crop')
    parser.add_argument('--iters', type=int, default=30, help='timed iterations per run')
    parser.add_argument('--large-iters', type=int, default=4, help='timed iterations per run at --large-crop')
    parser.add_argument('--warmup', type=int, default=2, help='untimed first iterations (at least 1)')
    parser.add_argument('--repeats', type=int, default=3, help='runs per script and flavour (interleaved)')
    parser.add_argument('--workers', type=int, default=0, help='data loader processes (both flavours)')
    parser.add_argument('--log-iter', type=int, default=5, help='loop: a log line every N iterations')
    parser.add_argument('--save-every', type=int, default=10,
                        help='loop: latest checkpoint + resume file every N iterations (and at the last)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads of each measured process')
    parser.add_argument('--quick', action='store_true',
                        help="add the scripts' QUICK_FLAGS (e.g. CIRKD's small memories) to both flavours")
    parser.add_argument('--in-process', action='store_true',
                        help='run both flavours in this process, one after the other (quick checks: no peak '
                             'memory per run, and the later runs find the imports done)')
    parser.add_argument('--keep', action='store_true', help='keep the temporary folder (data, logs of the runs)')
    parser.add_argument('--child', choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument('--script', help=argparse.SUPPRESS)
    parser.add_argument('--argv', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.warmup < 1:
        parser.error('--warmup must be at least 1 (the first time stamp starts the clock)')
    if min(args.batch, args.large_batch) < 2:
        parser.error('--batch and --large-batch must be at least 2 (BatchNorm on one process)')
    for flag in ('crop', 'iters', 'large_iters', 'repeats', 'log_iter', 'save_every', 'threads'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be positive')
    if args.workers < 0:
        parser.error('--workers must be zero or positive')
    if args.large_crop is not None:
        for name in args.scripts:
            needed = smallest_crop(scripts[name], args.teacher)
            if args.large_crop < needed:
                parser.error(f'--large-crop {args.large_crop}: {name} needs at least {needed} with the '
                             f'{":".join(args.teacher)} teacher')
    return args


# ---------------------------------------------------------------- children

def _stamp():
    """(time, minor page faults so far) at the end of an iteration."""
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _bare(script, argv):
    """The loop's step over a plain DataLoader; the time stamp after every iteration."""
    args, built = build_script_step(script, argv)
    stamps = []
    for iteration, micro_batches in iterations(plain_loader(args), args.grad_accum):
        built.stepper.step(micro_batches, iteration, seed=False)
        stamps.append(_stamp())
    return stamps


def _loop(script, argv):
    """The script's real main(argv); the time stamp after every iteration's logging and saving."""
    stamps = []
    after_step = train_loop.Trainer._after_step

    def timed_after_step(self, *args, **kwargs):
        after_step(self, *args, **kwargs)
        stamps.append(_stamp())

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    train_loop.Trainer._after_step = timed_after_step
    try:
        script_module(script).main(argv)
    finally:
        train_loop.Trainer._after_step = after_step
        # the run's log handlers go (run in this process, they would outlive it)
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    return stamps


def measure(mode, method, argv, warmup, threads):
    """{'steps', 'median', 'mean', 'faults_per_it', 'peak_rss_mb'} of one run of `method`'s script (the
    flavour `mode`) in this process; the steps after the first `warmup` iterations."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        script = training_scripts()[method]
        stamps = _loop(script, argv) if mode == 'loop' else _bare(script, argv)
    finally:
        torch.set_num_threads(previous)
    times = [t for t, _ in stamps[warmup - 1:]]
    steps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    faults = (stamps[-1][1] - stamps[warmup - 1][1]) / len(steps)
    return {'steps': steps, 'median': statistics.median(steps), 'mean': statistics.mean(steps),
            'faults_per_it': faults, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def child(args):
    result = measure(args.child, args.script, json.loads(args.argv), args.warmup, args.threads)
    with open(args.out, 'w') as handle:
        json.dump(result, handle)


# ---------------------------------------------------------------- parent

def _setting(args, script):
    """(crop, batch, timed iterations) of a script (a utils.scripts.TrainingScript)."""
    needed = smallest_crop(script, args.teacher)
    if needed > args.crop:
        return (args.large_crop or needed), args.large_batch, args.large_iters
    return args.crop, args.batch, args.iters


def _script_argv(args, script, data, teacher_file, run_dir):
    crop, batch, iters = _setting(args, script)
    argv = script_argv(script, args.student, args.teacher, teacher_file, data, crop, batch, args.warmup + iters,
                       args.workers)
    argv += ['--log-iter', str(args.log_iter), '--val-per-iters', str(args.save_every),
             '--save-per-iters', str(args.save_every),
             '--save-dir', os.path.join(run_dir, 'ckpt'), '--log-dir', os.path.join(run_dir, 'logs')]
    return argv + extra_flags(script, args.quick)


def _run_child(args, mode, method, argv, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    if args.in_process:
        result = measure(mode, method, argv, args.warmup, args.threads)
        result['peak_rss_mb'] = None  # the whole process's, not the run's
        return result
    out = os.path.join(run_dir, 'result.json')
    console = os.path.join(run_dir, 'console.txt')
    cmd = [sys.executable, os.path.abspath(__file__), '--child', mode, '--script', method, '--argv', json.dumps(argv),
           '--out', out, '--warmup', str(args.warmup), '--threads', str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=REPO)
    with open(console, 'w') as handle:
        status = subprocess.run(cmd, env=env, cwd=run_dir, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0:
        with open(console) as handle:
            tail = handle.read()[-4000:]
        sys.exit(f'{method} {mode} failed (exit status {status}):\n{tail}')
    with open(out) as handle:
        return json.load(handle)


def _prepare(args, scripts, work):
    """Toy data sets (one per crop size) and the teacher's file."""
    data = {}
    for crop in sorted({_setting(args, script)[0] for script in scripts.values()}):
        data[crop] = write_toy_citys(os.path.join(work, f'citys_{crop}'), crop)
    teacher_file = save_fresh_network(args.teacher, NUM_CLASS, os.path.join(work, 'teacher.pth'))
    return data, teacher_file


def _print_table(args, scripts, results):
    (s_model, s_backbone), (t_model, t_backbone) = args.student, args.teacher
    print(f'Loop vs bare step + loader: student {s_model} ({s_backbone}), teacher {t_model} ({t_backbone}), CPU '
          f'{args.threads} threads, {args.workers} loader workers, best of {args.repeats} interleaved runs; the loop '
          f'logs every {args.log_iter} and saves every {args.save_every} iterations. Goal: loop / bare <= {GOAL:.2f}.')
    print()
    print('| script | crop, batch | timed its | bare s/it median | loop s/it median | loop / bare median | '
          'bare s/it mean | loop s/it mean | loop / bare mean | medians per run bare; loop | '
          'minor faults/it bare / loop | peak RSS MB bare / loop |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|')
    for method in args.scripts:
        crop, batch, iters = _setting(args, scripts[method])
        runs = results[method]
        best = {mode: {key: min(r[key] for r in runs[mode]) for key in ('median', 'mean')} for mode in MODES}
        faults = {mode: statistics.median(r['faults_per_it'] for r in runs[mode]) for mode in MODES}
        ratio = best['loop']['median'] / best['bare']['median']
        mean_ratio = best['loop']['mean'] / best['bare']['mean']
        over = '' if ratio <= GOAL else ' (over)'
        memory = 'n/a (in process)'
        if not args.in_process:
            rss = {mode: max(r['peak_rss_mb'] for r in runs[mode]) for mode in MODES}
            memory = f'{rss["bare"]:.0f} / {rss["loop"]:.0f}'
        per_run = '; '.join(' '.join(f'{r["median"]:.3f}' for r in runs[mode]) for mode in MODES)
        print(f'| {method} | {crop}, {batch} | {iters} | {best["bare"]["median"]:.4f} | {best["loop"]["median"]:.4f} | '
              f'{ratio:.3f}x{over} | {best["bare"]["mean"]:.4f} | {best["loop"]["mean"]:.4f} | {mean_ratio:.3f}x | '
              f'{per_run} | {faults["bare"]:.0f} / {faults["loop"]:.0f} | {memory} |')


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    scripts = {method: script for method, script in training_scripts().items() if method in args.scripts}
    work = tempfile.mkdtemp(prefix='bench_train_')
    try:
        data, teacher_file = _prepare(args, scripts, work)
        results = {method: {mode: [] for mode in MODES} for method in args.scripts}
        started = time.time()
        for repeat in range(args.repeats):
            for index, method in enumerate(args.scripts):
                script = scripts[method]
                # alternate which flavour runs first, so that neither always follows the other
                order = MODES if (repeat + index) % 2 == 0 else MODES[::-1]
                for mode in order:
                    run_dir = os.path.join(work, 'runs', f'{method}_{mode}_{repeat}')
                    crop = _setting(args, script)[0]
                    argv = _script_argv(args, script, data[crop], teacher_file, run_dir)
                    result = _run_child(args, mode, method, argv, run_dir)
                    results[method][mode].append(result)
                    print(f'[{time.time() - started:6.0f}s] run {repeat + 1}/{args.repeats} {method:8s} '
                          f'{LABELS[mode]:13s} median {result["median"]:.4f} s/it, mean {result["mean"]:.4f} s/it',
                          file=sys.stderr, flush=True)
        _print_table(args, scripts, results)
    finally:
        if args.keep:
            print(f'kept {work}', file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
