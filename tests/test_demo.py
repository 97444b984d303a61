"""`make demo` at its smallest sizes: the same code path (toy data, the real train scripts, called in one
process instead of under torchrun, eval.py and its JSON files, the table and the pictures), a few iterations
each; and the pictures' text (whole class names, words set apart, titles never cut, tick labels apart),
measured in the font it is drawn in, without running the demo."""
import os
import re

import numpy as np
from PIL import Image

from dataset import DATASET_INFO
from utils.visualize import PAD, line_height, load_font, make_panel, text_width, weight_bars, wrap_words

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITYS = DATASET_INFO['citys']


class Finished:
    """What a demo run printed and its exit status."""

    def __init__(self, returncode, stdout):
        self.returncode, self.stdout = returncode, stdout


def run_demo(out, capsys):
    """`python -m utils.demo --smoke --in-process` in this process."""
    from utils import demo
    from utils.errors import run_main
    status = run_main(demo.main, ['--smoke', '--in-process', '--out', str(out)])
    return Finished(status, capsys.readouterr().out)


def test_demo_smoke_runs_end_to_end_and_reuses_its_results(tmp_path, capsys):
    out = tmp_path / 'demo'
    first = run_demo(out, capsys)
    assert first.returncode == 0, first.stdout[-3000:]
    rows = {m.group(1): m for m in re.finditer(
        r'^\| (Teacher|Baseline|CWD|HWD) \| (\S+) \| ([0-9.]+) \| ([0-9.]+) \| ([+-][0-9.]+)? ?\|$',
        first.stdout, re.M)}
    assert set(rows) == {'Teacher', 'Baseline', 'CWD', 'HWD'}, first.stdout[-3000:]
    assert rows['Teacher'].group(2) == 'deeplabv3/resnet18'
    assert {rows[m].group(2) for m in ('Baseline', 'CWD', 'HWD')} == {'deeplabv3_mobile/mobile'}
    for method in ('CWD', 'HWD'):
        gain = float(rows[method].group(3)) - float(rows['Baseline'].group(3))
        assert abs(float(rows[method].group(5)) - gain) < 2e-3
    for name in ('baseline_deeplabv3_resnet18_citys.pth', 'baseline_deeplabv3_mobile_mobile_citys.pth',
                 'cwd_deeplabv3_mobile_mobile_citys.pth', 'hwd_deeplabv3_mobile_mobile_citys.pth'):
        assert (out / 'ckpt' / name).is_file(), name
    # the table's numbers are eval.py's, read from the JSON file it writes
    assert (out / 'eval' / 'deeplabv3_mobile_mobile_citys_hwd_val.json').is_file()
    comparison = Image.open(out / 'comparison.png')
    weights = Image.open(out / 'hwd_weights.png')
    # two validation images, six columns (image | gt | teacher | baseline | CWD | HWD) of 96 pixels
    assert comparison.width >= 6 * 96 and comparison.height >= 2 * 48
    assert weights.width > 19 * 10 and weights.height > 2 * 100
    assert (out / 'results.md').read_text().count('\n') == 6

    # A second run trains and evaluates nothing again: every checkpoint and evaluation is reused.
    mtimes = {p: p.stat().st_mtime for p in (out / 'ckpt').iterdir()}
    second = run_demo(out, capsys)
    assert second.returncode == 0, second.stdout[-3000:]
    assert 'training' not in second.stdout and 'evaluating' not in second.stdout
    assert {p: p.stat().st_mtime for p in (out / 'ckpt').iterdir()} == mtimes
    assert second.stdout.count('| HWD |') == 1


# ---- the pictures' text --------------------------------------------------------------------------------------

def ink(picture, threshold=200):
    """H x W bools: the pixels darker than `threshold` in grey."""
    return np.asarray(picture.convert('L')) < threshold


def runs(flags):
    """[start, stop) of each run of True in a 1-D bool array."""
    padded = np.concatenate([[0], np.asarray(flags, np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def bar_colors(count):
    """Distinct colours no grey text can have (the Cityscapes palette has greys: building, pole)."""
    return [(40 + 10 * j, 230 - 5 * j, 100) for j in range(count)]


def bar(chart, color):
    """[x0, x1) of the bar filled with `color` (one image), and the y of its foot (the axis)."""
    ys, xs = np.nonzero(np.all(np.asarray(chart) == np.asarray(color, np.uint8), axis=2))
    assert xs.size, f'no bar of colour {color}'
    return int(xs.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_weight_chart_writes_every_class_name_in_full():
    font = load_font()
    colors = bar_colors(CITYS.num_class)
    weights = np.linspace(0.3, 1.7, CITYS.num_class)[None]
    present = np.arange(CITYS.num_class)[None] % 3 != 0  # some names in grey
    chart = weight_bars(weights, CITYS.class_names, colors, present)
    written = np.asarray(chart.convert('L')) < 245  # grey names too
    assert 'traffic light' in CITYS.class_names
    for j, name in enumerate(CITYS.class_names):
        x0, x1, axis = bar(chart, colors[j])
        # Written upwards under its bar: the ink is as long as the whole name measured in the font.
        rows = np.flatnonzero(written[axis + 1:, x0 - 3:x1 + 3].any(axis=1))
        assert rows.size and abs((rows.max() - rows.min() + 1) - text_width(name, font)) <= 1, name


def test_chart_title_words_are_set_apart_and_tick_labels_do_not_overlap():
    font = load_font()
    colors = bar_colors(3)
    _, top, _, bottom = font.getbbox('0.123456789')
    for largest, ticks in ((1.1, 2), (1.6, 3)):  # ticks 0 and 1; then also the largest weight, far enough from 1
        chart = weight_bars(np.array([[0.2, 1.0, largest]]), ['road', 'sidewalk', 'building'], colors,
                            title='HWD channel weights')
        title = runs(ink(chart)[:PAD + line_height(font)].any(axis=0))
        gaps = [start - stop for (_, stop), (start, _) in zip(title[:-1], title[1:], strict=True)]
        # Two spaces, each at least 4 pixels of blank (the font's own space is 3 at size 13, so that
        # letters' side bearings make words run together); letters of a word at most 2 apart.
        assert sum(gap >= 4 for gap in gaps) == 2 and max(gap for gap in gaps if gap < 4) <= 2, gaps
        x0, _, axis = bar(chart, colors[0])
        labels = ink(chart)[PAD + line_height(font) + 1:axis + line_height(font), :x0 - 3 - PAD - 1]
        blocks = runs(labels.any(axis=1))  # the tick labels, left of the tick marks, top to bottom
        assert len(blocks) == ticks and all(stop - start <= bottom - top + 1 for start, stop in blocks), blocks


def test_panel_titles_wrap_or_widen_their_column_and_are_never_cut():
    font = load_font()
    # A title with a word wider than its picture widens the column (the picture centred under it) and is
    # wrapped at its space; each line's ink is as wide as the line measured in the font.
    width = max(text_width('ground', font), text_width('truth', font))
    panel = make_panel([('ground truth', np.zeros((10, 10, 3), np.uint8))])
    assert panel.width == width + 2 * PAD
    title = ink(panel, threshold=245)[:-10]  # faint anti-aliased edges too
    lines = runs(title.any(axis=1))
    assert len(lines) == 2
    for (top, bottom), word in zip(lines, ('ground', 'truth'), strict=True):
        used = np.flatnonzero(title[top:bottom].any(axis=0))
        assert abs((used.max() - used.min() + 1) - text_width(word, font)) <= 1, word
    assert runs(ink(panel)[-1]) == [((width + 2 * PAD - 10) // 2, (width + 2 * PAD - 10) // 2 + 10)]
    # A long title over a wide picture is wrapped at spaces, the picture keeps its width.
    long_title = 'the student trained with holistic weighted distillation'
    panel = make_panel([(long_title, np.zeros((20, 120, 3), np.uint8))])
    lines = wrap_words(long_title, font, 120 - 2 * PAD)
    assert panel.width == 120 and len(lines) >= 2 and ' '.join(lines) == long_title
    assert len(runs(ink(panel)[:-20].any(axis=1))) == len(lines)
