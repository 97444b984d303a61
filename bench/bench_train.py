"""Cost of the shared training loop against a bare training step, on this machine's CPU.

    .venv/bin/python bench/bench_train.py [--iters 30 --warmup 3 --repeats 3 --crop 128 --batch 4 --save-every 10]

Three measurements, each in its own process (so that the peak memory, ru_maxrss, is its own):
- `bare (fixed batch)`: student + teacher + task loss + HWD loss + SGD on one batch held in memory;
- `bare + loader`: the same step fed by a plain DataLoader over the same training set;
- `train_hwd.py loop`: the real loop of train_hwd.py (sampler, poly lr, loss bookkeeping, logging every
  --log-iter, the resume file and checkpoints written every --save-every iterations).
Seconds per iteration: the median (typical step) and the mean (which carries the saving iterations) over
the timed iterations after --warmup, each the best of --repeats interleaved runs (other load on a shared
machine only adds time). The goal is loop <= 1.10 x (bare + loader): data loading is the same in both,
everything else of the loop must not show.
"""
import argparse
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

MODES = ('bare', 'bare_loader', 'loop')
LABELS = {'bare': 'bare step (fixed batch)', 'bare_loader': 'bare step + loader', 'loop': 'train_hwd.py loop'}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=30, help='timed iterations per run')
    parser.add_argument('--warmup', type=int, default=3, help='untimed first iterations')
    parser.add_argument('--repeats', type=int, default=3, help='runs per mode (interleaved)')
    parser.add_argument('--crop', type=int, default=128, help='square crop size')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--teacher-backbone', default='resnet18', help='teacher deeplabv3 backbone')
    parser.add_argument('--log-iter', type=int, default=10)
    parser.add_argument('--save-every', type=int, default=10,
                        help='loop: latest + resume file every N iterations (the real default is 400)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--child', choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument('--data', help=argparse.SUPPRESS)
    parser.add_argument('--teacher', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------- children

def _networks(args, device):
    import torch
    from models.model_zoo import get_segmentation_model
    torch.manual_seed(0)
    student = get_segmentation_model('deeplabv3', 'resnet18', 19, True).to(device).train()
    teacher = get_segmentation_model('deeplabv3', args.teacher_backbone, 19, True, pretrained=args.teacher)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _bare(args, with_loader):
    import torch
    from torch.utils.data import DataLoader
    from dataset import build_dataset
    from losses import CriterionHWD, SegCrossEntropyLoss
    device = torch.device('cpu')
    student, teacher = _networks(args, device)
    task = SegCrossEntropyLoss(-1)
    hwd = CriterionHWD(norm=True, L='MSE', process='E', parameter=0.1, shift=1.0, activation=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    total = args.warmup + args.iters
    data = build_dataset('citys', 'train', data_root=args.data, max_iters=total * args.batch,
                         crop_size=(args.crop, args.crop), scale=True, mirror=True)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=0)
    if not with_loader:
        fixed = next(iter(loader))
        loader = [fixed] * total
    stamps = []
    for images, labels, _ in loader:
        labels = labels.long()
        with torch.no_grad():
            t_out = teacher(images)
        s_out = student(images)
        loss = task(s_out[0], labels) + 0.4 * task(s_out[1], labels) + 3.0 * hwd(s_out[0], t_out[0], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return stamps


def _loop(args):
    import train_hwd
    from utils.distributed import cleanup, init_distributed
    from utils.train_loop import Trainer
    work = tempfile.mkdtemp(prefix='bench_loop_')
    total = args.warmup + args.iters
    argv = ['--no-cuda', '--data', args.data, '--teacher-backbone', args.teacher_backbone,
            '--teacher-pretrained', args.teacher, '--student-pretrained-base', 'None',
            '--crop-size', f'{args.crop},{args.crop}', '--batch-size', str(args.batch), '--workers', '0',
            '--max-iterations', str(total), '--log-iter', str(args.log_iter),
            '--skip-val', '--val-per-iters', str(args.save_every), '--save-per-iters', str(args.save_every),
            '--save-dir', os.path.join(work, 'ckpt'), '--log-dir', os.path.join(work, 'logs'),
            '--activation', '--shift', '1.0']
    targs = train_hwd.parse_args(argv)
    ctx = init_distributed(targs)
    trainer = Trainer(targs, train_hwd.METHOD,
                      lambda nets: train_hwd.HWDDistillation(train_hwd.make_criterion(targs), targs.lambda_hwd), ctx)
    # Quiet console: the log file still gets every line.
    import logging
    for handler in trainer.logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    stamps = []
    after_step = trainer._after_step

    def timed_after_step(*a, **k):  # the stamp includes logging and saving of that iteration
        after_step(*a, **k)
        stamps.append(time.perf_counter())

    trainer._after_step = timed_after_step
    trainer.train()
    cleanup()
    shutil.rmtree(work, ignore_errors=True)
    return stamps


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    if args.child == 'loop':
        stamps = _loop(args)
    else:
        stamps = _bare(args, with_loader=args.child == 'bare_loader')
    steps = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    result = {'mode': args.child, 'sec_per_it': statistics.median(steps), 'mean_sec_per_it': statistics.mean(steps),
              'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    with open(args.out, 'w') as handle:
        json.dump(result, handle)


# ---------------------------------------------------------------- parent

def main():
    args = parse_args()
    if args.child:
        return child(args)
    import torch
    from dataset.toy import make_toy_dataset
    from models.model_zoo import get_segmentation_model
    work = tempfile.mkdtemp(prefix='bench_train_')
    data = os.path.join(work, 'citys')
    make_toy_dataset('citys', data, num_train=8, num_val=1, size=(args.crop * 2, args.crop * 4), seed=0)
    teacher = os.path.join(work, 'teacher.pth')
    torch.manual_seed(1)
    torch.save(get_segmentation_model('deeplabv3', args.teacher_backbone, 19, True).state_dict(), teacher)
    results = {mode: [] for mode in MODES}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=REPO)
    for repeat in range(args.repeats):
        for mode in MODES:
            out = os.path.join(work, f'{mode}_{repeat}.json')
            cmd = [sys.executable, os.path.abspath(__file__), '--child', mode, '--data', data, '--teacher', teacher,
                   '--out', out, '--iters', str(args.iters), '--warmup', str(args.warmup), '--crop', str(args.crop),
                   '--batch', str(args.batch), '--teacher-backbone', args.teacher_backbone,
                   '--log-iter', str(args.log_iter), '--save-every', str(args.save_every),
                   '--threads', str(args.threads)]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(out) as handle:
                results[mode].append(json.load(handle))
    print(f'train_hwd.py loop vs bare step: deeplabv3-resnet18 student, deeplabv3-{args.teacher_backbone} teacher, '
          f'batch {args.batch}, crop {args.crop}x{args.crop}, CPU {args.threads} threads, {args.iters} timed '
          f'iterations x {args.repeats} runs; loop logs every {args.log_iter} and saves every {args.save_every}')
    print(f'{"":26s} {"s/it median":>12s} {"s/it mean":>10s} {"median per run":>22s} {"peak RSS MB":>12s} '
          f'{"median vs":>10s} {"mean vs":>8s}')
    print(f'{"":26s} {"":>12s} {"":>10s} {"":>22s} {"":>12s} {"bare+ldr":>10s} {"bare+ldr":>8s}')
    # The best run of each mode: other load on a shared machine only ever adds time.
    ref_median = min(r['sec_per_it'] for r in results['bare_loader'])
    ref_mean = min(r['mean_sec_per_it'] for r in results['bare_loader'])
    for mode in MODES:
        median = min(r['sec_per_it'] for r in results[mode])
        mean = min(r['mean_sec_per_it'] for r in results[mode])
        rss = max(r['peak_rss_mb'] for r in results[mode])
        runs = ' '.join(f'{r["sec_per_it"]:.3f}' for r in results[mode])
        print(f'{LABELS[mode]:26s} {median:12.4f} {mean:10.4f} {runs:>22s} {rss:12.0f} '
              f'{median / ref_median:9.3f}x {mean / ref_mean:7.3f}x')
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
