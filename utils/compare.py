"""Seed sweeps summarised: the validation mIoU of training runs, averaged over seeds, per method and setting,
with the gain of each method over the baseline and a plot of every run's mIoU curve.

    python -m utils.compare DIR [DIR ...] [--baseline METHOD] [--plot PATH | --no-plot]

Every training script writes, in its --log-dir and (when it is another folder) in its --save-dir, a
`{stem}_flags.json` (method, networks, data set, seed and every flag) and a `{stem}_history.jsonl` (one record
per validation: iteration, pixAcc, mIoU, per-class IoU). Each flags file with its history file is one run; the
two copies of a run (log folder and save folder) count once. A flags file without a history (a run stopped
before its first validation) is skipped with a warning.

**A sweep over seeds.** The file names hold the method, the networks and the data set but not the seed, so give
each seed its own folders (and each setting of a method, e.g. two --lambda-hwd values, its own too; with the
default folders, ./ckpt and ./logs/, every run overwrites the files of the previous one):

    for seed in 0 1 2; do
        python train_baseline.py --seed $seed --log-dir runs/s$seed --save-dir runs/s$seed ...
        python train_cwd.py --seed $seed --log-dir runs/s$seed --save-dir runs/s$seed ...
        python train_hwd.py --seed $seed --log-dir runs/s$seed --save-dir runs/s$seed ...
    done
    python -m utils.compare runs/s0 runs/s1 runs/s2      # or runs/s*

**Reading the output.** One table per data set and student network. A row is a method, or a method and a setting of
it when its runs differ in a flag that changes the run (other than --seed; flags that only say where and how a run
executes, such as folders, workers or the number of processes, do not count): the row is then labelled with those
flags, e.g. `hwd (lambda_hwd=1.0)`. Columns: the number of runs and their seeds, the iteration of the last
validation, the final mIoU (last validation) and the best mIoU (best validation) as the mean over the seeds ± their
sample standard deviation (n - 1; '-' for one seed), and the gain: the mean final mIoU of the row minus that of the
--baseline method (default 'baseline'), ± its standard error sqrt(s_m^2 / n_m + s_b^2 / n_b) from the two rows'
standard deviations and run counts. A gain within about two standard errors of zero is not told apart from seed
noise. Then the cost of the row, means over its runs: seconds per training iteration (validation excluded),
device-hours (processes x training hours up to the last validation) and peak memory in MB (the largest process's;
CUDA allocated on GPUs, resident on the CPU), from the records training writes ('-' for runs written before it
recorded them): a gain is comparable only with its cost. A seed marked `*` belongs to an unfinished run: its last
validation comes before that of the other runs of its group with the same --max-iterations, or before the last
validation its flags ask for; it still counts in the means. A second table gives the same gain per class (mean final
IoU of the row minus the baseline's, classes in the order of the data set). Without a baseline in a group the tables
show the means only, and say so. The PNG (--plot, default ./compare_miou.png) has one panel per table: the
validation mIoU of every run against the iteration, one colour per row.
"""
import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from utils.errors import UserError, run_main
from utils.results import EXECUTION_FLAGS, FILE_FLAGS, FLAGS_SUFFIX, HISTORY_SUFFIX, read_history
from utils.scripts import method_order

# Flags that do not tell settings apart: those of utils.results.EXECUTION_FLAGS (where and how a run executes),
# --seed, which a sweep varies, and --dataset, which the group holds (the flags file's data set, an alias such as
# coco_stuff_164k resolved).
SWEEP_FLAGS = EXECUTION_FLAGS | {'seed', 'dataset'}
# Row order: the baseline first, then the methods by the year of their paper (the scripts' YEAR); others after
# these, by name.
METHOD_ORDER = method_order()
RECORD_KEYS = ('method', 'model', 'backbone', 'dataset', 'seed', 'flags')
COLUMN_LABEL = 24  # longer row labels head a per-class column as [n], spelled out above the table


# ---------------------------------------------------------------- runs on disk

@dataclass
class Run:
    """One training run: its flags file's record and its validation history."""

    flags_path: str
    stem: str
    record: dict
    history: list
    unfinished: str = ''  # why the run counts as unfinished, or ''

    @property
    def method(self):
        return str(self.record['method'])

    @property
    def seed(self):
        return self.record['seed']

    @property
    def flags(self):
        return self.record['flags']

    @property
    def group(self):
        """(data set, student model, student backbone)."""
        return str(self.record['dataset']), str(self.record['model']), str(self.record['backbone'])

    @property
    def final(self):
        return self.history[-1]

    @property
    def final_miou(self):
        return self.final['mIoU']

    @property
    def best_miou(self):
        return max(r['mIoU'] for r in self.history)

    def _timed_windows(self):
        """[(seconds per iteration, iterations)] of the validation windows whose record carries its cost."""
        windows, previous = [], 0
        for record in self.history:
            per_iteration = record.get('seconds_per_iteration')
            if isinstance(per_iteration, (int, float)) and record['iteration'] > previous:
                windows.append((float(per_iteration), record['iteration'] - previous))
            previous = record['iteration']
        return windows

    @property
    def seconds_per_iteration(self):
        """Mean wall time of a training iteration over the recorded windows (None for runs without the cost)."""
        windows = self._timed_windows()
        iterations = sum(n for _, n in windows)
        return sum(t * n for t, n in windows) / iterations if iterations else None

    @property
    def device_hours(self):
        """Processes x training hours up to the last validation (None for runs without the cost)."""
        windows = self._timed_windows()
        if not windows:
            return None
        processes = self.record.get('environment', {}).get('processes', self.record.get('world_size', 1))
        return sum(t * n for t, n in windows) * int(processes) / 3600

    @property
    def peak_memory_mb(self):
        peaks = [r['peak_memory_mb'] for r in self.history if isinstance(r.get('peak_memory_mb'), (int, float))]
        return max(peaks) if peaks else None

    def setting(self):
        """The run-defining flags and their values, without the seed (checkpoints by file name)."""
        values = {}
        for key, value in self.flags.items():
            if key in SWEEP_FLAGS:
                continue
            if key in FILE_FLAGS and isinstance(value, str):
                value = os.path.basename(os.path.normpath(value))
            values[key] = value
        return values


def _load_json(path, what):
    try:
        with open(path, encoding='utf-8') as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise UserError(f'{path}: cannot read it as {what} ({error}); remove it or pass another folder') from None


def _load_run(flags_path):
    """The run of one flags file (its history empty when it has no validation yet)."""
    record = _load_json(flags_path, 'a flags file written by training')
    missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
    if missing or not isinstance(record['flags'], dict):
        raise UserError(f'{flags_path}: not a flags file written by training (missing {", ".join(missing) or "flags"})'
                        '; remove it or pass another folder')
    stem = os.path.basename(flags_path)[:-len(FLAGS_SUFFIX)]
    history_path = os.path.join(os.path.dirname(flags_path), stem + HISTORY_SUFFIX)
    try:
        history = read_history(history_path)
    except (OSError, ValueError) as error:
        raise UserError(f'{history_path}: cannot read it as a history file written by training ({error}); '
                        'remove it or pass another folder') from None
    if any(not isinstance(r, dict) or 'iteration' not in r or 'mIoU' not in r for r in history):
        raise UserError(f'{history_path}: a record without "iteration" or "mIoU"; not a history file written by '
                        'training')
    history = sorted((r for r in history if r['mIoU'] is not None), key=lambda r: r['iteration'])
    return Run(flags_path, stem, record, history)


def find_runs(dirs, warn):
    """The runs in `dirs` (each a folder of flags and history files), the copies of a run counted once."""
    runs = {}
    for folder in dirs:
        if not os.path.isdir(folder):
            raise UserError(f'{folder}: no such folder; pass the --log-dir or --save-dir of training runs')
        names = sorted(name for name in os.listdir(folder) if name.endswith(FLAGS_SUFFIX))
        if not names:
            below = [name for name in sorted(os.listdir(folder))
                     if os.path.isdir(os.path.join(folder, name))
                     and any(n.endswith(FLAGS_SUFFIX) for n in os.listdir(os.path.join(folder, name)))]
            hint = f'; its subfolders {", ".join(below[:3])}{", ..." if len(below) > 3 else ""} do: pass them' \
                if below else ''
            raise UserError(f'{folder}: no training run in it (no *{FLAGS_SUFFIX} file); pass the --log-dir or '
                            f'--save-dir of training runs{hint}')
        for name in names:
            run = _load_run(os.path.join(folder, name))
            # The log-dir and save-dir copies of a run hold the same record; keep the longer history.
            key = (run.stem, json.dumps(run.record, sort_keys=True))
            if key not in runs or len(run.history) > len(runs[key].history):
                runs[key] = run
    for run in runs.values():
        if not run.history:
            history = run.stem + HISTORY_SUFFIX
            why = 'no validation recorded in' if os.path.exists(os.path.join(os.path.dirname(run.flags_path),
                                                                               history)) else 'no'
            warn(f'skipping {run.flags_path}: {why} {history} (the run stopped before its first validation, or '
                 'ran with --skip-val)')
    return [run for run in runs.values() if run.history]


# ---------------------------------------------------------------- rows and statistics

def _shown(value):
    if isinstance(value, list):
        return ','.join(str(v) for v in value)
    return str(value)


@dataclass
class Row:
    """The runs of one method with one setting, within a group."""

    method: str
    label: str
    runs: list = field(default_factory=list)

    @property
    def seeds(self):
        return [run.seed for run in self.runs]

    def mean_of(self, value):
        """Mean of value(run) over the runs where it is known, or None."""
        values = [v for v in (value(run) for run in self.runs) if v is not None]
        return statistics.fmean(values) if values else None

    def stats(self, value):
        """(mean, sample std or None) of value(run) over the runs."""
        values = [value(run) for run in self.runs]
        spread = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), spread

    def class_means(self):
        """{class: mean final IoU over the runs that scored it} (None when none did)."""
        means = {}
        for name in class_order(self.runs):
            values = [run.final.get('IoU', {}).get(name) for run in self.runs]
            values = [v for v in values if v is not None]
            means[name] = statistics.fmean(values) if values else None
        return means


def class_order(runs):
    """Class names in the order the histories list them (the data set's order)."""
    names = {}
    for run in runs:
        for name in run.final.get('IoU', {}):
            names.setdefault(name, None)
    return list(names)


def _method_rank(method):
    return (METHOD_ORDER.index(method), '') if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def make_rows(runs):
    """Rows of one group: a method's runs split by the run-defining flags (other than the seed) that differ."""
    by_method = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    rows = []
    for method in sorted(by_method, key=_method_rank):
        method_runs = by_method[method]
        settings = [run.setting() for run in method_runs]
        keys = sorted(set().union(*settings))
        differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
        split = {}
        for run, setting in zip(method_runs, settings, strict=True):
            label = method
            if differing:
                label += ' (' + ', '.join(f'{k}={_shown(setting.get(k))}' for k in differing) + ')'
            split.setdefault(label, Row(method, label)).runs.append(run)
        for label in sorted(split):
            row = split[label]
            row.runs.sort(key=lambda r: (r.seed, r.flags_path))
            rows.append(row)
    return rows


def mark_unfinished(runs):
    """Set `run.unfinished` for runs whose last validation is before that of the other runs of the group with
    the same --max-iterations, or before the last validation their own flags ask for."""
    latest = {}
    for run in runs:
        key = run.flags.get('max_iterations')
        latest[key] = max(latest.get(key, 0), run.final['iteration'])
    for run in runs:
        final = run.final['iteration']
        max_iterations, every = run.flags.get('max_iterations'), run.flags.get('val_per_iters')
        expected = latest[max_iterations]
        if isinstance(max_iterations, int) and isinstance(every, int) and every > 0:
            expected = max(expected, max_iterations - max_iterations % every)
        run.unfinished = f'last validation at iteration {final}, expected {expected}' if final < expected else ''


def gain(row, base):
    """(mean final mIoU of row minus base's, its standard error or None)."""
    mean_r, std_r = row.stats(lambda r: r.final_miou)
    mean_b, std_b = base.stats(lambda r: r.final_miou)
    error = None
    if std_r is not None and std_b is not None:
        error = math.sqrt(std_r ** 2 / len(row.runs) + std_b ** 2 / len(base.runs))
    return mean_r - mean_b, error


def pick_baseline(rows, baseline):
    """(the baseline row or None, a note when there is none): --baseline names a method or a row label."""
    matches = [row for row in rows if row.label == baseline] or [row for row in rows if row.method == baseline]
    if len(matches) == 1:
        return matches[0], ''
    if not matches:
        return None, f'no {baseline!r} runs in this group (--baseline {baseline}): no gains shown'
    labels = ', '.join(repr(row.label) for row in matches)
    return None, f'--baseline {baseline} matches several rows ({labels}): no gains shown; pass one of the labels'


# ---------------------------------------------------------------- text tables

def format_table(header, lines, right):
    """Columns padded to their widest cell; `right[i]` right-aligns column i."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]

    def one(cells):
        return '  '.join(str(c).rjust(w) if r else str(c).ljust(w)
                         for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return '\n'.join([one(header), '  '.join('-' * w for w in widths)] + [one(cells) for cells in lines])


def _mean_spread(mean, spread, signed=False):
    text = f'{mean:+.2f}' if signed else f'{mean:.2f}'
    return f'{text} ± {spread:.2f}' if spread is not None else f'{text} ± -'


def _number(value, spec):
    return '-' if value is None else format(value, spec)


def _iterations(row):
    finals = sorted({run.final['iteration'] for run in row.runs})
    return str(finals[0]) if len(finals) == 1 else f'{finals[0]}-{finals[-1]}'


def group_report(group, rows, baseline):
    """The text for one group: the summary table, notes, the per-class table."""
    dataset, model, backbone = group
    runs = [run for row in rows for run in row.runs]
    base, note = pick_baseline(rows, baseline)
    out = [f'== {dataset}, student {model}/{backbone}: {len(runs)} runs, {len(rows)} rows']
    if base is not None:
        out.append(f'mIoU in %: mean ± sample std over the seeds; gain: mean final mIoU minus {base.label!r}, '
                   '± its standard error sqrt(s_m^2/n_m + s_b^2/n_b)')
    else:
        out.append('mIoU in %: mean ± sample std over the seeds')
    header = ['method', 'runs', 'seeds', 'last iter', 'final mIoU', 'best mIoU']
    if base is not None:
        header.append(f'gain over {base.label}')
    header += ['s/it', 'device-h', 'peak MB']
    lines = []
    for row in rows:
        seeds = ' '.join(f'{run.seed}{"*" if run.unfinished else ""}' for run in row.runs)
        cells = [row.label, len(row.runs), seeds, _iterations(row),
                 _mean_spread(*row.stats(lambda r: r.final_miou)), _mean_spread(*row.stats(lambda r: r.best_miou))]
        if base is not None:
            cells.append('(baseline)' if row is base else _mean_spread(*gain(row, base), signed=True))
        cells += [_number(row.mean_of(lambda r: r.seconds_per_iteration), '.3f'),
                  _number(row.mean_of(lambda r: r.device_hours), '.2f'),
                  _number(row.mean_of(lambda r: r.peak_memory_mb), '.0f')]
        lines.append(cells)
    out.append(format_table(header, lines, [False, True, False] + [True] * (len(header) - 3)))
    out.append('cost: s/it = mean wall seconds of a training iteration (validation excluded), device-h = processes x '
               'training hours up to the last validation, peak MB = the largest process\'s peak memory (CUDA '
               'allocated on GPUs, resident on the CPU); means over the runs; - where the runs did not record it')
    for row in rows:
        seeds = [run.seed for run in row.runs]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            out.append(f'note: {row.label} has seed {", ".join(map(str, repeated))} more than once (a repeated run '
                       'in another folder?); each run counts')
    for run in runs:
        if run.unfinished:
            out.append(f'* unfinished ({run.unfinished}), counted in the means: {run.flags_path}')
    teachers = set()
    for run in runs:
        first = run.history[0].get('teacher')
        if first and first.get('mIoU') is not None:
            name = f"{run.flags.get('teacher_model', '?')}/{run.flags.get('teacher_backbone', '?')}"
            teachers.add((name, round(first['mIoU'], 3)))
    for name, miou in sorted(teachers):
        out.append(f'teacher {name}: mIoU {miou:.2f} (first validation of a distillation run)')
    if note:
        out.append(f'note: {note}')
    out.append('')
    out.append(class_table(rows, base))
    return '\n'.join(out)


def class_table(rows, base):
    """Per-class gains over the baseline (classes as rows, rows of the summary as columns), or the per-class
    means when there is no baseline."""
    others = [row for row in rows if row is not base]
    if base is not None and not others:
        return 'per-class gains: no method besides the baseline'
    columns = others if base is not None else rows
    names = class_order([run for row in rows for run in row.runs])
    base_means = base.class_means() if base is not None else None
    column_means = [row.class_means() for row in columns]
    lines = []
    for name in names:
        cells = [name]
        for means in column_means:
            value = means.get(name)
            if base_means is not None:
                reference = base_means.get(name)
                cells.append('-' if value is None or reference is None else f'{value - reference:+.2f}')
            else:
                cells.append('-' if value is None else f'{value:.2f}')
        lines.append(cells)
    if base is not None:
        title = [f'per-class IoU gain over {base.label} (mean final IoU minus the baseline\'s, points of %)']
    else:
        title = ['per-class final IoU (mean over the seeds, %)']
    header = ['class']
    for index, row in enumerate(columns, 1):
        if len(row.label) <= COLUMN_LABEL:
            header.append(row.label)
        else:  # a long label would make every line of the table as wide
            header.append(f'[{index}]')
            title.append(f'  [{index}] {row.label}')
    return '\n'.join(title) + '\n' + format_table(header, lines, [False] + [True] * len(columns))


# ---------------------------------------------------------------- plot

PANEL_WIDTH, PANEL_HEIGHT = 1400, 600
# Tableau's ten colours: distinct, and readable on white.
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
GRID, AXES = (225, 225, 225), (0, 0, 0)


def nice_ticks(low, high, count=6, integer=False):
    """Round tick values from at or below `low` to at or above `high`, about `count` steps of 1, 2, 2.5 or 5
    x 10^k (`integer`: steps of at least 1)."""
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    raw = max((high - low) / count, 1 if integer else 0)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def _tick_text(value, step):
    """A tick's number with as many decimals as the step needs; thousands as 'k' on a step of thousands."""
    if step >= 1000 and step % 1000 == 0:
        return f'{int(round(value)) // 1000}k' if value else '0'
    decimals = next(d for d in range(7) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6)
    return f'{value:.{decimals}f}'


def _fit(draw, text, font, width):
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + '…', font=font) > width:
        text = text[:-1]
    return text + '…'


def _wrap(draw, text, font, width, most=3):
    """`text` in at most `most` lines of `width` pixels, broken at spaces (the last line cut when needed)."""
    lines = []
    for word in text.split(' '):
        if lines and draw.textlength(f'{lines[-1]} {word}', font=font) <= width:
            lines[-1] += ' ' + word
        else:
            lines.append(word)
    if len(lines) > most:
        lines[most - 1:] = [' '.join(lines[most - 1:])]
    return [_fit(draw, line, font, width) for line in lines]


def _fonts():
    return {name: ImageFont.load_default(size=size) for name, size in (('tick', 16), ('label', 17), ('small', 15),
                                                                         ('title', 19))}


def draw_axes(image, box, rows, first_iteration, title, fonts):
    """The curves of `rows` from `first_iteration` on, in the plot area `box` = (left, top, right, bottom) of
    `image`, with ticks, grid, axis titles and a title above."""
    left, top, right, bottom = box
    draw = ImageDraw.Draw(image)
    runs = [run for row in rows for run in row.runs]
    shown = [r for run in runs for r in run.history if r['iteration'] >= first_iteration]
    x_ticks = nice_ticks(first_iteration, max(r['iteration'] for run in runs for r in run.history), integer=True)
    y_ticks = nice_ticks(min(r['mIoU'] for r in shown), max(r['mIoU'] for r in shown))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def point(iteration, miou):
        return ((iteration - x_low) / (x_high - x_low) * (right - left),
                (y_high - miou) / (y_high - y_low) * (bottom - top))

    for value in x_ticks:
        x = left + point(value, y_low)[0]
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.line([(x, bottom), (x, bottom + 6)], fill=AXES)
        draw.text((x, bottom + 9), _tick_text(value, x_ticks[1] - x_ticks[0]), fill=AXES, font=fonts['tick'],
                  anchor='mt')
    for value in y_ticks:
        y = top + point(x_low, value)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.line([(left - 6, y), (left, y)], fill=AXES)
        draw.text((left - 10, y), _tick_text(value, y_ticks[1] - y_ticks[0]), fill=AXES, font=fonts['tick'],
                  anchor='rm')

    # The lines go on a copy of the plot area, pasted back: whatever leaves the area is clipped. The markers
    # (only of points in the area) go on top, unclipped, so that those on the frame stay whole.
    area = image.crop((left, top, right + 1, bottom + 1))
    pen = ImageDraw.Draw(area)
    markers = []
    for index, row in enumerate(rows):
        colour = COLOURS[index % len(COLOURS)]
        for run in row.runs:
            records = run.history
            start = next((i for i, r in enumerate(records) if r['iteration'] >= x_low), len(records))
            points = [point(r['iteration'], r['mIoU']) for r in records[max(start - 1, 0):]]
            if len(points) > 1:
                pen.line(points, fill=colour, width=2, joint='curve')
            inside = [(left + x, top + y) for x, y in points[1 if start else 0:]]
            if len(records) <= 40:
                markers += [(x, y, 3, colour, None) for x, y in inside]
            if run.unfinished and start < len(records):  # a ring around its last point
                markers.append((*inside[-1], 7, None, colour))
    image.paste(area, (left, top))
    draw.rectangle([left, top, right, bottom], outline=AXES)
    for x, y, radius, fill, outline in markers:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=outline, width=2)

    draw.text(((left + right) // 2, top - 12), title, fill=AXES, font=fonts['label'], anchor='mb')
    draw.text(((left + right) // 2, bottom + 34), 'iteration', fill=AXES, font=fonts['label'], anchor='mt')
    label = 'validation mIoU (%)'
    size = draw.textbbox((0, 0), label, font=fonts['label'])
    text = Image.new('RGB', (size[2] + 4, size[3] + 4), 'white')
    ImageDraw.Draw(text).text((2, 2), label, fill=AXES, font=fonts['label'])
    text = text.rotate(90, expand=True)
    image.paste(text, (left - 78, (top + bottom - text.height) // 2))


def legend_width(groups, fonts):
    """Width of the legend column: the longest entry of any group, within bounds."""
    draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    longest = max(draw.textlength(f'{row.label} ({len(row.runs)})', font=fonts['small'])
                  for _, rows in groups for row in rows)
    return int(min(340, max(150, longest + 38 + 24)))


def draw_panel(image, top, group, rows, legend, fonts):
    """One group: the whole run and the second half zoomed in, side by side, and the legend on the right."""
    draw = ImageDraw.Draw(image)
    dataset, model, backbone = group
    draw.text((PANEL_WIDTH // 2, top + 20), f'{dataset}, student {model}/{backbone}: validation mIoU of every run',
              fill=AXES, font=fonts['title'], anchor='mm')
    plot_top, plot_bottom = top + 82, top + PANEL_HEIGHT - 70
    legend_left = PANEL_WIDTH - legend
    width = (legend_left - 20 - 2 * 90) // 2
    last = max(run.final['iteration'] for row in rows for run in row.runs)
    # The second half of training: where the methods separate, on a scale that shows a point of mIoU.
    half = nice_ticks(0, last, integer=True)
    half = half[len(half) // 2] if len(half) > 2 else 0
    views = [(0, 'whole run'), (half, f'from iteration {_tick_text(half, half)} on, zoomed in')]
    for index, (first, title) in enumerate(views):
        left = 90 + index * (width + 90)
        draw_axes(image, (left, plot_top, left + width, plot_bottom), rows, first, title, fonts)

    x0, y = legend_left, plot_top
    draw.text((x0, y - 12), 'row (runs)', fill=AXES, font=fonts['label'], anchor='lb')
    y += 8
    for index, row in enumerate(rows):
        lines = _wrap(draw, f'{row.label} ({len(row.runs)})', fonts['small'], legend - 38 - 24)
        if y + 18 * len(lines) > top + PANEL_HEIGHT - 20:
            draw.text((x0 + 38, y), f'… {len(rows) - index} more', fill=AXES, font=fonts['small'])
            break
        draw.line([(x0, y + 8), (x0 + 30, y + 8)], fill=COLOURS[index % len(COLOURS)], width=3)
        for line in lines:
            draw.text((x0 + 38, y), line, fill=AXES, font=fonts['small'])
            y += 18
        y += 6
    if any(run.unfinished for row in rows for run in row.runs):
        y += 8
        draw.ellipse([x0 + 8, y + 1, x0 + 22, y + 15], outline=AXES, width=2)
        draw.text((x0 + 38, y), 'unfinished run', fill=AXES, font=fonts['small'])


def plot(groups, path):
    """Write the PNG of every group's curves, one panel below the other."""
    fonts = _fonts()
    legend = legend_width(groups, fonts)
    image = Image.new('RGB', (PANEL_WIDTH, PANEL_HEIGHT * len(groups)), 'white')
    for index, (group, rows) in enumerate(groups):
        draw_panel(image, index * PANEL_HEIGHT, group, rows, legend, fonts)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path, format='PNG')
    except OSError as error:
        raise UserError(f'--plot {path}: cannot write it ({error.strerror or error}); pass another path or '
                        '--no-plot') from None


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m utils.compare',
        description='Mean and spread over seeds of the validation mIoU of training runs, per method, with the '
                    'gain over the baseline, and a plot of every run. Each DIR is a --log-dir or --save-dir of '
                    'training runs.')
    parser.add_argument('dirs', nargs='+', metavar='DIR', help='folders holding *_flags.json / *_history.jsonl')
    parser.add_argument('--baseline', default='baseline', metavar='METHOD',
                        help="method (or row label) the gains are measured against (default: 'baseline')")
    parser.add_argument('--plot', default='./compare_miou.png', metavar='PATH',
                        help='PNG of the mIoU curves (default: ./compare_miou.png)')
    parser.add_argument('--no-plot', action='store_true', help='write no PNG')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    def warn(message):
        print(f'warning: {message}', file=sys.stderr)

    runs = find_runs(args.dirs, warn)
    if not runs:
        raise UserError(f'no run with a validation in {", ".join(args.dirs)}; wait for the first validation of '
                        'the runs, or pass other folders')
    by_group = {}
    for run in runs:
        by_group.setdefault(run.group, []).append(run)
    groups = []
    for group in sorted(by_group):
        mark_unfinished(by_group[group])
        groups.append((group, make_rows(by_group[group])))
    emit('\n\n'.join(group_report(group, rows, args.baseline) for group, rows in groups))
    if not args.no_plot:
        plot(groups, args.plot)
        emit(f'\nplot: {args.plot}')
    return groups


def emit(text):
    """Print to stdout; when a reader such as `head` has closed it, the rest goes nowhere (no traceback)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == '__main__':
    sys.exit(run_main(main))
