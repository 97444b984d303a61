"""`python -m utils.compare`: statistics over seeds, rows per setting, unfinished runs, the baseline, copies of a
run, user errors and the plot, on flags and history files written with the helpers training uses."""
import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from utils import compare
from utils.errors import run_main
from utils.results import FLAGS_SUFFIX, HISTORY_SUFFIX, write_history, write_json

CLASSES = ('road', 'car', 'bicycle')  # deliberately not in alphabetical order


def write_run(folder, method, seed, mious, every=100, max_iterations=None, flags=None, ious=None, dataset='citys',
              model='deeplabv3', backbone='resnet18', copies=()):
    """A run's flags and history files in `folder` (and in each of `copies`), as training writes them: a
    validation every `every` iterations with the mIoU values `mious`; the last one has the per-class `ious`."""
    folder = str(folder)
    stem = f'{method}_{model}_{backbone}_{dataset}'
    all_flags = {'dataset': dataset, 'crop_size': [512, 512], 'batch_size': 8, 'lr': 0.01, 'seed': seed,
                 'max_iterations': max_iterations or every * len(mious), 'val_per_iters': every,
                 'save_dir': folder, 'log_dir': folder, 'workers': 4, 'local_rank': 0, 'rank': 0, 'world_size': 1,
                 'distributed': False}
    all_flags.update(flags or {})
    record = {'method': method, 'model': model, 'backbone': backbone, 'dataset': dataset, 'seed': seed,
              'world_size': 1, 'flags': all_flags}
    history = []
    for index, miou in enumerate(mious):
        iou = dict(ious) if ious is not None and index == len(mious) - 1 else {name: miou for name in CLASSES}
        history.append({'iteration': every * (index + 1), 'pixAcc': 90.0, 'mIoU': miou, 'IoU': iou,
                        'losses': {'Task Loss': 0.5}})
    if method != 'baseline':
        history[0]['teacher'] = {'pixAcc': 95.0, 'mIoU': 80.0}
    for place in (folder, *map(str, copies)):
        write_json(os.path.join(place, stem + FLAGS_SUFFIX), record)
        write_history(os.path.join(place, stem + HISTORY_SUFFIX), history)
    return os.path.join(folder, stem + FLAGS_SUFFIX)


def run_compare(args, capsys):
    """(exit status, stdout, stderr) of the command run in this process."""
    stderr = io.StringIO()
    status = run_main(compare.main, [str(a) for a in args], stderr=stderr)
    captured = capsys.readouterr()
    return status, captured.out, captured.err + stderr.getvalue()


def rows_by_label(groups, group=('citys', 'deeplabv3', 'resnet18')):
    return {row.label: row for key, rows in groups for row in rows if key == group}


# Final mIoU of seeds 0, 1, 2; an earlier validation of seed 0 scores higher than its last (best != final).
SWEEP = {'baseline': [70.0, 71.0, 72.0], 'cwd': [72.0, 73.0, 77.0], 'hwd': [74.0, 75.0, 76.0]}


@pytest.fixture
def sweep(tmp_path):
    """Three methods x three seeds, one folder per seed."""
    for method, finals in SWEEP.items():
        for seed, final in enumerate(finals):
            write_run(tmp_path / f's{seed}', method, seed, [final - 10, final + 1.5 if seed == 0 else final, final])
    return [tmp_path / f's{seed}' for seed in range(3)]


def test_means_stds_and_gains_match_hand_computed_values(sweep, tmp_path, capsys):
    status, out, err = run_compare([*sweep, '--no-plot'], capsys)
    assert status == 0, err
    rows = rows_by_label(compare.main([*map(str, sweep), '--no-plot']))
    capsys.readouterr()
    assert list(rows) == ['baseline', 'cwd', 'hwd']
    base, cwd, hwd = rows['baseline'], rows['cwd'], rows['hwd']
    assert base.seeds == cwd.seeds == hwd.seeds == [0, 1, 2]
    # baseline 70 71 72: mean 71, sample std 1; cwd 72 73 77: mean 74, std sqrt(14 / 2); hwd 74 75 76: 75, 1
    assert base.stats(lambda r: r.final_miou) == pytest.approx((71.0, 1.0))
    assert cwd.stats(lambda r: r.final_miou) == pytest.approx((74.0, math.sqrt(7)))
    assert hwd.stats(lambda r: r.final_miou) == pytest.approx((75.0, 1.0))
    # best: seed 0 peaked 1.5 above its final -> baseline 71.5 72 71 ... mean (71.5 + 71 + 72) / 3
    assert base.stats(lambda r: r.best_miou) == pytest.approx((71.5, 0.5))
    assert compare.gain(cwd, base) == pytest.approx((3.0, math.sqrt(7 / 3 + 1 / 3)))
    assert compare.gain(hwd, base) == pytest.approx((4.0, math.sqrt(1 / 3 + 1 / 3)))
    table = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (['cwd'], ['hwd'])}
    assert '74.00 ± 2.65' in table['cwd'] and '+3.00 ± 1.63' in table['cwd']
    assert '75.00 ± 1.00' in table['hwd'] and '+4.00 ± 0.82' in table['hwd']
    baseline_line = next(line for line in out.splitlines() if line.startswith('baseline '))
    assert '0 1 2' in baseline_line and '71.00 ± 1.00' in baseline_line and '71.50 ± 0.50' in baseline_line
    assert 'sample std' in out and 'sqrt(s_m^2/n_m + s_b^2/n_b)' in out  # the header says what ± means
    assert 'teacher' in out and '80.00' in out
    assert '*' not in out  # every run finished


def test_one_seed_has_no_spread(tmp_path, capsys):
    write_run(tmp_path, 'baseline', 0, [60.0, 70.0])
    write_run(tmp_path, 'hwd', 0, [61.0, 72.5])
    status, out, err = run_compare([tmp_path, '--no-plot'], capsys)
    assert status == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (['baseline'], ['hwd'])}
    assert '70.00 ± -' in lines['baseline'] and '72.50 ± -' in lines['hwd'] and '+2.50 ± -' in lines['hwd']


def test_runs_differing_in_a_run_defining_flag_are_separate_rows(tmp_path, capsys):
    for seed in (0, 1):
        for weight, final in ((1.0, 70.0 + seed), (3.0, 72.0 + seed)):
            # Different folders, workers and teacher folder (same file name) do not split a row.
            folder = tmp_path / f'hwd{weight}_s{seed}'
            write_run(folder, 'hwd', seed, [final], flags={
                'lambda_hwd': weight, 'workers': seed * 4,
                'teacher_pretrained': f'/place{seed}/deeplabv3_resnet101_citys_best_model.pth'})
        write_run(tmp_path / f'base_s{seed}', 'baseline', seed, [69.0 + seed])
    write_run(tmp_path / 'ade', 'baseline', 0, [30.0], dataset='ade20k')
    dirs = sorted(p for p in tmp_path.iterdir())
    groups = compare.main([*map(str, dirs), '--no-plot'])
    out = capsys.readouterr().out
    assert [key for key, _ in groups] == [('ade20k', 'deeplabv3', 'resnet18'), ('citys', 'deeplabv3', 'resnet18')]
    rows = rows_by_label(groups)
    assert list(rows) == ['baseline', 'hwd (lambda_hwd=1.0)', 'hwd (lambda_hwd=3.0)']
    assert rows['hwd (lambda_hwd=1.0)'].seeds == [0, 1]
    assert rows['hwd (lambda_hwd=3.0)'].stats(lambda r: r.final_miou)[0] == pytest.approx(72.5)
    assert compare.gain(rows['hwd (lambda_hwd=3.0)'], rows['baseline'])[0] == pytest.approx(3.0)
    assert 'hwd (lambda_hwd=3.0)' in out and '== ade20k' in out and '== citys' in out


def test_unfinished_runs_are_flagged(tmp_path, capsys):
    for seed in range(3):
        stop = 3 if seed == 2 else 4  # seed 2 was stopped after its third validation
        write_run(tmp_path / f's{seed}', 'baseline', seed, [60.0, 65.0, 68.0, 70.0][:stop], max_iterations=400)
    # A longer schedule in the same group is another setting, not a reason to flag the others.
    write_run(tmp_path / 'long', 'baseline', 0, [60.0] * 8, max_iterations=800)
    status, out, err = run_compare([*sorted(tmp_path.iterdir()), '--no-plot'], capsys)
    assert status == 0, err
    line = next(line for line in out.splitlines() if line.startswith('baseline (max_iterations=400)'))
    assert '0 1 2*' in line and '300-400' in line
    long_line = next(line for line in out.splitlines() if line.startswith('baseline (max_iterations=800)'))
    assert '*' not in long_line
    flagged = [line for line in out.splitlines() if line.startswith('* unfinished')]
    assert len(flagged) == 1 and str(tmp_path / 's2') in flagged[0] and 'iteration 300, expected 400' in flagged[0]
    # Two settings of the baseline: --baseline picks one by its label.
    assert "--baseline baseline matches several rows ('baseline (max_iterations=400)'" in out
    status, out, err = run_compare([*sorted(tmp_path.iterdir()), '--no-plot', '--baseline',
                                    'baseline (max_iterations=400)'], capsys)
    assert status == 0 and 'gain over baseline (max_iterations=400)' in out


def test_runs_all_stopped_early_are_flagged_from_their_own_flags(tmp_path, capsys):
    for seed in range(2):
        write_run(tmp_path / f's{seed}', 'baseline', seed, [60.0, 65.0], max_iterations=1000)
    status, out, err = run_compare([tmp_path / 's0', tmp_path / 's1', '--no-plot'], capsys)
    assert status == 0, err
    assert '0* 1*' in out and out.count('* unfinished (last validation at iteration 200, expected 1000)') == 2


def test_missing_baseline_prints_means_without_gains(sweep, capsys):
    status, out, err = run_compare([*sweep, '--baseline', 'mgd', '--no-plot'], capsys)
    assert status == 0, err
    assert "no 'mgd' runs in this group" in out and 'gain over' not in out and '±' in out
    assert 'per-class final IoU (mean over the seeds' in out
    # Another method as the baseline: gains against it.
    status, out, err = run_compare([*sweep, '--baseline', 'cwd', '--no-plot'], capsys)
    assert status == 0, err
    hwd = next(line for line in out.splitlines() if line.startswith('hwd '))
    assert '+1.00 ± 1.63' in hwd and 'gain over cwd' in out


def test_copies_in_log_dir_and_save_dir_count_once(tmp_path, capsys):
    for seed in range(2):
        write_run(tmp_path / f'logs{seed}', 'baseline', seed, [70.0 + seed], copies=[tmp_path / f'ckpt{seed}'])
    # The same stem with another seed is another run (one folder per seed).
    dirs = [tmp_path / 'logs0', tmp_path / 'ckpt0', tmp_path / 'logs1', tmp_path / 'ckpt1']
    rows = rows_by_label(compare.main([*map(str, dirs), '--no-plot']))
    capsys.readouterr()
    assert rows['baseline'].seeds == [0, 1]
    assert rows['baseline'].stats(lambda r: r.final_miou)[0] == pytest.approx(70.5)


def test_flags_without_history_is_skipped_with_a_warning(tmp_path, capsys):
    write_run(tmp_path / 'a', 'baseline', 0, [70.0])
    killed = write_run(tmp_path / 'b', 'hwd', 0, [71.0], copies=[tmp_path / 'c'])
    for folder in ('b', 'c'):
        os.remove(tmp_path / folder / ('hwd_deeplabv3_resnet18_citys' + HISTORY_SUFFIX))
    status, out, err = run_compare([tmp_path / 'a', tmp_path / 'b', tmp_path / 'c', '--no-plot'], capsys)
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith('warning: skipping')]
    assert len(warnings) == 1 and killed in warnings[0]  # once for both copies
    assert 'hwd' not in [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize('case', ['empty', 'missing', 'only_unvalidated'])
def test_user_errors_exit_2_with_a_message(tmp_path, capsys, case):
    folder = tmp_path / 'runs'
    if case == 'empty':
        (folder / 'sub').mkdir(parents=True)
        write_run(folder / 'sub', 'baseline', 0, [70.0])
    if case == 'only_unvalidated':
        write_run(folder, 'baseline', 0, [70.0])
        os.remove(folder / ('baseline_deeplabv3_resnet18_citys' + HISTORY_SUFFIX))
    status, out, err = run_compare([folder, '--no-plot'], capsys)
    assert status == 2 and 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: ') and str(folder) in last
    expected = {'empty': f'no training run in it (no *{FLAGS_SUFFIX} file)', 'missing': 'no such folder',
                'only_unvalidated': 'no run with a validation'}[case]
    assert expected in last
    if case == 'empty':
        assert 'subfolders sub do' in last


def test_a_broken_history_file_is_a_user_error(tmp_path, capsys):
    write_run(tmp_path, 'baseline', 0, [70.0])
    path = tmp_path / ('baseline_deeplabv3_resnet18_citys' + HISTORY_SUFFIX)
    path.write_text(path.read_text()[:-20])
    status, _, err = run_compare([tmp_path, '--no-plot'], capsys)
    assert status == 2 and str(path) in err and 'Traceback' not in err


def test_plot_is_a_png_of_the_expected_size_with_curves(sweep, tmp_path, capsys):
    write_run(tmp_path / 's0', 'baseline', 0, [30.0, 31.0], dataset='ade20k')  # a second panel
    path = tmp_path / 'out' / 'curves.png'
    status, out, err = run_compare([*sweep, '--plot', path], capsys)
    assert status == 0, err
    assert f'plot: {path}' in out
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert image.size == (compare.PANEL_WIDTH, 2 * compare.PANEL_HEIGHT)
        pixels = np.asarray(image.convert('RGB')).astype(int)
    # Inside each panel's left plot area: coloured pixels (the curves; text, grid and frame are grey).
    for top in (0, compare.PANEL_HEIGHT):
        area = pixels[top + 100:top + compare.PANEL_HEIGHT - 90, 100:500]
        saturated = (area.max(axis=2) - area.min(axis=2)) > 80
        assert saturated.sum() > 200
    assert (pixels[:, -30:] == 255).all()  # a blank right margin: the legend is not cut


def test_no_plot_writes_no_file(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_compare([*sweep, '--no-plot'], capsys)
    assert status == 0 and 'plot:' not in out and not (tmp_path / 'compare_miou.png').exists()


def test_per_class_gains_in_the_order_of_the_history(tmp_path, capsys):
    # Class IoU at the last validation; bicycle unseen (null) in one baseline seed, in every cwd seed.
    base = [{'road': 90.0, 'car': 60.0, 'bicycle': 20.0}, {'road': 92.0, 'car': 62.0, 'bicycle': None}]
    cwd = [{'road': 93.0, 'car': 65.0, 'bicycle': None}, {'road': 93.0, 'car': 67.0, 'bicycle': None}]
    hwd = [{'road': 91.0, 'car': 70.0, 'bicycle': 26.0}, {'road': 95.0, 'car': 70.0, 'bicycle': 30.0}]
    for seed in range(2):
        for method, ious in (('baseline', base), ('cwd', cwd), ('hwd', hwd)):
            write_run(tmp_path / f's{seed}', method, seed, [50.0], ious=ious[seed])
    status, out, err = run_compare([tmp_path / 's0', tmp_path / 's1', '--no-plot'], capsys)
    assert status == 0, err
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('per-class IoU gain over baseline'))
    assert lines[start + 1].split() == ['class', 'cwd', 'hwd']
    table = [line.split() for line in lines[start + 3:start + 6]]
    # road: cwd 93 - 91 = +2, hwd 93 - 91 = +2; car: 66 - 61 = +5, 70 - 61 = +9; bicycle: -, 28 - 20 = +8
    assert table == [['road', '+2.00', '+2.00'], ['car', '+5.00', '+9.00'], ['bicycle', '-', '+8.00']]


def test_long_row_labels_head_the_per_class_columns_by_number(tmp_path, capsys):
    for value in (0.0, 1.0):
        write_run(tmp_path / f'h{value}', 'hwd', 0, [50.0 + value], flags={'shift': value, 'activation': value > 0})
    write_run(tmp_path / 'h0.0', 'baseline', 0, [49.0])
    status, out, err = run_compare([tmp_path / 'h0.0', tmp_path / 'h1.0', '--no-plot'], capsys)
    assert status == 0, err
    assert '  [1] hwd (activation=False, shift=0.0)' in out and '  [2] hwd (activation=True, shift=1.0)' in out
    header = next(line for line in out.splitlines() if line.startswith('class '))
    assert header.split() == ['class', '[1]', '[2]']


def test_nice_ticks():
    assert compare.nice_ticks(0, 40000, integer=True) == [0, 10000, 20000, 30000, 40000]
    assert compare.nice_ticks(64.3, 75.1) == [64, 66, 68, 70, 72, 74, 76]
    assert compare.nice_ticks(0, 3, integer=True) == [0, 1, 2, 3]
    assert compare.nice_ticks(2.5, 2.5) == [2.0, 2.2, 2.4, 2.6, 2.8, 3.0]


def test_rows_show_the_cost_of_their_runs(tmp_path, capsys):
    """Seconds per iteration (weighted by the iterations of each record's window), device-hours (processes x
    training hours up to the last validation) and peak memory per row, means over the runs; '-' for runs
    written before the cost was recorded."""
    folders = []
    for seed, (first, second, peak) in enumerate([(0.5, 1.0, 900.0), (1.5, 2.0, 1100.0)]):
        folder = tmp_path / f's{seed}'
        folders.append(folder)
        path = write_run(folder, 'hwd', seed, [50.0, 60.0], every=100)
        record = compare._load_json(path, 'flags')
        record['environment'] = {'processes': 4}
        write_json(path, record)
        history_path = path[:-len(FLAGS_SUFFIX)] + HISTORY_SUFFIX
        history = compare.read_history(history_path)
        history[0].update(seconds_per_iteration=first, peak_memory_mb=peak / 2)
        history[1].update(seconds_per_iteration=second, peak_memory_mb=peak)
        write_history(history_path, history)
    write_run(tmp_path / 's0', 'baseline', 0, [40.0, 45.0], every=100)  # written before the cost was recorded
    runs = {(run.method, run.seed): run for run in compare.find_runs(folders, warn=lambda m: None)}
    assert runs['hwd', 0].seconds_per_iteration == pytest.approx(0.75)
    assert runs['hwd', 0].device_hours == pytest.approx((0.5 * 100 + 1.0 * 100) * 4 / 3600)
    assert runs['hwd', 0].peak_memory_mb == 900.0
    assert runs['baseline', 0].seconds_per_iteration is None and runs['baseline', 0].device_hours is None
    status, out, err = run_compare([*folders, '--no-plot'], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert next(line for line in lines if line.startswith('method')).split()[-4:] == ['s/it', 'device-h', 'peak', 'MB']
    # hwd, the mean of two runs: s/it (0.75 + 1.75) / 2, device-hours (0.1667 + 0.3889) / 2, peak (900 + 1100) / 2
    assert next(line for line in lines if line.startswith('hwd ')).split()[-3:] == ['1.250', '0.28', '1000']
    assert next(line for line in lines if line.startswith('baseline ')).split()[-3:] == ['-', '-', '-']
