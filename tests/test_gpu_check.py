"""bench/gpu_check.py: the plan at the paper's shapes, the refusals, the reading of a run's records, and the CPU
smoke run end to end (the real scripts and eval.py, in one process)."""
import math
from collections import Counter

import pytest
import torch
from launch import PYTHON, must_succeed, run

from bench import gpu_check
from utils.scripts import training_scripts

# Two scripts keep the smoke test short (the plans above cover every script and the smallest crops).
SMOKE_SUBSET = ('baseline', 'hwd')


def flag_values(argv):
    """{flag: the value after it} of a command line (flags without a value are left out)."""
    return {flag: value for flag, value in zip(argv, argv[1:], strict=False)
            if flag.startswith('--') and not value.startswith('--')}


def test_plan_at_the_papers_shapes(tmp_path):
    args = gpu_check.parse_args([], cuda_available=True)
    assert args.shapes == gpu_check.GPU_SHAPES
    runs = gpu_check.plan_runs(args.scripts, args.shapes, False, str(tmp_path), 'DATA', 'TEACHER.pth')
    scripts = training_scripts()
    assert Counter(r.script.method for r in runs) == {m: 2 if m in gpu_check.FP32_TOO else 1 for m in scripts}
    for method in gpu_check.FP32_TOO:
        assert sorted(r.amp for r in runs if r.script.method == method) == [False, True]
    assert len({r.folder for r in runs}) == len(runs)
    for r in runs:
        flags = flag_values(r.argv)
        assert flags['--crop-size'] == '512,512' and flags['--batch-size'] == '8', r.label
        assert flags['--data'] == 'DATA' and flags['--max-iterations'] == str(args.shapes.iters)
        assert flags['--val-per-iters'] == str(args.shapes.warmup)
        assert ('--amp' in r.argv) == r.amp and '--no-cuda' not in r.argv and '--skip-val' not in r.argv
        if r.script.distillation:
            assert (flags['--teacher-model'], flags['--teacher-backbone']) == ('deeplabv3', 'resnet101')
            assert (flags['--student-model'], flags['--student-backbone']) == ('deeplabv3', 'resnet18')
            assert flags['--teacher-pretrained'] == 'TEACHER.pth'
        else:
            assert (flags['--model'], flags['--backbone']) == ('deeplabv3', 'resnet18')
        for flag in r.script.recommended_flags:
            assert flag in r.argv
        # the quick flags shrink a method for tiny data; the paper's shapes use the defaults
        assert not [flag for flag in r.script.quick_flags if flag.startswith('--') and flag in r.argv]


def test_smoke_plan_respects_min_crop(tmp_path):
    args = gpu_check.parse_args(['--smoke'], cuda_available=False)
    runs = gpu_check.plan_runs(args.scripts, args.shapes, True, str(tmp_path), 'DATA', 'TEACHER.pth')
    assert Counter(r.script.method for r in runs) == {m: 1 for m in training_scripts()}
    for r in runs:
        assert '--no-cuda' in r.argv
        assert r.crop == max(args.shapes.crop, r.script.min_crop)
        assert flag_values(r.argv)['--crop-size'] == f'{r.crop},{r.crop}'


@pytest.mark.parametrize('argv, cuda, words', [
    ([], False, ['--smoke', 'GPU']),
    (['--smoke', '--scripts', 'baseline,nosuch'], False, ['nosuch', *training_scripts()]),
    (['--smoke', '--iters', '3', '--warmup', '2'], False, ['--iters 3', '--warmup 2']),
])
def test_refusals(argv, cuda, words, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(argv, cuda_available=cuda)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_refuses_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(['--scripts', 'baseline'])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert '--smoke' in err and 'GPU' in err


def test_timing_drops_the_first_window():
    records = [{'iteration': 8, 'seconds_per_iteration': 2.0}, {'iteration': 16, 'seconds_per_iteration': 0.5},
               {'iteration': 20, 'seconds_per_iteration': 0.2}]
    per_iteration, images, timed = gpu_check.timing_after_warmup(records, batch=8)
    assert timed == 12 and math.isclose(per_iteration, (8 * 0.5 + 4 * 0.2) / 12)
    assert math.isclose(images, 8 / per_iteration)
    assert gpu_check.timing_after_warmup(records[:1], batch=8) == (None, None, 0)


def test_logged_losses_reads_every_term(tmp_path):
    log = tmp_path / 'log.txt'
    log.write_text('2026-01-01 00:00:00,000 utils.train_loop INFO: Iters: 1/2 || Lr: 0.010000 || Task Loss: 1.5000 '
                   '|| HWD Loss: nan || Cost Time: 0:00:01 || Estimated Time: 0:00:01\n'
                   '2026-01-01 00:00:01,000 utils.train_loop INFO: Start validation at iteration 1\n')
    values = gpu_check.logged_losses(log)
    assert values[0] == 1.5 and math.isnan(values[1]) and len(values) == 2


def table_rows(text, first_cell):
    return [[cell.strip() for cell in line.strip().strip('|').split('|')]
            for line in text.splitlines() if line.startswith(f'| {first_cell}')]


@pytest.mark.slow
def test_smoke_run(tmp_path):
    out = tmp_path / 'out'
    proc = run([PYTHON, '-m', 'bench.gpu_check', '--smoke', '--scripts', ','.join(SMOKE_SUBSET), '--out', str(out)],
               tmp_path, timeout=300)
    must_succeed(proc)
    assert 'device: CPU' in proc.stdout
    markdown = (out / 'gpu_check.md').read_text()
    columns = gpu_check.TRAIN_COLUMNS
    rows = table_rows(markdown, 'train_')
    assert rows == table_rows(proc.stdout, 'train_')  # printed as it went, the same as the file
    assert sorted(row[0] for row in rows) == sorted(f'train_{m}.py' for m in SMOKE_SUBSET)  # one row each
    for row in rows:
        cells = dict(zip(columns, row, strict=True))
        assert cells['amp'] == 'off' and cells['finite'] == 'yes' and cells['status'] == 'ok', row
        assert float(cells['s/it']) > 0 and float(cells['img/s']) > 0 and float(cells['peak MB']) > 0
        assert cells['crop'] == '64x64'
    (eval_row,) = table_rows(markdown, 'eval.py')
    cells = dict(zip(gpu_check.EVAL_COLUMNS, eval_row, strict=True))
    assert cells['status'] == 'ok' and float(cells['s/image']) > 0 and cells['size'] == '64x128'
