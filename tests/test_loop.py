"""The loop's behaviour that needs no launcher, in this process: the first validation always writes a best
checkpoint, a resumed run keeps its bookkeeping (best mIoU, the teacher's scores and warnings, history, iteration),
the teacher check warns when it should and only then, a run with nothing to distil builds no teacher, the records
of a run's cost and environment, SIGTERM (status 143 and the resume file), the refusals (one image per micro-batch
on the CPU, the optimizer flags), and the launcher's environment (torchrun or SLURM)."""
import io
import json
import os
import signal

import pytest
import torch
from launch import assert_same_tensors, common, load, run_in_process

from models.model_zoo import get_segmentation_model
from utils.distributed import launcher_environment
from utils.errors import UserError, run_main
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


class Scores:
    """Stands in for `Trainer._evaluate`: the next mIoU of the student or of the teacher, and the calls made."""

    def __init__(self, student, teacher, chance=0.1):
        self.student, self.teacher, self.chance = list(student), list(teacher), chance
        self.calls = []

    def __call__(self, trainer, net):
        kind = 'teacher' if net is trainer.teacher else 'student'
        self.calls.append(kind)
        miou = getattr(self, kind).pop(0)
        matrix = type('Matrix', (), {'chance_miou': lambda _: self.chance})()
        return miou + 0.2, miou, torch.full((19,), miou, dtype=torch.float64), matrix


def test_resume_restores_the_bookkeeping(setup, tmp_path, monkeypatch):
    """A KD run validated at iterations 2 and 4 (student mIoU 50 then 70, the teacher 60), killed after the resume
    file of iteration 4, resumed to 6 (student 65): the resumed run knows the best (70: iteration 6 is not a new
    best, the best checkpoint stays iteration 4's), the teacher's scores (not evaluated again), that it already
    warned about the student above its teacher (the warning fires once in the whole run), the history and the
    iteration."""
    argv = common(setup['data'], tmp_path, iters=6, log_iter=2, val_per_iters=2) + [
        '--crop-size', '32,32', '--student-model', 'psp_mobile', '--student-backbone', 'mobile',
        '--student-pretrained-base', 'None', '--teacher-model', 'deeplabv3_mobile', '--teacher-backbone', 'mobile',
        '--teacher-pretrained', setup['teacher'], '--resume', 'auto']
    stem = 'kd_psp_mobile_mobile_citys'
    ckpt, logs = tmp_path / 'ckpt', tmp_path / 'logs'
    scores = Scores(student=[0.5, 0.7], teacher=[0.6])
    monkeypatch.setattr(Trainer, '_evaluate', lambda trainer, net: scores(trainer, net))
    assert run_in_process('kd', argv, kill_at=4) is None
    assert scores.calls == ['student', 'teacher', 'student'] and not scores.student
    best_of_4 = load(ckpt / f'{stem}_best_model.pth')
    assert_same_tensors(best_of_4, load(ckpt / f'{stem}.pth'), 'best = latest at iteration 4')

    scores.student = [0.65]
    run_in_process('kd', argv)
    assert scores.calls == ['student', 'teacher', 'student', 'student']  # the teacher once in the whole run
    assert_same_tensors(load(ckpt / f'{stem}_best_model.pth'), best_of_4, 'best checkpoint')
    assert not all(torch.equal(value, best_of_4[key]) for key, value in load(ckpt / f'{stem}.pth').items())
    resume = load(ckpt / f'{stem}_resume.pth')
    assert resume['iteration'] == 6 and resume['best_miou'] == pytest.approx(0.7)
    assert resume['teacher_metrics'] == {'pixAcc': pytest.approx(0.8), 'mIoU': pytest.approx(0.6),
                                         'chance_mIoU': pytest.approx(0.1), 'warned_below_student': True}
    history = [json.loads(line) for line in (logs / f'{stem}_history.jsonl').read_text().splitlines()]
    assert [(r['iteration'], r['mIoU']) for r in history] == [(2, 50.0), (4, 70.0), (6, 65.0)]
    assert history[0]['teacher'] == {'pixAcc': 80.0, 'mIoU': 60.0} and 'teacher' not in history[1] | history[2]
    log = (logs / f'{stem}_log.txt').read_text()
    before, after = log.split('Resumed from', 1)
    assert after.startswith(f' {ckpt / stem}_resume.pth: iteration 4/6, best mIoU 70.000')
    assert before.count('New best validation mIoU') == 2 and 'New best' not in after
    assert log.count('scores above its teacher') == 1 and 'above its teacher' in before.split('iteration 4')[-1]
    assert 'near chance' not in log and 'Evaluating the teacher' not in after
    assert 'Best validation mIoU: 70.000' in after


def test_teacher_check_warns_for_an_untrained_teacher_only(caplog):
    """The teacher check against chance, with confusion matrices: a teacher that predicts one class everywhere
    is called out, a good one is not; then the student-above-teacher warning fires once."""
    from types import SimpleNamespace

    from utils.metric import ConfusionMatrix
    labels = torch.arange(4).repeat_interleave(25)  # 4 classes, 25 pixels each
    good = labels.clone()
    good[::10] = (good[::10] + 1) % 4  # 90% right
    for prediction, warns in ((torch.zeros_like(labels), True), (good, False)):
        matrix = ConfusionMatrix(4).update(prediction, labels)
        trainer = SimpleNamespace(state=SimpleNamespace(teacher_metrics=None), teacher='teacher',
                                  _evaluate=lambda net, matrix=matrix: matrix.compute() + (matrix,))
        caplog.clear()
        Trainer._check_teacher(trainer, 0.05)
        assert ('near chance' in caplog.text) == warns, caplog.text
        assert 'above its teacher' not in caplog.text
    for student_miou in (0.95, 0.99):  # above the good teacher's 0.81 twice: one warning
        Trainer._check_teacher(trainer, student_miou)
    assert caplog.text.count('scores above its teacher') == 1


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


def test_sigterm_in_one_process_exits_143_with_the_resume_file(setup, tmp_path, monkeypatch):
    """SIGTERM after iteration 2 of 5: the resume file of iteration 2, the message, exit status 143, and the
    handler that was there before is back."""
    import train_baseline
    before = signal.getsignal(signal.SIGTERM)
    original = Trainer._after_step

    def after_step(self, iteration, meter):
        original(self, iteration, meter)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, '_after_step', after_step)
    stderr = io.StringIO()
    argv = common(setup['data'], tmp_path, iters=5, skip_val=True) + MOBILE + ['--crop-size', '32,32']
    assert run_main(train_baseline.main, argv, stderr=stderr) == 143
    resume = tmp_path / 'ckpt' / 'baseline_psp_mobile_mobile_citys_resume.pth'
    assert stderr.getvalue() == (f'stopped by SIGTERM after iteration 2; resume file {resume}; continue with '
                                 '--resume auto\n')
    assert load(resume)['iteration'] == 2
    assert signal.getsignal(signal.SIGTERM) == before


def test_one_image_per_micro_batch_is_refused_on_the_cpu(setup, tmp_path):
    """Unsynchronised BatchNorm cannot train on one image: --batch-size 2 in 2 micro-batches is a user error
    (status 2) naming the flags to change, before training."""
    import train_baseline
    stderr = io.StringIO()
    argv = common(setup['data'], tmp_path, batch=2, skip_val=True) + MOBILE + ['--grad-accum', '2']
    assert run_main(train_baseline.main, argv, stderr=stderr) == 2
    assert stderr.getvalue().startswith('error: --batch-size 2 over 1 process(es) and --grad-accum 2 leaves 1 image')
    assert 'use --batch-size 4 or more' in stderr.getvalue()
    assert not (tmp_path / 'ckpt').exists()


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
