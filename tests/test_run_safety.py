"""Nothing saved is ever lost: a run refuses to overwrite another run's files (and `--overwrite` replaces them on
purpose), two runs never write into one folder at once (the lock, taken over from a run that is gone), Ctrl-C
stops as cleanly as SIGTERM (exit 130, resume file, `--resume auto`), and under two processes a bad label read by
rank 0 ends the run with one message and no traceback from the other process."""
import io
import os
import signal

import pytest
import torch
from launch import PYTHON, common, load, run_ranks, script

from utils.distributed import DistContext
from utils.errors import UserError, run_main
from utils.run_folders import LOCK_SUFFIX, claim_run_folders

pytestmark = pytest.mark.usefixtures('one_thread')
MOBILE = ['--model', 'psp_mobile', '--backbone', 'mobile', '--pretrained-base', 'None']
STEM = 'baseline_psp_mobile_mobile_citys'
# A pid above Linux's largest (2 ** 22): no process can have it, so a lock naming it is stale.
DEAD_PID = 2 ** 22 + 12345


@pytest.fixture(scope='module')
def data(toy_root):
    return toy_root('citys', num_train=4, num_val=2, size=(64, 96))


def snapshot(folder):
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob('*')) if path.is_file()}


def train(argv):
    import train_baseline
    stderr = io.StringIO()
    status = run_main(train_baseline.main, argv, stderr=stderr)
    return status, stderr.getvalue()


def test_ctrl_c_then_a_refused_run_then_resume(data, tmp_path, monkeypatch):
    """SIGINT after iteration 2 (sent by the process to itself): exit 130 with the resume file of iteration 2; a
    second run into the folder without --resume is refused before writing anything, every file unchanged byte for
    byte; `--resume auto` then finishes the run."""
    from utils.train_loop import Trainer
    argv = common(data, tmp_path, iters=4, val_per_iters=2) + MOBILE
    original = Trainer._after_step

    def interrupt_after_two(self, iteration, meter):
        original(self, iteration, meter)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    monkeypatch.setattr(Trainer, '_after_step', interrupt_after_two)
    handler = signal.getsignal(signal.SIGINT)
    status, err = train(argv)
    assert status == 130, err
    assert f'stopped by SIGINT after iteration 2; resume file {tmp_path / "ckpt" / STEM}_resume.pth' in err
    assert 'continue with --resume auto' in err
    assert load(tmp_path / 'ckpt' / f'{STEM}_resume.pth')['iteration'] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's own handler is gone
    monkeypatch.setattr(Trainer, '_after_step', original)

    before = snapshot(tmp_path)
    status, err = train(argv)
    assert status == 2 and err.count('\n') == 1, err
    assert err.startswith(f'error: {tmp_path / "ckpt"} already holds the files of an earlier baseline run')
    assert '--resume auto' in err and '--overwrite' in err
    assert snapshot(tmp_path) == before  # not even the flags file, the history or the log was touched

    status, err = train(argv + ['--resume', 'auto'])
    assert status == 0, err
    assert load(tmp_path / 'ckpt' / f'{STEM}_resume.pth')['iteration'] == 4
    assert 'from iteration 3' in (tmp_path / 'logs' / f'{STEM}_log.txt').read_text()
    assert not list(tmp_path.rglob(f'*{LOCK_SUFFIX}'))  # released


def test_second_ctrl_c_aborts_but_a_forwarded_copy_does_not(monkeypatch):
    from utils import train_loop
    clock = [100.0]
    monkeypatch.setattr(train_loop.time, 'monotonic', lambda: clock[0])
    stop = train_loop.StopSignal(announce=False)
    try:
        stop._on_signal(signal.SIGINT, None)
        clock[0] += 0.05  # torchrun passes the same Ctrl-C on to its workers
        stop._on_signal(signal.SIGINT, None)
        stop._on_signal(signal.SIGTERM, None)
        assert stop.poll() == (signal.SIGINT, False)
        clock[0] += 2.0  # a second Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            stop._on_signal(signal.SIGINT, None)
    finally:
        stop.close()


def parse(data, folder, *extra):
    import train_baseline
    return train_baseline.parse_args(common(data, folder) + MOBILE + list(extra))


def test_lock_refuses_a_live_run_and_takes_over_a_dead_one(data, tmp_path):
    args = parse(data, tmp_path)
    lock_path = tmp_path / 'ckpt' / f'{STEM}{LOCK_SUFFIX}'
    lock_path.parent.mkdir()
    # a live run of this host (the test's parent process) holds the lock: refused, naming its pid
    lock_path.write_text(f'{{"pid": {os.getppid()}, "host": "{os.uname().nodename}", "started": "then"}}')
    with pytest.raises(UserError, match=rf'another run \(pid {os.getppid()}, started then\) is writing the same '
                                        rf'files in {tmp_path / "ckpt"}'):
        claim_run_folders(args, 'baseline', DistContext())
    assert not (tmp_path / 'logs').exists() or not list((tmp_path / 'logs').iterdir())
    # a run that is gone: its lock is taken over with a warning, and released at the end
    lock_path.write_text(f'{{"pid": {DEAD_PID}, "host": "{os.uname().nodename}", "started": "then"}}')
    lock = claim_run_folders(args, 'baseline', DistContext())
    assert lock.warnings[0].startswith(f'took over the lock {lock_path} of a run that is gone (pid {DEAD_PID}')
    assert sorted(p.name for p in tmp_path.rglob(f'*{LOCK_SUFFIX}')) == [f'{STEM}{LOCK_SUFFIX}'] * 2  # both folders
    assert f'"pid": {os.getpid()}' in lock_path.read_text()
    lock.release()
    assert not list(tmp_path.rglob(f'*{LOCK_SUFFIX}'))
    # a lock of another host is taken over only once untouched for LOCK_STALE_SECONDS
    lock_path.write_text('{"pid": 1, "host": "elsewhere", "started": "then"}')
    with pytest.raises(UserError, match=r'a run on elsewhere \(pid 1'):
        claim_run_folders(args, 'baseline', DistContext())
    old = lock_path.stat().st_mtime - 3600
    os.utime(lock_path, (old, old))
    lock = claim_run_folders(args, 'baseline', DistContext())
    lock.release()
    assert 'of a run on elsewhere (pid 1) that has not touched it' in lock.warnings[0]


def test_overwrite_and_resume_into_another_runs_folder(data, tmp_path):
    ckpt, logs = tmp_path / 'ckpt', tmp_path / 'logs'
    for folder, names in ((ckpt, ['.pth', '_resume.pth', '_flags.json']), (logs, ['_history.jsonl', '_log.txt'])):
        folder.mkdir()
        for suffix in names:
            (folder / f'{STEM}{suffix}').write_text('earlier run')
    (ckpt / 'other_file.txt').write_text('not this run')
    other = tmp_path / 'elsewhere_resume.pth'
    torch.save({'format': 'x'}, other)
    # --resume of another file would continue into a folder holding another run
    with pytest.raises(UserError, match=rf'--resume {other} would continue into {ckpt}, which holds the files of '
                                        'another run'):
        claim_run_folders(parse(data, tmp_path, '--resume', str(other)), 'baseline', DistContext())
    # --overwrite removes every file of the earlier run (not other files) and says which
    lock = claim_run_folders(parse(data, tmp_path, '--overwrite'), 'baseline', DistContext())
    lock.release()
    assert sorted(os.path.basename(p) for p in lock.removed) == sorted(
        f'{STEM}{s}' for s in ('.pth', '_resume.pth', '_flags.json', '_history.jsonl', '_log.txt'))
    assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == ['elsewhere_resume.pth', 'other_file.txt']


def test_bad_label_on_rank_0_is_one_message_from_two_processes(tmp_path):
    """Rank 0 reads a label with an illegal value in the first batch; rank 1's batch is good. Both stop at the
    same iteration with the exit status of the error; the message is printed once, and no process prints a
    traceback (rank 1 would otherwise die in the step's collectives once rank 0 is gone)."""
    from PIL import Image

    from dataset import build_dataset
    from dataset.toy import make_toy_dataset
    from utils.samplers import IterationSampler
    root = make_toy_dataset('citys', tmp_path / 'data', num_train=4, num_val=1, size=(48, 64), seed=3)
    samples = build_dataset('citys', 'train', data_root=root, max_iters=4)
    first_of_rank_0 = next(iter(IterationSampler(len(samples), 1, 4, rank=0, world_size=2)))[0]
    label = samples.files[first_of_rank_0]['label']
    Image.new('L', Image.open(label).size, 200).save(label)  # 200: no Cityscapes labelId
    # read by a loader worker: the error arrives folded into the worker's traceback, and is printed unfolded
    argv = common(root, tmp_path, batch=4, iters=1, skip_val=True) + MOBILE + ['--crop-size', '48,48', '--workers', '1']
    proc = run_ranks([PYTHON, script('train_baseline.py')] + argv, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error')]  # one line from two processes
    assert errors == [f'error: label {label} holds values [200] outside the legal raw values of citys (0..33); is '
                     'it the right label file?'], proc.stderr
    assert not list(tmp_path.rglob(f'*{LOCK_SUFFIX}'))
