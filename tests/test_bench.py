"""The benchmarks in their smallest settings: the tables have the rows and the numbers they must (timings are
only checked to be positive; nothing here is timed)."""
import json
import statistics

import pytest
import torch

from bench import bench_cirkdv2, bench_cross, bench_dsd_gcn_afdcd, bench_train, bench_zoo
from bench.table import extra_flags, parse_markdown_table, script_argv, smallest_crop
from models.model_zoo import build_segmentation_model, has_aux_head
from utils.flops import count_flops, count_params
from utils.scripts import training_scripts

pytestmark = pytest.mark.usefixtures('one_thread')

# CIRKDv2's counts (winycg/CIRKD, 19 classes) of the two networks the zoo test lists.
CIRKDV2 = {('psp_mobile', 'mobilenetv3_small', '128'): '2,589,747', ('deeplabv3', 'resnet18', '512'): '22,762,918'}


def _table(capsys):
    return parse_markdown_table(capsys.readouterr().out)


def test_zoo_table_counts(capsys):
    bench_zoo.main(['--models', 'psp_mobile:mobilenetv3_small,deeplabv3:resnet18', '--size', '64x64',
                    '--jobs', '1'])
    rows = _table(capsys)
    # deeplabv3 on ResNet-18 in both head widths (HWD's 128, CIRKDv2's 512), then the PSP on MobileNetV3
    assert [(r['network'], r['backbone'], r['head width']) for r in rows] == [
        ('deeplabv3', 'resnet18', '128'), ('deeplabv3', 'resnet18', '512'), ('psp_mobile', 'mobilenetv3_small', '128')]
    for row in rows:
        model, backbone, width = row['network'], row['backbone'], int(row['head width'])
        with torch.device('meta'):
            net = build_segmentation_model(model, backbone, 19, has_aux_head(model, backbone), head_width=width)
        assert row['params'] == f'{count_params(net):,}'
        assert row['GMACs 64x64'] == f'{count_flops(net, (1, 3, 64, 64)) / 1e9:.2f}'
        assert float(row['GMACs 64x64']) > 0
        assert row['output stride'] == '/8'
        assert row['feature channels'] == str(width)
        reference = CIRKDV2.get((model, backbone, row['head width']))
        assert row['CIRKDv2 params'] == (reference or '')
        assert row['match'] == ('=' if reference else '')


def test_zoo_references_name_networks_of_the_zoo():
    configurations = set(bench_zoo.configurations())
    assert set(bench_zoo.CIRKDV2_PARAMS) <= configurations
    assert bench_zoo.match_cell(10, 10) == '=' and bench_zoo.match_cell(12, 10) == '+2'
    assert bench_zoo.match_cell(10, None) == ''


def test_smallest_crops_follow_the_teacher_stride():
    scripts = training_scripts()
    cnn, segformer = ('deeplabv3_mobile', 'mobile'), ('segformer', 'MiT_B0')
    for name in ('skd', 'ifvd'):
        assert smallest_crop(scripts[name], cnn) == 512
        assert smallest_crop(scripts[name], segformer) == 256
    assert smallest_crop(scripts['kd'], cnn) == 0
    assert extra_flags(scripts['hwd'], quick=False)[:1] == ['--activation']
    assert '--pixel-memory-size' in extra_flags(scripts['cirkd'], quick=True)
    assert '--pixel-memory-size' not in extra_flags(scripts['cirkd'], quick=False)


def test_cross_table_ratio(capsys):
    bench_cross.main(['--methods', 'kd', '--students', 'psp_mobile:mobilenetv3_small', '--iters', '1',
                      '--warmup', '0', '--crop', '32', '--batch', '2', '--threads', '1'])
    rows = _table(capsys)
    assert len(rows) == 1
    row = rows[0]
    assert (row['method'], row['student'], row['crop, batch']) == ('kd', 'psp_mobile:mobilenetv3_small', '32, 2')
    assert (row['same-family teacher'], row['cross-family teacher']) == ('deeplabv3_mobile:mobile', 'segformer:MiT_B0')
    same, cross, ratio = float(row['same s/it']), float(row['cross s/it']), float(row['cross / same'])
    assert same > 0 and cross > 0 and ratio > 0
    assert ratio == pytest.approx(cross / same, abs=0.01 + 1e-4 * ratio / min(same, cross))


def test_dsd_gcn_afdcd_table(capsys):
    bench_dsd_gcn_afdcd.main(['--smoke', '--threads', '1'])
    rows = _table(capsys)
    assert [(row['term'], row['candidate']) for row in rows] == [
        ('Af-DCD (FD + CTR)', 'OmniContrastiveFeatureLoss'), ('Af-DCD (FD + CTR)', 'original algorithm'),
        ('DSD (PSD + CSD)', 'CriterionDoubleSimKD'), ('DSD (PSD + CSD)', 'original algorithm')] + [
        ('GCN', name) for _ in range(2) for name in ('GCN (scaled_dot_product_attention)',
                                                     'original algorithm (explicit affinity)')]
    for ours, original in zip(rows[::2], rows[1::2], strict=True):
        assert ours['shape'] == original['shape'] and original['x original'] == '1.00'
        ours_ms, original_ms = float(ours['median (ms)']), float(original['median (ms)'])
        assert ours_ms > 0 and original_ms > 0
        assert float(ours['x original']) == pytest.approx(ours_ms / original_ms, abs=0.01 + 0.1 * ours_ms / original_ms)
        assert ours['peak (MB)'] == '-'  # the CPU profiler is left out of the smoke run
    # the original GCN keeps its 256 x 256 affinity per image (0.26 MB) for the backward pass
    gcn_rows = rows[4:]
    for images, ours, original in zip((1, 2), gcn_rows[::2], gcn_rows[1::2], strict=True):
        assert float(original['saved (MB)']) >= round(images * 256 ** 2 * 4 / 1e6, 1)
        assert float(ours['saved (MB)']) < float(original['saved (MB)']) / 2


def test_train_table_loop_against_bare_step(capsys):
    bench_train.main(['--scripts', 'kd', '--iters', '1', '--warmup', '1', '--repeats', '1', '--crop', '32',
                      '--batch', '2', '--threads', '1', '--in-process'])
    rows = _table(capsys)
    assert [row['script'] for row in rows] == ['kd']
    row = rows[0]
    assert (row['crop, batch'], row['timed its']) == ('32, 2', '1')
    bare, loop = float(row['bare s/it median']), float(row['loop s/it median'])
    assert bare > 0 and loop > 0
    assert float(row['loop / bare median'].split('x')[0]) == pytest.approx(loop / bare, rel=0.01)


def test_train_child_writes_its_steps(toy_root, tmp_path):
    """The measuring child (run in a process of its own by the benchmark): the bare step of the baseline script,
    one timed iteration after the warm-up."""
    data = toy_root('citys', num_train=4, num_val=1, size=(64, 128))
    script = training_scripts()['baseline']
    argv = script_argv(script, ('psp_mobile', 'mobilenetv3_small'), None, None, str(data), 32, 2, 3)
    out = tmp_path / 'result.json'
    bench_train.main(['--child', 'bare', '--script', 'baseline', '--argv', json.dumps(argv), '--out', str(out),
                      '--warmup', '1', '--threads', '1'])
    result = json.loads(out.read_text())
    assert len(result['steps']) == 2 and min(result['steps']) > 0
    assert result['median'] == statistics.median(result['steps']) and result['peak_rss_mb'] > 0


def test_train_refuses_a_large_crop_below_min_crop(capsys):
    with pytest.raises(SystemExit) as raised:
        bench_train.parse_args(['--scripts', 'skd', '--large-crop', '256'])
    assert raised.value.code == 2
    assert 'skd needs at least 512' in capsys.readouterr().err


def test_cirkdv2_table_ratios_and_memory(capsys):
    bench_cirkdv2.main(['--smoke', '--batches', '1,2', '--repeats', '1', '--inner', '1'])
    out = capsys.readouterr().out
    rows = parse_markdown_table(out)
    assert [row['batch'] for row in rows] == ['1', '2']
    for row in rows:
        for ours, original, ratio in (('all terms', 'original', 'x original'),
                                      ('mini-batch c2c', 'original loop', 'x original loop')):
            mine, theirs = float(row[ours]), float(row[original])
            assert mine >= 0 and theirs > 0
            # the ratio of the unrounded times: within the times' rounding (0.005 ms) and its own
            low, high = (mine - 0.005) / (theirs + 0.005), (mine + 0.005) / (theirs - 0.005)
            assert low - 0.005 <= float(row[ratio]) <= high + 0.005
    # the queues at CIRKDv2's defaults: 10000 x 512 x 4 bytes; 19 x (20000 + 2000) x 512 x 4 bytes
    assert '| 512 x 1024 crop, stride 8 (Cityscapes) | 512 | 20.5 |' in out
    assert '| Cityscapes | 19 | DeepLabV3-R101 | 512 | 778 | 78 | 856 |' in out
