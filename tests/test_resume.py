"""Exact resume, gradient accumulation and the loop's contract for a method.

- A run killed after the resume file of iteration 2 (of 4) was written and continued with --resume auto writes
  the same files as the run never stopped: the student checkpoints, every tensor of the resume file and
  the validation history, bit for bit (CPU), for train_mgd.py (a method with a trained generator and a random
  mask; the baseline's loop is a part of it), on one process with gradient accumulation and on two, with 0
  and 2 loader workers; and on two processes for train_cirkdv2.py (memories, GCN) and train_afdcd.py (masks,
  clipped loss module). The two-process runs are forked from this process (no interpreter start-up).
- --grad-accum 2 on one process follows two processes without it.
- A made-up method that owns each thing the contract allows (a module trained with the student, an
  optimizer of its own, a logged-only term, a buffer never broadcast, a random generator).
"""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from launch import (
    PYTHON,
    assert_same_tensors,
    common,
    fork_ranks,
    load,
    log_lines,
    must_succeed,
    run_in_process,
    run_ranks,
    script,
)

from utils.scripts import training_scripts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

STUDENT = ['--student-model', 'psp_mobile', '--student-backbone', 'mobile', '--student-pretrained-base', 'None']
BASELINE = ['--model', 'psp_mobile', '--backbone', 'mobile', '--pretrained-base', 'None']
KILL_AT = 2


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
    from models.model_zoo import get_segmentation_model
    root = toy_root('citys', num_train=5, num_val=2, size=(64, 96))
    work = tmp_path_factory.mktemp('resume')
    torch.manual_seed(1)
    teacher = work / 'deeplabv3_mobile.pth'
    torch.save(get_segmentation_model('deeplabv3_mobile', 'mobile', 19, True).state_dict(), teacher)
    return {'data': root, 'teacher': str(teacher)}


def forked_main(name, argv, kill_at=None):
    """The target of a forked rank: the script's main; with `kill_at`, the process ends (status 9) right after
    the resume file of that iteration is on disk, once every process has written its part."""
    def target():
        import importlib
        import os

        import torch.distributed as dist

        from utils import train_loop
        if kill_at is not None:
            original = train_loop.Trainer._save

            def _save(self, is_best, wait=False):
                kill = self.state.iteration == kill_at
                original(self, is_best, wait=wait or kill)
                if kill:
                    if dist.is_initialized():
                        dist.barrier()
                    os._exit(9)
            train_loop.Trainer._save = _save
        importlib.import_module(f'train_{name}').main(argv)
    return target


def stem(name):
    return ('baseline_psp_mobile_mobile_citys' if name == 'baseline' else f'{name}_psp_mobile_mobile_citys')


def run_files(folder, name):
    ckpt = folder / 'ckpt'
    resume = load(ckpt / f'{stem(name)}_resume.pth')
    del resume['args']  # holds the folders and --workers, which differ between the runs compared
    del resume['train_seconds']  # a measurement, not a result
    history = [json.loads(line) for line in (folder / 'logs' / f'{stem(name)}_history.jsonl').read_text().splitlines()]
    for record in history:  # the cost of the run is measured, not computed
        assert record['seconds_per_iteration'] > 0 and record['images_per_second'] > 0 and record['peak_memory_mb'] > 0
        for key in ('seconds_per_iteration', 'images_per_second', 'peak_memory_mb'):
            del record[key]
    return {'latest': load(ckpt / f'{stem(name)}.pth'), 'best': load(ckpt / f'{stem(name)}_best_model.pth'),
            'resume': resume, 'history': history}


RESUME_CASES = [
    # name, processes, extra flags (MGD: a method with a module trained with the student and a random generator;
    # the baseline's loop is a part of it)
    ('mgd', 1, ['--batch-size', '4', '--grad-accum', '2']),  # resume stays exact with accumulation
    ('mgd', 2, ['--batch-size', '4']),
    # CIRKDv2: the GCN, FitNet and projection heads trained with the student, pixel and channel memories with
    # their shared generators; Af-DCD: the mask generator and the clipped loss module, at its smallest crop
    ('cirkdv2', 2, ['--batch-size', '4', *training_scripts()['cirkdv2'].quick_flags]),
    ('afdcd', 2, ['--batch-size', '4', '--crop-size', '128,128']),
]


@pytest.mark.parametrize('name,nproc,extra', RESUME_CASES,
                         ids=[f'{n}-{p}proc{"-accum" if "--grad-accum" in e else ""}' for n, p, e in RESUME_CASES])
def test_killed_and_resumed_equals_never_stopped(setup, tmp_path, name, nproc, extra):
    networks = BASELINE if name == 'baseline' else STUDENT + [
        '--teacher-model', 'deeplabv3_mobile', '--teacher-backbone', 'mobile', '--teacher-pretrained', setup['teacher']]
    flags = dict(iters=4, log_iter=1, save_per_iters=1, val_per_iters=KILL_AT)

    def args(folder, workers):
        # 32 x 32 crops (unless the method needs more): what is under test does not depend on the size, the time does
        return common(setup['data'], folder, **flags) + networks + [
            '--workers', str(workers), '--crop-size', '32,32'] + extra

    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    if nproc == 1:
        # one process: the script's main in this process, killed by an exception right after the resume file of
        # iteration KILL_AT is on disk (the pre-emption of a single process)
        run_in_process(name, args(whole, 0))
        run_in_process(name, args(parts, 2) + ['--resume', 'auto'], kill_at=KILL_AT)
        assert load(parts / 'ckpt' / f'{stem(name)}_resume.pth')['iteration'] == KILL_AT
        run_in_process(name, args(parts, 0) + ['--resume', 'auto'])
    else:
        # forked processes (no interpreter start-up); the killed run ends every process right after the resume
        # file of iteration KILL_AT is on disk, as a pre-empted job would (no clean-up, no later file)
        assert fork_ranks(forked_main(name, args(whole, 0)), nproc) == [0] * nproc
        assert fork_ranks(forked_main(name, args(parts, 2) + ['--resume', 'auto'], KILL_AT), nproc) == [9] * nproc
        assert load(parts / 'ckpt' / f'{stem(name)}_resume.pth')['iteration'] == KILL_AT
        assert fork_ranks(forked_main(name, args(parts, 0) + ['--resume', 'auto']), nproc) == [0] * nproc
    log = (parts / 'logs' / f'{stem(name)}_log.txt').read_text()
    assert f'iteration {KILL_AT}/4' in log and 'not repeat the uninterrupted one' not in log
    after = [int(m.group(1)) for m in log_lines(parts / 'logs' / f'{stem(name)}_log.txt')]
    assert after == [1, 2, 3, 4]  # nothing replayed, nothing skipped
    expected, got = run_files(whole, name), run_files(parts, name)
    assert_same_tensors(got, expected, 'resumed run')
    if name == 'mgd':
        assert set(got['resume']['generators']) == {'mgd'} and 'criterion.align.weight' in got['resume']['method_state']
    if name == 'cirkdv2':
        assert set(got['resume']['generators']) == {'cirkdv2_memory', 'cirkdv2_channel'}
        assert {'gcn.node_k.weight', 'fitnet.conv.weight', 'channel.teacher_channel_queue',
                'memory.teacher_pixel_queue'} <= set(got['resume']['method_state'])
    if name == 'afdcd':
        assert set(got['resume']['generators']) == {'afdcd_mask'}
        assert 'criterion.projector.0.weight' in got['resume']['method_state']
    assert [record['iteration'] for record in got['history']] == [2, 4]


def test_grad_accum_on_one_process_follows_two_processes(setup, tmp_path):
    """Batch 4 as 2 micro-batches of 2 on one process against 2 processes of 2: the same samples, draws and
    averaged gradients, so the weights agree to rounding (the sums run in another order). BatchNorm running
    statistics differ by design: each micro-batch updates them on one process, rank 0's are kept on two."""
    base = common(setup['data'], tmp_path, batch=4, iters=3, skip_val=True) + BASELINE
    one, two = tmp_path / 'one', tmp_path / 'two'
    run_in_process('baseline', base + ['--grad-accum', '2', '--save-dir', str(one)])
    must_succeed(run_ranks([PYTHON, script('train_baseline.py')] + base + ['--save-dir', str(two)], tmp_path))
    a = load(one / f'{stem("baseline")}.pth')
    b = load(two / f'{stem("baseline")}.pth')
    start = load(two / f'{stem("baseline")}_resume.pth')
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        if key.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            continue
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        moved += 1
    assert moved > 100 and start['iteration'] == 3
    # accumulation is not a smaller batch: with --grad-accum 1 on one process (batch 4 at once) BatchNorm sees
    # 4 images per forward, and the weights differ
    whole = tmp_path / 'whole'
    run_in_process('baseline', base + ['--save-dir', str(whole)])
    c = load(whole / f'{stem("baseline")}.pth')
    assert not all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-5) for k in a if a[k].is_floating_point())


# ---------------------------------------------------------------- the contract, with a made-up method

class Counter(nn.Module):
    """State that changes every forward and is equal on every process by construction."""
    local_buffers = ('calls', 'noise')

    def __init__(self):
        super().__init__()
        self.register_buffer('calls', torch.zeros((), dtype=torch.long))
        self.register_buffer('noise', torch.zeros(()))


def make_toy_method(nets, probe_scale=1.0, phases=None):
    from utils.method import DistillationMethod, frozen

    class ToyMethod(DistillationMethod):
        logged_only = ('Probe Loss',)

        def __init__(self):
            super().__init__()
            c = nets.num_class
            self.adapter = nn.Conv2d(c, c, 1)                      # trained with the student
            self.critic = nn.Linear(c, 1)                          # trained by its own optimizer
            self.counter = Counter()                               # a buffer DDP must leave alone
            self.generator = self.add_generator('toy')             # a random stream
            self.add_optimizer('critic', self.critic, lambda params, lr: torch.optim.SGD(params, lr=lr), 0.5)
            self.phase = 'student'
            if phases is not None:
                self.critic.weight.register_hook(lambda grad: phases.append(self.phase))

        def forward(self, s_outputs, t_outputs, labels):
            self.phase = 'student'
            draw = torch.rand((), generator=self.generator)
            self.counter.calls += 1
            self.counter.noise += draw
            s, t = s_outputs[0], t_outputs[0]
            with frozen(self.critic):
                adversarial = self.critic(s.mean((2, 3))).mean()
            # mse_loss saves the teacher's tensor for its backward: the teacher's outputs must allow that
            toy = F.mse_loss(self.adapter(s), t) * (1 + draw) + 0.01 * adversarial
            return {'Toy Loss': toy, 'Probe Loss': probe_scale * s.square().mean()}

        def own_loss(self, name, s_outputs, t_outputs, labels):
            self.phase = 'own'
            loss = (self.critic(t_outputs[0].mean((2, 3))) - self.critic(s_outputs[0].mean((2, 3)))).mean()
            return loss, {'Critic Loss': loss}

    return ToyMethod()


def train_toy(setup, folder, probe_scale=1.0, phases=None, stop_after=None, resume=False, iters=4):
    from utils import train_loop
    from utils.options import build_parser, validate_args
    parser = build_parser('toy', distillation=True)
    argv = common(setup['data'], folder, iters=iters, log_iter=1, save_per_iters=2, val_per_iters=iters) + STUDENT + [
        '--teacher-model', 'deeplabv3_mobile', '--teacher-backbone', 'mobile', '--teacher-pretrained', setup['teacher']]
    args = validate_args(parser, parser.parse_args(argv + (['--resume', 'auto'] if resume else [])))
    built = []

    def build(nets):
        built.append(make_toy_method(nets, probe_scale, phases))
        return built[0]

    original = train_loop.Trainer._after_step

    def after_step(self, iteration, meter):
        original(self, iteration, meter)
        if iteration == stop_after:
            self.writer.wait()
            raise KeyboardInterrupt  # a crash after the resume file of this iteration

    train_loop.Trainer._after_step = after_step
    try:
        student = train_loop.run_training(args, 'toy', build)
    except KeyboardInterrupt:
        student = None
    finally:
        train_loop.Trainer._after_step = original
    return student, built[0]


def test_method_contract_with_a_made_up_method(setup, tmp_path):
    phases = []
    student, method = train_toy(setup, tmp_path / 'a', phases=phases)
    stem_toy = 'toy_psp_mobile_mobile_citys'
    resume = load(tmp_path / 'a' / 'ckpt' / f'{stem_toy}_resume.pth')
    # the critic got gradients only in its own step, never from the student's backward
    assert phases and set(phases) == {'own'}
    # its own optimizer trained it; the student's SGD holds the student and the adapter, not the critic
    assert set(resume['own_optimizers']) == {'critic'}
    sgd = resume['optimizer']['param_groups']
    assert len(sgd) == 2 and len(sgd[1]['params']) == 2  # adapter weight and bias
    assert not torch.equal(resume['method_state']['critic.weight'], make_toy_method_init(setup)['critic.weight'])
    # the buffers, the generator and the logged terms
    assert int(resume['method_state']['counter.calls']) == 4
    assert set(resume['generators']) == {'toy'}
    assert method.unsynchronised_names() >= {'counter.calls', 'counter.noise', 'critic.weight', 'critic.bias'}
    lines = log_lines(tmp_path / 'a' / 'logs' / f'{stem_toy}_log.txt')
    assert len(lines) == 4 and all('Probe Loss' in m.group(0) and 'Critic Loss' in m.group(0) for m in lines)
    # a logged-only term is not back-propagated: another scale of it leaves the run unchanged
    other, _ = train_toy(setup, tmp_path / 'b', probe_scale=1000.0)
    assert_same_tensors(other.state_dict(), student.state_dict(), 'student')
    # a crash after iteration 2 and --resume auto: everything the method owns comes back
    train_toy(setup, tmp_path / 'c', stop_after=2)
    assert load(tmp_path / 'c' / 'ckpt' / f'{stem_toy}_resume.pth')['iteration'] == 2
    resumed, resumed_method = train_toy(setup, tmp_path / 'c', resume=True)
    assert_same_tensors(resumed.state_dict(), student.state_dict(), 'student')
    assert_same_tensors(resumed_method.state_dict(), method.state_dict(), 'method')
    final = load(tmp_path / 'c' / 'ckpt' / f'{stem_toy}_resume.pth')
    for key in ('method_state', 'own_optimizers', 'generators', 'optimizer', 'student'):
        assert_same_tensors(final[key], resume[key], key)


def make_toy_method_init(setup):
    """The toy method as built before training (the loop seeds torch from --seed before building)."""
    from utils.seeding import derive_seed
    from utils.train_build import Networks
    torch.manual_seed(derive_seed(0, 'init'))
    from models.model_zoo import get_segmentation_model
    get_segmentation_model('psp_mobile', 'mobile', 19, False)  # the student is built first, the teacher after
    nets = Networks(None, None, 19, torch.device('cpu'), nn.BatchNorm2d)
    return make_toy_method(nets).state_dict()
