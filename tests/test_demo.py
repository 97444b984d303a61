"""`make demo` at its smallest sizes: the same code path (toy data, the real train scripts under torchrun,
eval.py, the table and the pictures), a few iterations each."""
import os
import re
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out):
    return subprocess.run([sys.executable, '-m', 'utils.demo', '--smoke', '--out', str(out)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def test_demo_smoke_runs_end_to_end_and_reuses_its_results(tmp_path):
    out = tmp_path / 'demo'
    first = run_demo(out)
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
    comparison = Image.open(out / 'comparison.png')
    weights = Image.open(out / 'hwd_weights.png')
    # two validation images, six columns (image | gt | teacher | baseline | CWD | HWD) of 96 pixels
    assert comparison.width >= 6 * 96 and comparison.height >= 2 * 48
    assert weights.width > 19 * 10 and weights.height > 2 * 100
    assert (out / 'results.md').read_text().count('\n') == 6

    # A second run trains nothing again: every checkpoint and evaluation is reused.
    mtimes = {p: p.stat().st_mtime for p in (out / 'ckpt').iterdir()}
    second = run_demo(out)
    assert second.returncode == 0, second.stdout[-3000:]
    assert 'training' not in second.stdout and 'evaluating' not in second.stdout
    assert {p: p.stat().st_mtime for p in (out / 'ckpt').iterdir()} == mtimes
    assert second.stdout.count('| HWD |') == 1
