"""The training scripts end to end (CPU, gloo, generated data) and the loop's parts.

Launch coverage, combined to keep the file short in time: train_hwd.py under torchrun (2 processes),
train_cwd.py under torch.distributed.launch (2 processes), train_baseline.py under two torchrun "nodes", as
SLURM's two tasks, and as two ranks started directly for the SIGTERM test; train_hwd.py also in this process
in the NaN test.

Test-only hooks live in small wrapper scripts written by the tests (nothing in the production code):
the per-rank weights are dumped by a wrapper that calls `train_hwd.main()` (which returns the trained
student of its process), and the NaN is injected by a wrapper that patches the HWD term of one iteration.
"""
import math
import re
import signal
import subprocess
import textwrap

import pytest
import torch
from launch import (
    LAUNCH,
    PYTHON,
    REPO,
    TIMEOUT,
    TORCHRUN,
    clean_env,
    finish_ranks,
    free_port,
    log_lines,
    must_succeed,
    poly,
    run,
    script,
    start_ranks,
    wait_for,
)
from launch import common as launch_common

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
    """Toy Cityscapes and two 'teacher' checkpoints (fresh networks): 19 classes, and 21 for the mismatch."""
    from models.model_zoo import get_segmentation_model
    root = toy_root('citys', num_train=4, num_val=2, size=(64, 96))
    work = tmp_path_factory.mktemp('train')
    torch.manual_seed(0)
    teacher = work / 'teacher.pth'
    torch.save(get_segmentation_model('deeplabv3', 'resnet18', 19, True).state_dict(), teacher)
    teacher21 = work / 'teacher21.pth'
    torch.save(get_segmentation_model('deeplabv3', 'resnet18', 21, True).state_dict(), teacher21)
    return {'data': str(root), 'teacher': str(teacher), 'teacher21': str(teacher21), 'work': work}


def common(setup, out, batch=2, iters=2, **flags):
    return launch_common(setup['data'], out, batch, iters, **flags)


def distill(setup):
    return ['--teacher-backbone', 'resnet18', '--teacher-pretrained', setup['teacher'],
            '--student-pretrained-base', 'None']


def check_student_file(path, num_class=19):
    """A plain student state dict without `module.` that loads into eval's network."""
    from models.model_zoo import get_segmentation_model
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert isinstance(state, dict) and state
    assert not any(key.startswith('module.') for key in state)
    net = get_segmentation_model('deeplabv3', 'resnet18', num_class, True, pretrained=str(path))
    loaded = net.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_hwd_torchrun_two_processes(setup, tmp_path):
    """torchrun, 2 processes: files, names, log format, validation, identical weights on both ranks."""
    wrapper = tmp_path / 'dump_ranks.py'
    wrapper.write_text(textwrap.dedent(f'''
        import os, sys, torch
        sys.path.insert(0, {REPO!r})
        import train_hwd
        student = train_hwd.main(sys.argv[1:])
        params = {{name: p.detach().clone() for name, p in student.named_parameters()}}
        torch.save(params, os.path.join({str(tmp_path)!r}, 'rank%s.pth' % os.environ['RANK']))
    '''))
    args = common(setup, tmp_path, batch=4, iters=4, log_iter=2, val_per_iters=2) + distill(setup) + [
        '--activation', '--shift', '1.0']
    proc = run(TORCHRUN + ['--nproc_per_node=2', f'--master_port={free_port()}', str(wrapper)] + args, tmp_path)
    must_succeed(proc)
    stem = 'hwd_deeplabv3_resnet18_citys'
    ckpt = tmp_path / 'ckpt'
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [f'{stem}.pth', f'{stem}_best_model.pth', f'{stem}_resume.pth', f'{stem}_flags.json',
         f'{stem}_history.jsonl'])
    check_student_file(ckpt / f'{stem}.pth')
    check_student_file(ckpt / f'{stem}_best_model.pth')
    log = tmp_path / 'logs' / f'{stem}_log.txt'
    lines = log_lines(log)
    assert [int(m.group(1)) for m in lines] == [2, 4]
    assert all('HWD Loss' in m.group(0) for m in lines)
    assert float(lines[0].group(3)) == pytest.approx(poly(0.01, 1, 4), abs=1e-6)
    text = log.read_text()
    assert text.count('Overall validation pixAcc') == 2 and 'Using 2 process(es)' in text
    rank0 = torch.load(tmp_path / 'rank0.pth', weights_only=True)
    rank1 = torch.load(tmp_path / 'rank1.pth', weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    resume = torch.load(ckpt / f'{stem}_resume.pth', weights_only=True)
    assert resume['iteration'] == 4 and resume['world_size'] == 2 and resume['method'] == 'hwd'
    assert all(torch.equal(resume['student'][key], value) for key, value in
               torch.load(ckpt / f'{stem}.pth', weights_only=True).items())


def test_cwd_distributed_launch_two_processes(setup, tmp_path):
    """torch.distributed.launch (passes --local-rank=N), 2 processes, CWD with its feature adapter."""
    args = common(setup, tmp_path, batch=4, iters=2, log_iter=1, skip_val=True) + distill(setup) + [
        '--lambda-feat', '1.0']
    proc = run(LAUNCH + ['--nproc_per_node=2', f'--master_port={free_port()}', script('train_cwd.py')] + args,
               tmp_path)
    must_succeed(proc)
    stem = 'cwd_deeplabv3_resnet18_citys'
    check_student_file(tmp_path / 'ckpt' / f'{stem}.pth')
    assert not (tmp_path / 'ckpt' / f'{stem}_best_model.pth').exists()  # --skip-val: no best model
    lines = log_lines(tmp_path / 'logs' / f'{stem}_log.txt')
    assert [int(m.group(1)) for m in lines] == [1, 2]
    assert 'Logit Loss' in lines[0].group(0) and 'Feat Loss' in lines[0].group(0)  # the original's names
    resume = torch.load(tmp_path / 'ckpt' / f'{stem}_resume.pth', weights_only=True)
    assert any(key.startswith('adapter.') for key in resume['method_state'])  # the adapter is trained and saved


def test_baseline_two_nodes(setup, tmp_path):
    """Two torchrun launches with --nnodes=2 on this machine form one 2-process run."""
    port = free_port()
    args = common(setup, tmp_path, batch=4, iters=2, log_iter=1, skip_val=True) + ['--pretrained-base', 'None']
    procs = [subprocess.Popen(TORCHRUN + ['--nnodes=2', f'--node_rank={rank}', '--nproc_per_node=1',
                                          '--master_addr=127.0.0.1', f'--master_port={port}',
                                          script('train_baseline.py')] + args,
                              cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    stem = 'baseline_deeplabv3_resnet18_citys'
    check_student_file(tmp_path / 'ckpt' / f'{stem}.pth')
    text = (tmp_path / 'logs' / f'{stem}_log.txt').read_text()
    assert 'Using 2 process(es)' in text and len(log_lines(tmp_path / 'logs' / f'{stem}_log.txt')) == 2


# ---------------------------------------------------------------- crash, pre-emption, divergence

def test_slurm_srun_two_tasks(setup, tmp_path):
    """Two processes started as SLURM's srun starts its tasks: no RANK / WORLD_SIZE / LOCAL_RANK, but
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and MASTER_ADDR / MASTER_PORT exported by the sbatch script."""
    args = common(setup, tmp_path, batch=4, iters=2, log_iter=1, skip_val=True) + ['--pretrained-base', 'None']
    port = str(free_port())
    procs = []
    for task in (0, 1):
        env = clean_env(SLURM_PROCID=str(task), SLURM_NTASKS='2', SLURM_LOCALID=str(task), MASTER_ADDR='127.0.0.1',
                        MASTER_PORT=port)
        procs.append(subprocess.Popen([PYTHON, script('train_baseline.py')] + args, cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    log = (tmp_path / 'logs' / 'baseline_deeplabv3_resnet18_citys_log.txt').read_text()
    assert 'Using 2 process(es)' in log and 'Device-hours' in log
    check_student_file(tmp_path / 'ckpt' / 'baseline_deeplabv3_resnet18_citys.pth')


def test_sigterm_to_one_rank_stops_both_with_143_and_the_resume_file(setup, tmp_path):
    """SIGTERM to rank 0 only (a scheduler may signal one task first): the ranks agree on the iteration, rank 0
    writes the resume file, both exit with 143 (128 + SIGTERM, what a shell reports) and say so."""
    max_iterations = 30
    args = common(setup, tmp_path, batch=4, iters=max_iterations, log_iter=1, skip_val=True) + [
        '--model', 'psp_mobile', '--backbone', 'mobile', '--pretrained-base', 'None', '--crop-size', '32,32']
    stem = 'baseline_psp_mobile_mobile_citys'
    log = tmp_path / 'logs' / f'{stem}_log.txt'
    procs = start_ranks([PYTHON, script('train_baseline.py')] + args, tmp_path)
    try:
        assert wait_for(lambda: log.exists() and f'Iters: 2/{max_iterations}' in log.read_text(), procs[0])
        procs[0].send_signal(signal.SIGTERM)
    finally:
        done = finish_ranks(procs, timeout=120)  # a rank that missed the stop would wait in DDP for 30 min
    assert [proc.returncode for proc in procs] == [143, 143], done.stderr[-4000:]
    stopped = re.findall(r'stopped by SIGTERM after iteration (\d+); resume file (\S+);', done.stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], done.stderr[-4000:]
    resume = torch.load(tmp_path / 'ckpt' / f'{stem}_resume.pth', weights_only=True)
    assert resume['iteration'] == int(stopped[0][0]) and 2 <= resume['iteration'] < max_iterations
    assert stopped[0][1] == str(tmp_path / 'ckpt' / f'{stem}_resume.pth')
    assert 'SIGTERM: saved the resume file' in log.read_text()


def test_nan_loss_stops_with_iteration_and_term(setup, tmp_path, monkeypatch):
    """A NaN in the HWD term at iteration 3 stops the run at the next check; the best model stays as it was.
    (In this process: the HWD term of the 3rd call is multiplied by NaN; no hook in the production code.)"""
    import io

    import train_hwd
    from utils.errors import run_main
    original = train_hwd.HWDDistillation.forward
    calls = [0]

    def forward(self, s_outputs, t_outputs, labels):
        calls[0] += 1
        terms = original(self, s_outputs, t_outputs, labels)
        if calls[0] == 3:
            terms['HWD Loss'] = terms['HWD Loss'] * float('nan')
        return terms

    monkeypatch.setattr(train_hwd.HWDDistillation, 'forward', forward)
    args = common(setup, tmp_path, batch=2, iters=8, log_iter=4, val_per_iters=2) + distill(setup) + [
        '--student-model', 'psp_mobile', '--student-backbone', 'mobile']  # a light student: the loop is under test
    stderr = io.StringIO()
    assert run_main(train_hwd.main, args, stderr=stderr) == 2
    assert 'error: the loss became non-finite at iteration 3 (HWD Loss)' in stderr.getvalue()
    stem = 'hwd_psp_mobile_mobile_citys'
    resume = torch.load(tmp_path / 'ckpt' / f'{stem}_resume.pth', weights_only=True)
    assert resume['iteration'] == 2  # nothing saved after the NaN (the check at 4 came first)
    best = torch.load(tmp_path / 'ckpt' / f'{stem}_best_model.pth', weights_only=True)
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
    assert all(torch.equal(best[k], resume['student'][k]) for k in best)


# ---------------------------------------------------------------- flag errors (before any work)

def _argv(setup, tmp_path, *extra):
    return common(setup, tmp_path) + list(extra)


FLAG_ERRORS = [
    ('train_hwd', ['--crop-size', '512,abc'], '--crop-size'),
    ('train_hwd', ['--crop-size', '0,512'], '--crop-size'),
    ('train_baseline', ['--crop-size', '1,2,3'], '--crop-size'),
    ('train_baseline', ['--batch-size', '0'], '--batch-size'),
    ('train_baseline', ['--max-iterations', '-5'], '--max-iterations'),
    ('train_baseline', ['--lr', '0'], '--lr'),
    ('train_baseline', ['--ignore-label', '5'], '--ignore-label'),
    ('train_cwd', ['--lr', 'nan'], '--lr'),
    ('train_baseline', ['--log-iter', '0'], '--log-iter'),
    ('train_baseline', ['--val-per-iters', '0'], '--val-per-iters'),
    ('train_baseline', ['--save-per-iters', '-1'], '--save-per-iters'),
    ('train_baseline', ['--workers', '-1'], '--workers'),
    ('train_cwd', ['--temperature', '0'], '--temperature'),
    ('train_cwd', ['--lambda-logit', '-1'], '--lambda-logit'),
    ('train_hwd', ['--L', 'KL'], '--activation'),
    ('train_hwd', ['--process', 'E', '--parameter', '1'], '--parameter'),
    ('train_hwd', ['--process', 'T', '--parameter', '0'], '--parameter'),
    ('train_hwd', ['--L', 'XYZ'], '--L'),
    ('train_baseline', ['--model', 'deeplabv3', '--backbone', 'mobile'], '--backbone'),
    ('train_hwd', ['--student-model', 'unet'], '--student-model'),
    ('train_hwd', ['--teacher-pretrained', 'TEACHER21'], 'trained for 21 classes'),
    ('train_hwd', ['--teacher-pretrained', 'missing.pth'], '--teacher-pretrained'),
    ('train_baseline', ['--pretrained-base', 'missing.pth'], '--pretrained-base'),
    ('train_baseline', ['--resume', 'missing_resume.pth'], '--resume'),
    ('train_baseline', ['--dataset', 'kitti'], '--dataset'),
]


@pytest.mark.parametrize('module,extra,fragment', FLAG_ERRORS,
                         ids=[f'{m}:{" ".join(e)}' for m, e, _ in FLAG_ERRORS])
def test_flag_errors(setup, tmp_path, capsys, module, extra, fragment):
    import importlib
    mod = importlib.import_module(module)
    extra = [setup['teacher21'] if value == 'TEACHER21' else value for value in extra]
    # the flags under test come last: argparse keeps the last value of a repeated flag
    networks = ['--pretrained-base', 'None'] if module == 'train_baseline' else distill(setup)
    argv = common(setup, tmp_path) + networks + extra
    with pytest.raises(SystemExit) as exit_info:
        mod.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'error:' in err and fragment in err, err
    assert not (tmp_path / 'ckpt').exists() and not (tmp_path / 'logs').exists()


def test_batch_must_split_over_processes(setup, tmp_path, capsys, monkeypatch):
    import train_baseline
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit) as exit_info:
        train_baseline.parse_args(_argv(setup, tmp_path, '--batch-size', '3', '--pretrained-base', 'None'))
    assert exit_info.value.code == 2
    assert '--batch-size 3' in capsys.readouterr().err


def test_user_error_exit_status_and_message(tmp_path):
    """A UserError raised during the run (a missing data root) -> 'error: ...' on stderr, status 2. (In this
    process: tests/test_errors.py runs a script as a process, where run_main's status becomes the exit status.)"""
    import io

    import train_baseline
    from utils.errors import run_main
    stderr = io.StringIO()
    argv = ['--no-cuda', '--data', str(tmp_path / 'nowhere'), '--pretrained-base', 'None',
            '--save-dir', str(tmp_path / 'c'), '--log-dir', str(tmp_path / 'l')]
    assert run_main(train_baseline.main, argv, stderr=stderr) == 2
    assert stderr.getvalue().startswith('error: ') and '--data' in stderr.getvalue()
    assert str(tmp_path / 'nowhere') in stderr.getvalue() and stderr.getvalue().count('\n') == 1


# ---------------------------------------------------------------- parts of the loop

def test_sampler_shares_exactly_and_resumes():
    from utils.samplers import IterationSampler
    from utils.seeding import sample_seed
    max_iterations, batch, world = 5, 4, 2
    full = [list(IterationSampler(7, max_iterations, batch, rank=r, world_size=world, seed=3)) for r in range(world)]
    assert all(len(share) == max_iterations * batch // world for share in full)
    single = list(IterationSampler(7, max_iterations, batch, seed=3))
    # global batch i = the ranks' slices of batch i, whatever the number of processes
    per = batch // world
    rebuilt = []
    for i in range(max_iterations):
        for r in range(world):
            rebuilt += full[r][i * per:(i + 1) * per]
    assert rebuilt == single
    indices = [index for index, _ in single]
    assert sorted(indices) == sorted(torch.arange(max_iterations * batch).remainder(7).tolist())
    # each sample's seed is that of its place in the run, whatever the number of processes
    assert [seed for _, seed in single] == [sample_seed(3, place) for place in range(max_iterations * batch)]
    assert len({seed for _, seed in single}) == max_iterations * batch
    resumed = list(IterationSampler(7, max_iterations, batch, rank=1, world_size=world, seed=3, start_iteration=2))
    assert resumed == full[1][2 * per:]


def test_poly_lr_counts_from_zero():
    from utils.optim import poly_lr
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)


def test_atomic_save_leaves_no_partial_file(tmp_path):
    from utils.checkpointing import atomic_save

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('boom')

    target = tmp_path / 'x.pth'
    atomic_save({'a': torch.ones(2)}, target)
    with pytest.raises(RuntimeError):
        atomic_save({'a': Unpicklable()}, target)
    assert [p.name for p in tmp_path.iterdir()] == ['x.pth']
    assert torch.equal(torch.load(target, weights_only=True)['a'], torch.ones(2))


def test_loss_meter_names_first_bad_iteration():
    from utils.train_step import LossMeter, NonFiniteLossError
    meter = LossMeter('cpu')
    meter.add({'Task Loss': torch.tensor(1.0), 'HWD Loss': torch.tensor(2.0)}, 1)
    meter.add({'Task Loss': torch.tensor(3.0), 'HWD Loss': torch.tensor(math.inf)}, 2)
    meter.add({'Task Loss': torch.tensor(math.nan), 'HWD Loss': torch.tensor(math.nan)}, 3)
    with pytest.raises(NonFiniteLossError, match=r'iteration 2 \(HWD Loss\)'):
        meter.check()
    meter = LossMeter('cpu')
    meter.add({'Task Loss': torch.tensor(1.0)}, 1)
    meter.add({'Task Loss': torch.tensor(3.0)}, 2)
    meter.check()
    assert meter.summary() == {'Task Loss': 2.0}


def test_launcher_local_rank_spellings(setup, tmp_path):
    import train_baseline
    base = common(setup, tmp_path) + ['--pretrained-base', 'None']
    assert train_baseline.parse_args(base + ['--local-rank=1']).local_rank == 1
    assert train_baseline.parse_args(base + ['--local_rank', '0']).local_rank == 0
    assert tuple(train_baseline.parse_args(base + ['--crop-size', '32,48']).crop_size) == (32, 48)


def test_resume_file_from_another_run_is_refused(setup, tmp_path):
    import train_hwd
    from utils.checkpointing import ResumeError, check_resume_matches, flags_for_resume
    args = train_hwd.parse_args(common(setup, tmp_path, iters=10) + distill(setup))
    state = {'method': 'hwd', 'args': flags_for_resume(args)}
    check_resume_matches(state, 'r.pth', 'hwd', args)
    args.max_iterations = 20
    with pytest.raises(ResumeError, match=r'--max-iterations 10 \(this run: 20\)'):
        check_resume_matches(state, 'r.pth', 'hwd', args)
    with pytest.raises(ResumeError, match='method'):
        check_resume_matches(state, 'r.pth', 'cwd', train_hwd.parse_args(
            common(setup, tmp_path, iters=10) + distill(setup)))
    # the method's flags and the optimizer's define the run too (a sweep must not resume another setting)
    for extra, named in ((['--lambda-hwd', '2.0'], '--lambda-hwd'), (['--lr', '0.02'], '--lr'),
                         (['--weight-decay', '0'], '--weight-decay'), (['--seed', '3'], '--seed')):
        other = train_hwd.parse_args(common(setup, tmp_path, iters=10) + distill(setup) + extra)
        with pytest.raises(ResumeError, match=named):
            check_resume_matches(state, 'r.pth', 'hwd', other)
    # where the files are and how often the run logs do not change the result
    free = train_hwd.parse_args(common(setup, tmp_path / 'elsewhere', iters=10, log_iter=1, workers=2)
                                + distill(setup))
    check_resume_matches(state, 'r.pth', 'hwd', free)


def test_plain_checkpoint_is_not_a_resume_file(tmp_path):
    from utils.checkpointing import ResumeError, load_resume_state
    path = tmp_path / 'weights.pth'
    torch.save({'conv.weight': torch.zeros(1)}, path)
    with pytest.raises(ResumeError, match='not a resume file'):
        load_resume_state(str(path))


def test_hwd_settings_get_their_own_folders(setup, tmp_path, monkeypatch):
    """Without --save-dir / --log-dir each HWD setting writes to its own folder, as the original's
    train_hwd.py, so a sweep of settings keeps every checkpoint; explicit folders win."""
    import train_hwd
    monkeypatch.chdir(tmp_path)
    base = ['--no-cuda', '--data', setup['data']] + distill(setup)
    paper = train_hwd.parse_args(base + ['--activation', '--shift', '1.0', '--DivPixel', 'N'])
    assert paper.save_dir == paper.log_dir == './hwd/Activation_MSE_E0.1_Shift1.0_DivN'
    other = train_hwd.parse_args(base + ['--L', 'L1', '--process', 'T', '--parameter', '2.0'])
    assert other.save_dir == './hwd/Logit_L1_T2.0'
    weighted = train_hwd.parse_args(base + ['--lambda-hwd', '1.0'])
    assert weighted.save_dir == './hwd/Logit_MSE_E0.1_Lambda1.0'
    chosen = train_hwd.parse_args(base + ['--save-dir', 'mine', '--log-dir', 'mylogs'])
    assert (chosen.save_dir, chosen.log_dir) == ('mine', 'mylogs')
