"""The loop's behaviour that needs no launcher, in this process: the first validation always writes a best
checkpoint, a run with nothing to distil builds no teacher, the optimizer flags, the records of a run's cost and
environment, and the launcher's environment (torchrun or SLURM)."""
import json

import pytest
import torch
from launch import common, load

from models.model_zoo import get_segmentation_model
from utils.distributed import launcher_environment
from utils.errors import UserError
from utils.train_loop import Trainer

pytestmark = pytest.mark.usefixtures('one_thread')
MOBILE = ['--model', 'psp_mobile', '--backbone', 'mobile', '--pretrained-base', 'None']


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
    root = toy_root('citys', num_train=4, num_val=2, size=(64, 96))
    work = tmp_path_factory.mktemp('loop')
    teacher = work / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(get_segmentation_model('deeplabv3_mobile', 'mobile', 19, False).state_dict(), teacher)
    return {'data': root, 'teacher': str(teacher)}


def test_first_validation_writes_a_best_checkpoint_even_at_zero(setup, tmp_path, monkeypatch):
    import train_baseline

    def zero(self, net):  # every validation scores 0 mIoU
        matrix = type('M', (), {'mat': torch.zeros(19, 19, dtype=torch.long), 'chance_miou': lambda self: 0.0})()
        return 0.0, 0.0, torch.zeros(19), matrix

    monkeypatch.setattr(Trainer, '_evaluate', zero)
    train_baseline.main(common(setup['data'], tmp_path, iters=2, val_per_iters=1) + MOBILE)
    stem = 'baseline_psp_mobile_mobile_citys'
    best = tmp_path / 'ckpt' / f'{stem}_best_model.pth'
    assert best.is_file()
    # the first validation's student: the second, also at 0, is not better
    history = [json.loads(line) for line in (tmp_path / 'logs' / f'{stem}_history.jsonl').read_text().splitlines()]
    assert [r['mIoU'] for r in history] == [0.0, 0.0]
    assert 'Best validation mIoU: 0.000' in (tmp_path / 'logs' / f'{stem}_log.txt').read_text()


def test_a_run_without_distillation_terms_builds_no_teacher(setup, tmp_path, monkeypatch):
    import train_mgd
    from utils import train_build
    built = []
    original = train_build.build_network
    monkeypatch.setattr(train_build, 'build_network', lambda *a, **k: built.append(a[:2]) or original(*a, **k))
    train_mgd.main(common(setup['data'], tmp_path, iters=1, skip_val=True) + [
        '--student-model', 'psp_mobile', '--student-backbone', 'mobile', '--student-pretrained-base', 'None',
        '--teacher-model', 'deeplabv3_mobile', '--teacher-backbone', 'mobile',
        '--teacher-pretrained', setup['teacher'], '--alpha-mgd', '0'])
    assert built == [('psp_mobile', 'mobile')]  # the student only
    flags = json.loads((tmp_path / 'logs' / 'mgd_psp_mobile_mobile_citys_flags.json').read_text())
    assert flags['teacher_built'] is False
    assert 'the teacher is not built' in (tmp_path / 'logs' / 'mgd_psp_mobile_mobile_citys_log.txt').read_text()


def test_records_carry_the_cost_and_the_environment(setup, tmp_path):
    import train_baseline
    train_baseline.main(common(setup['data'], tmp_path, iters=2, val_per_iters=1) + MOBILE)
    stem = 'baseline_psp_mobile_mobile_citys'
    flags = json.loads((tmp_path / 'ckpt' / f'{stem}_flags.json').read_text())
    environment = flags['environment']
    assert environment['device_type'] == 'cpu' and environment['processes'] == 1 and environment['amp'] is False
    assert environment['torch'] == torch.__version__ and environment['cuda'] is None and environment['device_name']
    history = [json.loads(line) for line in (tmp_path / 'logs' / f'{stem}_history.jsonl').read_text().splitlines()]
    for record in history:
        assert record['seconds_per_iteration'] > 0 and record['peak_memory_mb'] > 100
        assert record['images_per_second'] == pytest.approx(2 / record['seconds_per_iteration'], rel=1e-3)
    resume = load(tmp_path / 'ckpt' / f'{stem}_resume.pth')
    assert resume['train_seconds'] > 0
    log = (tmp_path / 'logs' / f'{stem}_log.txt').read_text()
    assert 'Total training time' in log and 'Device-hours: ' in log and 'peak memory: ' in log


@pytest.mark.parametrize('extra,fragment', [
    (['--optimizer', 'adamw', '--momentum', '0.9'], '--momentum is for --optimizer sgd'),
    (['--optimizer', 'adam'], '--optimizer'),
    (['--head-width', '256'], 'only deeplabv3 and psp'),
    (['--head-lr-mult', '0'], '--head-lr-mult'),
])
def test_optimizer_and_head_flags_refused(setup, tmp_path, capsys, extra, fragment):
    import train_baseline
    with pytest.raises(SystemExit) as exit_info:
        train_baseline.parse_args(common(setup['data'], tmp_path) + MOBILE + extra)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


def test_launcher_environment(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID'):
        monkeypatch.delenv(name, raising=False)
    assert launcher_environment() == (0, 1, None, 'none')
    monkeypatch.setenv('SLURM_PROCID', '5')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    assert launcher_environment() == (5, 8, 1, 'slurm')
    # torchrun's variables win when both are set (torchrun inside an allocation)
    monkeypatch.setenv('RANK', '2')
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '0')
    assert launcher_environment() == (2, 4, 0, 'torchrun')
    monkeypatch.setenv('WORLD_SIZE', 'four')
    with pytest.raises(UserError, match='WORLD_SIZE'):
        launcher_environment()
