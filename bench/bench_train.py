"""Seconds per iteration of every training script's loop against a bare step of the same networks and losses,
on this machine's CPU.

    .venv/bin/python bench/bench_train.py [--scripts hwd,skd] [--iters 30 --large-iters 4 --warmup 2 --repeats 3]
        [--student psp_mobile --teacher deeplabv3_mobile --crop 64 --large-crop 512 --batch 4 --large-batch 2]

For each script, two measurements, each in its own process (so that the peak memory, ru_maxrss, is its own):
- `bare + loader`: a plain hand-written step in a plain loop: the script's student and teacher, the script's
  own method module (built by the script's `build_method` from the script's parsed flags), the task loss
  (+0.4 aux), one backward, the SGD step (and the method's own optimizers, the SKD/IFVD discriminator's Adam
  step, on the detached outputs), fed by a plain DataLoader (shuffled, default collate) over the same
  training set with the same batch and workers. No seeding, no meter, no logging, no saving;
- `loop`: the script's real `main(argv)`: the seeded sampler, the reseeding before every micro-batch, the
  poly lr, the loss meter, a log line every --log-iter and the latest checkpoint and resume file every
  --save-every iterations (the scripts' default is every 400, at each validation; validation is skipped).

Both flavours parse the same command line with the script's own parser (the bare step captures what `main`
hands to `run_training`). The data: a toy Cityscapes (dataset.toy) with images of 2 x crop by 4 x crop, as
Cityscapes' 1024 x 2048 against 512 crops; the teacher: a fresh network saved to a file. SKD and IFVD need
crops of at least 512 (the discriminator's 64 x 64 logits): they run at --large-crop with --large-batch and
--large-iters.

Seconds per iteration, from the time stamps taken after every iteration (after its logging and saving):
the median (the typical step) and the mean (which carries the logging and saving iterations) over the
iterations after --warmup, each the best of --repeats runs, interleaved (other load on a shared machine
only ever adds time). The goal: loop <= 1.10 x (bare + loader) for every script; data loading is the same in
both, the rest of the loop must not show. Also printed: the minor page faults per iteration (memory the
allocator gave back to the system and takes again: kernel time in the step) and the peak resident memory.
Environment variables pass to both flavours (e.g. glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_).
"""
import argparse
import importlib
import json
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

SCRIPTS = ('baseline', 'hwd', 'cwd', 'kd', 'dist', 'mgd', 'skd', 'ifvd', 'cirkd')
# The discriminator of SKD / IFVD needs logits of at least 64 x 64: crops of at least 512.
LARGE_CROP_SCRIPTS = ('skd', 'ifvd')
# Flags beyond the scripts' defaults: the HWD setting of the paper's command line.
SCRIPT_FLAGS = {'hwd': ['--activation', '--shift', '1.0']}
MODES = ('bare', 'loop')
LABELS = {'bare': 'bare + loader', 'loop': 'loop'}
GOAL = 1.10
NUM_CLASS = 19  # Cityscapes


def _network_spec(text, flag):
    """'model' or 'model:backbone' -> (model, backbone); the mobile networks' only backbone is 'mobile'."""
    model, _, backbone = text.partition(':')
    if not backbone:
        backbone = 'mobile' if model.endswith('_mobile') else 'resnet18'
    from models.model_zoo import check_model_name
    from utils.errors import UserError
    try:
        check_model_name(model, backbone, flag, flag)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return model, backbone


def _script_list(text):
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in SCRIPTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f'{text!r}: choose a comma-separated subset of {",".join(SCRIPTS)}')
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scripts', type=_script_list, default=list(SCRIPTS),
                        help=f'comma-separated training scripts to measure (default: all: {",".join(SCRIPTS)})')
    parser.add_argument('--student', default='psp_mobile', help='student network, MODEL[:BACKBONE]')
    parser.add_argument('--teacher', default='deeplabv3_mobile', help='teacher network, MODEL[:BACKBONE]')
    parser.add_argument('--crop', type=int, default=64, help='square crop size of every script but SKD / IFVD')
    parser.add_argument('--large-crop', type=int, default=512, help='square crop size of SKD and IFVD (>= 512)')
    parser.add_argument('--batch', type=int, default=4, help='batch size (at least 2: BatchNorm)')
    parser.add_argument('--large-batch', type=int, default=2, help='batch size of SKD and IFVD')
    parser.add_argument('--iters', type=int, default=30, help='timed iterations per run')
    parser.add_argument('--large-iters', type=int, default=4, help='timed iterations per run of SKD and IFVD')
    parser.add_argument('--warmup', type=int, default=2, help='untimed first iterations (at least 1)')
    parser.add_argument('--repeats', type=int, default=3, help='runs per script and flavour (interleaved)')
    parser.add_argument('--workers', type=int, default=0, help='data loader processes (both flavours)')
    parser.add_argument('--log-iter', type=int, default=5, help='loop: a log line every N iterations')
    parser.add_argument('--save-every', type=int, default=10,
                        help='loop: latest checkpoint + resume file every N iterations (and at the last)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads of each measured process')
    parser.add_argument('--keep', action='store_true', help='keep the temporary folder (data, logs of the runs)')
    parser.add_argument('--child', choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument('--script', help=argparse.SUPPRESS)
    parser.add_argument('--argv', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.student = _network_spec(args.student, '--student')
    args.teacher = _network_spec(args.teacher, '--teacher')
    if args.warmup < 1:
        parser.error('--warmup must be at least 1 (the first time stamp starts the clock)')
    if min(args.batch, args.large_batch) < 2:
        parser.error('--batch and --large-batch must be at least 2 (BatchNorm on one process)')
    if any(name in LARGE_CROP_SCRIPTS for name in args.scripts) and args.large_crop < 512:
        parser.error(f'--large-crop {args.large_crop}: SKD and IFVD need at least 512')
    for flag in ('crop', 'iters', 'large_iters', 'repeats', 'log_iter', 'save_every', 'threads'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be positive')
    return args


# ---------------------------------------------------------------- children

def _stamp():
    """(time, minor page faults so far) at the end of an iteration."""
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _capture_run_training(script, argv):
    """(parsed flags, build_method) that the script's `main(argv)` hands to `run_training`, without training."""
    module = importlib.import_module(f'train_{script}')
    captured = {}

    def capture(args, method_name, build_method=None):
        captured.update(args=args, build_method=build_method)

    module.run_training = capture  # the scripts call the name they imported
    module.main(argv)
    return captured['args'], captured['build_method']


def _bare(script, argv):
    """The bare step over a plain DataLoader; the time stamp after every iteration."""
    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader

    from dataset import build_dataset, dataset_info
    from losses import SegCrossEntropyLoss
    from models.model_zoo import get_segmentation_model
    from utils.options import is_distillation, student_names
    from utils.seeding import derive_seed
    from utils.train_loop import AUX_WEIGHT, Networks

    args, build_method = _capture_run_training(script, argv)
    device = torch.device('cpu')
    num_class = dataset_info(args.dataset, args.data).num_class
    torch.manual_seed(derive_seed(args.seed, 'init'))
    train_set = build_dataset(args.dataset, 'train', data_root=args.data,
                              max_iters=args.max_iterations * args.batch_size, crop_size=tuple(args.crop_size),
                              scale=True, mirror=True, ignore_label=args.ignore_label)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    model, backbone, pretrained_base, pretrained = student_names(args)
    aux = backbone.startswith('resnet')
    student = get_segmentation_model(model, backbone, num_class, aux, nn.BatchNorm2d, pretrained,
                                     pretrained_base).to(device).train()
    teacher = None
    if is_distillation(args):
        teacher = get_segmentation_model(args.teacher_model, args.teacher_backbone, num_class, True, nn.BatchNorm2d,
                                         args.teacher_pretrained, 'None').to(device).eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
    method = None
    if build_method is not None:
        method = build_method(Networks(student, teacher, num_class, device, nn.BatchNorm2d))
    params = list(student.parameters())
    owns = {}
    skipped = set()
    if method is not None:
        method = method.to(device).train()
        params += method.student_parameters()
        owns = method.own_optimizers()
        for own in owns.values():
            own.optimizer = own.make([p for p in own.module.parameters() if p.requires_grad], own.lr)
        skipped = set(method.logged_only)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    task = SegCrossEntropyLoss(ignore_index=args.ignore_label)

    stamps = []
    for images, labels, _ in loader:
        labels = labels.long()
        t_outputs = None
        if teacher is not None:
            with torch.no_grad():
                t_outputs = teacher(images)
        s_outputs = student(images)
        loss = task(s_outputs[0], labels)
        if aux:
            loss = loss + AUX_WEIGHT * task(s_outputs[1], labels)
        if method is not None:
            terms = method(s_outputs, t_outputs, labels)
            loss = loss + sum(value for name, value in terms.items() if name not in skipped)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if owns:
            detached = [o.detach() for o in s_outputs]
            for name, own in owns.items():
                own.optimizer.zero_grad(set_to_none=True)
                own_loss, _ = method.own_loss(name, detached, t_outputs, labels)
                own_loss.backward()
                own.optimizer.step()
        stamps.append(_stamp())
    return stamps


def _loop(script, argv):
    """The script's real main(argv); the time stamp after every iteration's logging and saving."""
    import utils.train_loop as train_loop
    module = importlib.import_module(f'train_{script}')
    stamps = []
    after_step = train_loop.Trainer._after_step

    def timed_after_step(self, *args, **kwargs):
        after_step(self, *args, **kwargs)
        stamps.append(_stamp())

    train_loop.Trainer._after_step = timed_after_step
    module.main(argv)
    return stamps


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    argv = json.loads(args.argv)
    stamps = _loop(args.script, argv) if args.child == 'loop' else _bare(args.script, argv)
    times = [t for t, _ in stamps[args.warmup - 1:]]
    steps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    faults = (stamps[-1][1] - stamps[args.warmup - 1][1]) / len(steps)
    result = {'steps': steps, 'median': statistics.median(steps), 'mean': statistics.mean(steps),
              'faults_per_it': faults, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    with open(args.out, 'w') as handle:
        json.dump(result, handle)


# ---------------------------------------------------------------- parent

def _setting(args, script):
    """(crop, batch, timed iterations) of the script."""
    if script in LARGE_CROP_SCRIPTS:
        return args.large_crop, args.large_batch, args.large_iters
    return args.crop, args.batch, args.iters


def _script_argv(args, script, data, teacher_file, run_dir):
    crop, batch, iters = _setting(args, script)
    (s_model, s_backbone), (t_model, t_backbone) = args.student, args.teacher
    if script == 'baseline':
        argv = ['--model', s_model, '--backbone', s_backbone, '--pretrained-base', 'None']
    else:
        argv = ['--student-model', s_model, '--student-backbone', s_backbone, '--student-pretrained-base', 'None',
                '--teacher-model', t_model, '--teacher-backbone', t_backbone, '--teacher-pretrained', teacher_file]
    argv += ['--no-cuda', '--dataset', 'citys', '--data', data, '--crop-size', f'{crop},{crop}',
             '--batch-size', str(batch), '--workers', str(args.workers),
             '--max-iterations', str(args.warmup + iters), '--log-iter', str(args.log_iter),
             '--skip-val', '--val-per-iters', str(args.save_every), '--save-per-iters', str(args.save_every),
             '--save-dir', os.path.join(run_dir, 'ckpt'), '--log-dir', os.path.join(run_dir, 'logs')]
    return argv + SCRIPT_FLAGS.get(script, [])


def _run_child(args, mode, script, argv, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    out = os.path.join(run_dir, 'result.json')
    console = os.path.join(run_dir, 'console.txt')
    cmd = [sys.executable, os.path.abspath(__file__), '--child', mode, '--script', script, '--argv', json.dumps(argv),
           '--out', out, '--warmup', str(args.warmup), '--threads', str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=REPO)
    with open(console, 'w') as handle:
        status = subprocess.run(cmd, env=env, cwd=run_dir, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0:
        with open(console) as handle:
            tail = handle.read()[-4000:]
        sys.exit(f'{script} {mode} failed (exit status {status}):\n{tail}')
    with open(out) as handle:
        return json.load(handle)


def _prepare(args, work):
    """Toy data sets (one per crop size) and the teacher's file."""
    import torch

    from dataset.toy import make_toy_dataset
    from models.model_zoo import get_segmentation_model
    data = {}
    for crop in sorted({_setting(args, script)[0] for script in args.scripts}):
        data[crop] = os.path.join(work, f'citys_{crop}')
        make_toy_dataset('citys', data[crop], num_train=8, num_val=1, size=(2 * crop, 4 * crop), seed=0)
    teacher_file = os.path.join(work, 'teacher.pth')
    torch.manual_seed(1)
    torch.save(get_segmentation_model(*args.teacher, NUM_CLASS, True).state_dict(), teacher_file)
    return data, teacher_file


def _print_table(args, results):
    (s_model, s_backbone), (t_model, t_backbone) = args.student, args.teacher
    print(f'Loop vs bare step + loader: student {s_model} ({s_backbone}), teacher {t_model} ({t_backbone}), CPU '
          f'{args.threads} threads, {args.workers} loader workers, best of {args.repeats} interleaved runs; the loop '
          f'logs every {args.log_iter} and saves every {args.save_every} iterations. Goal: loop / bare <= {GOAL:.2f}.')
    print()
    print('| script | crop, batch | timed its | bare s/it median | loop s/it median | loop / bare median | '
          'bare s/it mean | loop s/it mean | loop / bare mean | medians per run bare; loop | '
          'minor faults/it bare / loop | peak RSS MB bare / loop |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|')
    for script in args.scripts:
        crop, batch, iters = _setting(args, script)
        runs = results[script]
        best = {mode: {key: min(r[key] for r in runs[mode]) for key in ('median', 'mean')} for mode in MODES}
        faults = {mode: statistics.median(r['faults_per_it'] for r in runs[mode]) for mode in MODES}
        rss = {mode: max(r['peak_rss_mb'] for r in runs[mode]) for mode in MODES}
        ratio = best['loop']['median'] / best['bare']['median']
        mean_ratio = best['loop']['mean'] / best['bare']['mean']
        over = '' if ratio <= GOAL else ' (over)'
        per_run = '; '.join(' '.join(f'{r["median"]:.3f}' for r in runs[mode]) for mode in MODES)
        print(f'| {script} | {crop}, {batch} | {iters} | {best["bare"]["median"]:.4f} | {best["loop"]["median"]:.4f} | '
              f'{ratio:.3f}x{over} | {best["bare"]["mean"]:.4f} | {best["loop"]["mean"]:.4f} | {mean_ratio:.3f}x | '
              f'{per_run} | {faults["bare"]:.0f} / {faults["loop"]:.0f} | {rss["bare"]:.0f} / {rss["loop"]:.0f} |')


def main():
    args = parse_args()
    if args.child:
        return child(args)
    work = tempfile.mkdtemp(prefix='bench_train_')
    try:
        data, teacher_file = _prepare(args, work)
        results = {script: {mode: [] for mode in MODES} for script in args.scripts}
        started = time.time()
        for repeat in range(args.repeats):
            for index, script in enumerate(args.scripts):
                # alternate which flavour runs first, so that neither always follows the other
                order = MODES if (repeat + index) % 2 == 0 else MODES[::-1]
                for mode in order:
                    run_dir = os.path.join(work, 'runs', f'{script}_{mode}_{repeat}')
                    crop = _setting(args, script)[0]
                    argv = _script_argv(args, script, data[crop], teacher_file, run_dir)
                    result = _run_child(args, mode, script, argv, run_dir)
                    results[script][mode].append(result)
                    print(f'[{time.time() - started:6.0f}s] run {repeat + 1}/{args.repeats} {script:8s} '
                          f'{LABELS[mode]:13s} median {result["median"]:.4f} s/it, mean {result["mean"]:.4f} s/it',
                          file=sys.stderr, flush=True)
        _print_table(args, results)
    finally:
        if args.keep:
            print(f'kept {work}', file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
