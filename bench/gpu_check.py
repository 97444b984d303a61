"""GPU check: every training script at the paper's shapes on one CUDA GPU, then eval.py, in one table.

    python -m bench.gpu_check [--scripts baseline,hwd] [--iters 24 --warmup 8] [--out DIR]
    python -m bench.gpu_check --smoke [--scripts ...]      # the same steps on the CPU at tiny shapes

The scripts are those `utils.scripts.training_scripts()` finds, in its order. The shapes of the paper
(W. Sun et al., "Holistic Weighted Distillation for Semantic Segmentation", ICME 2023; the CIRKD recipe):
generated Cityscapes-layout images of 1024 x 2048 (`dataset.toy`), 512 x 512 crops, batch 8 on one process,
a DeepLabV3-ResNet101 teacher (fresh weights saved to a file) and a DeepLabV3-ResNet18 student, each script's
RECOMMENDED_FLAGS, `--amp`, and for the baseline and HWD a second run without it. Then eval.py evaluates the
first trained student on full-size (1024 x 2048) validation images.

Each script runs in this process: its module is imported and `main(argv)` called, one run after another. One
CUDA context and one import of torch serve every run (a subprocess per run would pay both again, a large part
of an 8-minute budget); the allocator's peak is reset between runs; a run that fails (an error, a refused
flag, CUDA out of memory) becomes a row with its error and the next run goes on. Each run's console output
goes to `console.txt` in its folder; only the table is printed, a row as soon as its run ends.

Per-iteration time comes from the loop's own records: a run validates every `--warmup` iterations on two tiny
validation images (cheap next to a training step), so its history (`{stem}_history.jsonl`) holds the seconds
per iteration of every window of `--warmup` iterations, validation excluded. The first window (start-up, the
loader's first batches, kernel selection) is dropped; the row's time is the mean over the later windows,
which include the loop's own costs (logging, the checkpoint written at each validation). Columns:

- `s/it`, `img/s`: after the warm-up window; `h / 40k it`: `s/it` x 40,000 iterations (the paper's run on
  this one device, validation excluded);
- `peak MB`: the largest `peak_memory_mb` of the run's records: the CUDA allocator's peak of allocated memory
  (on the CPU, `--smoke`, the process's peak resident memory so far, which the earlier runs share);
- `finite`: every loss value of the log lines and of the history is finite (a non-finite loss stops a run);
- eval.py: seconds per image between its log lines that open and close the evaluation loop (the loader's
  start included), divided by the images; the allocator's peak; the mIoU of the short run (no meaning).

`--smoke` takes the same steps on the CPU at tiny shapes (64 x 128 images, 64 x 64 crops, batch 2, 2
iterations: 1 of warm-up and 1 timed, the psp_mobile student and the deeplabv3_mobile teacher, crops of at least a
script's MIN_CROP), without the duplicate runs without `--amp` (on the CPU `--amp` changes nothing and the
`amp` column, read from each run's flags file, says `off`). The table also goes to `{--out}/gpu_check.md`,
rewritten after every row. The exit status is 1 when a run or the evaluation failed or a loss was not finite.
"""
import argparse
import contextlib
import datetime
import gc
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

from bench.table import method_list
from dataset import dataset_info
from dataset.toy import make_toy_dataset
from models.model_zoo import describe_network, get_segmentation_model, has_aux_head
from utils.checkpointing import checkpoint_paths, checkpoint_stem
from utils.cost import device_name, peak_memory_mb
from utils.errors import StopCommand, run_main
from utils.options import positive_int
from utils.results import FLAGS_SUFFIX, HISTORY_SUFFIX, read_history
from utils.scripts import TrainingScript, training_scripts
from utils.train_step import NonFiniteLossError

DATASET = 'citys'
# The paper's run length, for the extrapolated hours.
PAPER_ITERATIONS = 40000
# Methods that also run without --amp on the GPU: the reference row and the paper's method.
FP32_TOO = ('baseline', 'hwd')


@dataclass(frozen=True)
class Shapes:
    """Everything the two modes differ in."""
    image_size: tuple        # training images and eval.py's validation images (H, W)
    val_size: tuple          # the training runs' own validation images: tiny, only for the records
    crop: int
    batch: int
    iters: int
    warmup: int              # the validation period; the first window is dropped
    train_images: int
    val_images: int
    eval_images: int
    workers: int
    teacher: tuple           # (model, backbone)
    student: tuple
    use_quick_flags: bool    # the scripts' QUICK_FLAGS (small CIRKD memories for tiny data)


GPU_SHAPES = Shapes(image_size=(1024, 2048), val_size=(64, 128), crop=512, batch=8, iters=24, warmup=8,
                    train_images=8, val_images=2, eval_images=4, workers=8,
                    teacher=('deeplabv3', 'resnet101'), student=('deeplabv3', 'resnet18'), use_quick_flags=False)
SMOKE_SHAPES = Shapes(image_size=(64, 128), val_size=(64, 128), crop=64, batch=2, iters=2, warmup=1,
                      train_images=4, val_images=2, eval_images=2, workers=0,
                      teacher=('deeplabv3_mobile', 'mobile'), student=('psp_mobile', 'mobile'), use_quick_flags=True)


@dataclass
class Run:
    """One training run: a script with its command line."""
    label: str
    script: TrainingScript
    amp: bool
    crop: int
    argv: list
    folder: str              # --save-dir and --log-dir
    student: tuple           # (model, backbone)

    @property
    def stem(self):
        return checkpoint_stem(self.script.method, *self.student, DATASET)


@dataclass
class Row:
    """What one run measured; None where it could not be measured."""
    run: Run
    amp: bool | None = None          # as the run's flags file records it (off on the CPU)
    seconds_per_iteration: float | None = None
    images_per_second: float | None = None
    peak_mb: float | None = None
    finite: bool | None = None
    wall_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self):
        return self.error is None and self.finite is True and self.seconds_per_iteration is not None

    @property
    def paper_hours(self):
        if self.seconds_per_iteration is None:
            return None
        return self.seconds_per_iteration * PAPER_ITERATIONS / 3600


@dataclass
class EvalRow:
    label: str
    images: int
    size: tuple
    seconds_per_image: float | None = None
    peak_mb: float | None = None
    miou: float | None = None
    wall_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self):
        return self.error is None and self.seconds_per_image is not None


@dataclass
class Report:
    """The tables so far, printed row by row and rewritten to gpu_check.md."""
    header: list
    path: str
    rows: list = field(default_factory=list)
    eval_rows: list = field(default_factory=list)
    footer: list = field(default_factory=list)


# ---------------------------------------------------------------- flags

def parse_args(argv=None, cuda_available=None):
    known = tuple(training_scripts())
    parser = argparse.ArgumentParser(prog='python -m bench.gpu_check', description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true',
                        help='the CPU smoke run at tiny shapes (64 x 128 images, small networks, 2 iterations)')
    parser.add_argument('--scripts', type=method_list(known), default=list(known), metavar='A,B',
                        help=f'comma-separated subset of the methods (default: all: {",".join(known)})')
    parser.add_argument('--iters', type=positive_int, default=None, metavar='N',
                        help=f'iterations per run, a multiple of --warmup (default: {GPU_SHAPES.iters}; '
                             f'--smoke: {SMOKE_SHAPES.iters})')
    parser.add_argument('--warmup', type=positive_int, default=None, metavar='W',
                        help='iterations of each timing window; the first window is the warm-up and is dropped '
                             f'(default: {GPU_SHAPES.warmup}; --smoke: {SMOKE_SHAPES.warmup})')
    parser.add_argument('--out', default=None, metavar='DIR',
                        help='folder of the data, checkpoints, logs and gpu_check.md (default: a new temporary '
                             'folder, whose data and checkpoints are removed at the end)')
    args = parser.parse_args(argv)
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not args.smoke and not cuda_available:
        parser.error('no CUDA GPU is visible here (torch.cuda.is_available() is False): run the check on a machine '
                     'with a GPU, or add --smoke for the CPU run at tiny shapes')
    base = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    iters = args.iters if args.iters is not None else base.iters
    warmup = args.warmup if args.warmup is not None else min(base.warmup, iters)
    if iters % warmup or iters < 2 * warmup:
        parser.error(f'--iters {iters} must be a multiple of --warmup {warmup} and at least twice it (the first '
                     'window of --warmup iterations is dropped; the time comes from the later ones)')
    args.shapes = Shapes(**{**base.__dict__, 'iters': iters, 'warmup': warmup})
    return args


# ---------------------------------------------------------------- the plan

def crop_for(script, shapes):
    """The crop side of a script: the mode's, or the script's MIN_CROP scaled to the stride of the teacher's map
    it concerns."""
    return max(shapes.crop, script.smallest_crop(describe_network(*shapes.teacher, 1)))


def network_flags(script, shapes, teacher_file):
    student_model, student_backbone = shapes.student
    if not script.distillation:
        return ['--model', student_model, '--backbone', student_backbone, '--pretrained-base', 'None']
    return ['--teacher-model', shapes.teacher[0], '--teacher-backbone', shapes.teacher[1],
            '--teacher-pretrained', teacher_file,
            '--student-model', student_model, '--student-backbone', student_backbone,
            '--student-pretrained-base', 'None']


def plan_runs(methods, shapes, smoke, out, train_root, teacher_file):
    """[Run] of the methods, in `training_scripts()` order; amp on, and off too for FP32_TOO on the GPU."""
    scripts = training_scripts()
    runs = []
    for method, script in scripts.items():
        if method not in methods:
            continue
        modes = [True, False] if (method in FP32_TOO and not smoke) else [True]
        for amp in modes:
            label = method if len(modes) == 1 else f'{method}_{"amp" if amp else "fp32"}'
            folder = os.path.join(out, 'runs', label)
            crop = crop_for(script, shapes)
            argv = network_flags(script, shapes, teacher_file)
            argv += ['--dataset', DATASET, '--data', train_root, '--crop-size', f'{crop},{crop}',
                     '--batch-size', str(shapes.batch), '--max-iterations', str(shapes.iters),
                     '--workers', str(shapes.workers), '--val-per-iters', str(shapes.warmup),
                     '--log-iter', str(max(1, shapes.warmup // 2)), '--seed', '0',
                     '--save-dir', folder, '--log-dir', folder]
            argv += list(script.recommended_flags)
            if shapes.use_quick_flags:
                argv += list(script.quick_flags)
            if amp:
                argv.append('--amp')
            if smoke:
                argv.append('--no-cuda')
            runs.append(Run(label, script, amp, crop, argv, folder, shapes.student))
    return runs


# ---------------------------------------------------------------- data and teacher

def make_data(out, shapes):
    """(training root: training images at full size + tiny validation images, eval root: full-size validation
    images). A folder is written once and reused (its `.complete` marker)."""
    height, width = shapes.image_size
    train_root = os.path.join(out, 'data', f'train_{height}x{width}_n{shapes.train_images}_val{shapes.val_images}'
                                           f'_{shapes.val_size[0]}x{shapes.val_size[1]}')
    eval_root = os.path.join(out, 'data', f'eval_{height}x{width}_n{shapes.eval_images}')
    for root, parts in ((train_root, [(shapes.train_images, 0, shapes.image_size),
                                      (0, shapes.val_images, shapes.val_size)]),
                        (eval_root, [(0, shapes.eval_images, shapes.image_size)])):
        marker = os.path.join(root, '.complete')
        if os.path.isfile(marker):
            continue
        shutil.rmtree(root, ignore_errors=True)
        for num_train, num_val, size in parts:
            make_toy_dataset(DATASET, root, num_train=num_train, num_val=num_val, size=size, seed=0)
        with open(marker, 'w', encoding='utf-8') as handle:
            handle.write('written by bench.gpu_check\n')
    return train_root, eval_root


def make_teacher(out, shapes):
    """A teacher checkpoint with fresh (seeded) weights: the check measures cost, not accuracy."""
    model, backbone = shapes.teacher
    path = os.path.join(out, 'teacher', f'{model}_{backbone}_{DATASET}_fresh.pth')
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.manual_seed(0)
        net = get_segmentation_model(model, backbone, dataset_info(DATASET).num_class, has_aux_head(model, backbone))
        torch.save(net.state_dict(), path + '.part')
        os.replace(path + '.part', path)
    return path


# ---------------------------------------------------------------- running a command in this process

def _reset_logging():
    """Drop the handlers a command installed (its console handler writes to our redirected file)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()


def _free_device(cuda):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _last_error_line(path):
    with open(path, encoding='utf-8', errors='replace') as handle:
        lines = [line.strip() for line in handle if line.strip()]
    # argparse writes 'PROG: error: MESSAGE', PROG being this process's name, not the script's
    errors = [line[line.index('error: '):] for line in lines if line.startswith('error: ') or ': error: ' in line]
    return (errors or lines or ['(no output)'])[-1]


def call_main(module_name, argv, console_path):
    """Import `module_name` and call its `main(argv)` with stdout and stderr in `console_path`.

    Returns (seconds, error message or None, whether it stopped on a non-finite loss). Only strings leave the
    except blocks, so no traceback keeps the run's tensors alive."""
    error, non_finite = None, False
    start = time.perf_counter()
    with open(console_path, 'w', encoding='utf-8') as console, \
            contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        try:
            module = importlib.import_module(module_name)
            module.main(argv)
        except NonFiniteLossError as stop:
            error, non_finite = stop.describe(), True
        except StopCommand as stop:
            error = stop.describe()
        except SystemExit as stop:  # argparse's refusal: its message is in the console file
            if stop.code not in (None, 0):
                console.flush()
                error = _last_error_line(console_path)
        except Exception as failure:  # a failed run is a row of the table, not the end of the check
            traceback.print_exc(file=console)
            error = f'{type(failure).__name__}: {(str(failure).strip().splitlines() or [""])[0]}'
        finally:
            _reset_logging()
    return time.perf_counter() - start, error, non_finite


# ---------------------------------------------------------------- reading a run's records

LOSS_VALUE = re.compile(r'\|\| ([^|:]+ Loss): ([^ |]+)')


def logged_losses(log_path):
    """Every loss value of the run's log lines ('Iters: ... || Task Loss: 1.2345 || ...')."""
    values = []
    if not os.path.isfile(log_path):
        return values
    with open(log_path, encoding='utf-8', errors='replace') as handle:
        for line in handle:
            if 'Iters: ' in line:
                values += [float(value) for _, value in LOSS_VALUE.findall(line)]
    return values


def timing_after_warmup(records, batch):
    """(seconds per iteration, images per second, timed iterations) over the records after the first, each
    weighted by its window's iterations; (None, None, 0) with fewer than two records."""
    records = sorted((r for r in records if r.get('seconds_per_iteration')), key=lambda r: r['iteration'])
    seconds = iterations = 0
    for previous, record in zip(records, records[1:], strict=False):
        window = record['iteration'] - previous['iteration']
        seconds += record['seconds_per_iteration'] * window
        iterations += window
    if not iterations:
        return None, None, 0
    per_iteration = seconds / iterations
    return per_iteration, batch / per_iteration, iterations


def measure_run(run, shapes, cuda):
    """Train one run in this process and read its records into a Row."""
    shutil.rmtree(run.folder, ignore_errors=True)
    os.makedirs(run.folder)
    _free_device(cuda)
    module_name = os.path.splitext(run.script.name)[0]
    wall, error, non_finite = call_main(module_name, run.argv, os.path.join(run.folder, 'console.txt'))
    row = Row(run, wall_seconds=wall, error=error)
    flags_path = os.path.join(run.folder, run.stem + FLAGS_SUFFIX)
    if os.path.isfile(flags_path):
        with open(flags_path, encoding='utf-8') as handle:
            row.amp = bool(json.load(handle)['environment']['amp'])
    records = read_history(os.path.join(run.folder, run.stem + HISTORY_SUFFIX))
    row.seconds_per_iteration, row.images_per_second, _ = timing_after_warmup(records, shapes.batch)
    peaks = [r['peak_memory_mb'] for r in records if r.get('peak_memory_mb') is not None]
    row.peak_mb = max(peaks) if peaks else None
    values = logged_losses(os.path.join(run.folder, run.stem + '_log.txt'))
    values += [value for r in records for value in r.get('losses', {}).values()]
    if non_finite:
        row.finite = False
    elif values:
        row.finite = all(math.isfinite(value) for value in values)
    if error is None and row.seconds_per_iteration is None:
        row.error = 'no timing records after the warm-up window (see console.txt)'
    _free_device(cuda)
    return row


LOG_STAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ')


def _stamp_of(line):
    match = LOG_STAMP.match(line)
    return datetime.datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S,%f') if match else None


def evaluation_loop_seconds(log_path):
    """Seconds between eval.py's log line that starts the evaluation and the first line after it (the table),
    from the log's time stamps; None when they are not there."""
    if not os.path.isfile(log_path):
        return None
    with open(log_path, encoding='utf-8', errors='replace') as handle:
        stamps = [(_stamp_of(line), line) for line in handle]
    start = next((i for i, (stamp, line) in enumerate(stamps) if stamp and 'Start validation' in line), None)
    if start is None:
        return None
    end = next((stamp for stamp, _ in stamps[start + 1:] if stamp), None)
    return (end - stamps[start][0]).total_seconds() if end else None


def measure_eval(row, shapes, eval_root, out, smoke, cuda):
    """eval.py on the eval root's full-size validation images with the student of `row`'s run."""
    run = row.run
    folder = os.path.join(out, 'eval')
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    model, backbone = shapes.student
    argv = ['--dataset', DATASET, '--data', eval_root, '--model', model, '--backbone', backbone,
            '--method', run.label, '--pretrained', checkpoint_paths(run.folder, run.stem)['latest'],
            '--save-dir', folder, '--workers', str(shapes.workers)]
    if smoke:
        argv.append('--no-cuda')
    _free_device(cuda)
    wall, error, _ = call_main('eval', argv, os.path.join(folder, 'console.txt'))
    result = EvalRow(f'eval.py ({run.label} student)', shapes.eval_images, shapes.image_size, wall_seconds=wall,
                     error=error)
    result.peak_mb = peak_memory_mb(torch.device('cuda' if cuda else 'cpu'))
    name = f'{model}_{backbone}_{DATASET}_{run.label}_val'
    loop = evaluation_loop_seconds(os.path.join(folder, name + '.txt'))
    if loop is not None:
        result.seconds_per_image = loop / shapes.eval_images
    json_path = os.path.join(folder, name + '.json')
    if os.path.isfile(json_path):
        with open(json_path, encoding='utf-8') as handle:
            result.miou = json.load(handle).get('mIoU')
    if error is None and result.seconds_per_image is None:
        result.error = "no time stamps of eval.py's evaluation loop in its log"
    _free_device(cuda)
    return result


# ---------------------------------------------------------------- the table

TRAIN_COLUMNS = ('script', 'amp', 'crop', 'batch', 's/it', 'img/s', 'peak MB', 'finite', 'h / 40k it', 'wall s',
                 'status')
EVAL_COLUMNS = ('command', 'images', 'size', 's/image', 'peak MB', 'mIoU', 'wall s', 'status')


def _cell(value, digits=None):
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if digits is not None:
        return f'{value:.{digits}f}'
    return str(value).replace('|', '/').replace('\n', ' ')[:240]


def _line(cells):
    return '| ' + ' | '.join(cells) + ' |'


def _header(columns):
    return [_line(columns), '|' + '---|' * len(columns)]


def train_line(row, batch):
    run = row.run
    amp = None if row.amp is None else ('on' if row.amp else 'off')
    return _line([run.script.name, _cell(amp), f'{run.crop}x{run.crop}', str(batch),
                  _cell(row.seconds_per_iteration, 4), _cell(row.images_per_second, 2), _cell(row.peak_mb, 0),
                  _cell(row.finite), _cell(row.paper_hours, 2), _cell(row.wall_seconds, 1),
                  'ok' if row.ok else _cell(row.error or 'non-finite loss')])


def eval_line(row):
    return _line([row.label, str(row.images), f'{row.size[0]}x{row.size[1]}', _cell(row.seconds_per_image, 4),
                  _cell(row.peak_mb, 0), _cell(row.miou, 3), _cell(row.wall_seconds, 1),
                  'ok' if row.ok else _cell(row.error)])


def write_markdown(report, batch):
    lines = ['# GPU check', ''] + [f'- {line}' for line in report.header] + [''] + _header(TRAIN_COLUMNS)
    lines += [train_line(row, batch) for row in report.rows]
    if report.eval_rows:
        lines += [''] + _header(EVAL_COLUMNS) + [eval_line(row) for row in report.eval_rows]
    if report.footer:
        lines += [''] + report.footer
    tmp = report.path + '.part'
    with open(tmp, 'w', encoding='utf-8') as handle:
        handle.write('\n'.join(lines) + '\n')
    os.replace(tmp, report.path)


def describe_device(smoke):
    if smoke:
        return f'device: CPU ({device_name(torch.device("cpu"))}, {torch.get_num_threads()} threads), --smoke'
    index = torch.cuda.current_device()
    precision = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16 with loss scaling'
    return (f'device: {torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda}; --amp runs in {precision})')


def describe_shapes(shapes):
    teacher, student = '/'.join(shapes.teacher), '/'.join(shapes.student)
    h, w = shapes.image_size
    return (f'torch {torch.__version__}; {h}x{w} training images ({shapes.train_images}), crops {shapes.crop} '
            f"(or a script's MIN_CROP), batch {shapes.batch}, {shapes.iters} iterations per run, timed after the "
            f'first {shapes.warmup}, validation every {shapes.warmup} on {shapes.val_images} images of '
            f'{shapes.val_size[0]}x{shapes.val_size[1]}; teacher {teacher} (fresh weights), student {student}; '
            f'eval.py on {shapes.eval_images} images of {h}x{w}')


# ---------------------------------------------------------------- main

class CheckFailed(StopCommand):
    """A run or the evaluation failed, or a loss was not finite."""


def _remove_bulk(out):
    """For the default temporary folder: drop the data, the teacher and the checkpoints, keep logs and tables."""
    shutil.rmtree(os.path.join(out, 'data'), ignore_errors=True)
    shutil.rmtree(os.path.join(out, 'teacher'), ignore_errors=True)
    for folder, _, files in os.walk(os.path.join(out, 'runs')):
        for name in files:
            if name.endswith('.pth'):
                os.remove(os.path.join(folder, name))


def main(argv=None):
    args = parse_args(argv)
    shapes = args.shapes
    cuda = not args.smoke
    started = time.perf_counter()
    temporary = args.out is None
    out = os.path.abspath(tempfile.mkdtemp(prefix='gpu_check_') if temporary else args.out)
    os.makedirs(out, exist_ok=True)
    header = [describe_device(args.smoke), describe_shapes(shapes)]
    for line in header:
        print(line, flush=True)
    print(f'output folder: {out}', flush=True)

    train_root, eval_root = make_data(out, shapes)
    teacher_file = make_teacher(out, shapes)
    print(f'data and teacher ready after {time.perf_counter() - started:.1f} s', flush=True)
    runs = plan_runs(args.scripts, shapes, args.smoke, out, train_root, teacher_file)

    report = Report(header=header, path=os.path.join(out, 'gpu_check.md'))
    print('\n'.join(_header(TRAIN_COLUMNS)), flush=True)
    for run in runs:
        row = measure_run(run, shapes, cuda)
        report.rows.append(row)
        print(train_line(row, shapes.batch), flush=True)
        write_markdown(report, shapes.batch)

    trained = next((row for row in report.rows if row.error is None), None)
    if trained is not None:
        result = measure_eval(trained, shapes, eval_root, out, args.smoke, cuda)
        report.eval_rows.append(result)
        print('\n' + '\n'.join(_header(EVAL_COLUMNS)) + '\n' + eval_line(result), flush=True)
        write_markdown(report, shapes.batch)
    # What the runs left allocated: a leak between in-process runs would raise the later rows' peaks.
    leftover = f'; CUDA memory still allocated: {torch.cuda.memory_allocated() / 2 ** 20:.0f} MB' if cuda else ''
    report.footer = [f'total {time.perf_counter() - started:.1f} s{leftover}']
    write_markdown(report, shapes.batch)
    print(f'{report.footer[0]}; table in {report.path}', flush=True)
    if temporary:
        _remove_bulk(out)

    failed = [row.run.label for row in report.rows if not row.ok]
    failed += [row.label for row in report.eval_rows if not row.ok]
    if trained is None:
        failed.append('eval.py (no run trained a student)')
    if failed:
        raise CheckFailed(f'failed: {", ".join(failed)} (their console.txt and logs are in {out}/runs, '
                          f'{out}/eval)')


if __name__ == '__main__':
    sys.exit(run_main(main))
