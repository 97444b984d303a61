"""Helpers of the end-to-end tests: launching the training scripts (plain, torchrun, torch.distributed.launch)
on the generated data and reading what they write. Imported by the test modules (pytest puts tests/ on
sys.path)."""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TORCHRUN = [PYTHON, '-m', 'torch.distributed.run']
LAUNCH = [PYTHON, '-m', 'torch.distributed.launch']
TIMEOUT = 240

LOG_LINE = re.compile(r'Iters: (\d+)/(\d+) \|\| Lr: (\d+\.\d{6}) \|\| Task Loss: \d+\.\d{4}'
                      r'( \|\| [A-Za-z0-9_ -]+ Loss: '
                      r'-?\d+\.\d{4})* \|\| Cost Time: \d+:\d\d:\d\d \|\| Estimated Time: \d+:\d\d:\d\d')


def script(name):
    return os.path.join(REPO, name)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def torchrun(nproc=2):
    return TORCHRUN + [f'--nproc_per_node={nproc}', f'--master_port={free_port()}']


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', PYTHONPATH=REPO)
    env.update(extra)
    return env


def run(cmd, cwd, timeout=TIMEOUT, **env):
    return subprocess.run(cmd, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)


def start_ranks(cmd, cwd, nproc=2, **env):
    """`cmd` as `nproc` processes with the environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), started directly: the launcher itself is tested elsewhere, and its own import of
    torch would cost seconds. Returns the Popen objects, rank 0 first. Their outputs go to temporary files, not
    pipes: a rank blocked on a full pipe would hold the others in their next collective."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                             MASTER_ADDR='127.0.0.1', MASTER_PORT=port, **env)
        outputs = (tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+'))
        proc = subprocess.Popen(cmd, cwd=cwd, env=rank_env, stdout=outputs[0], stderr=outputs[1], text=True)
        proc.outputs = outputs
        procs.append(proc)
    return procs


def finish_ranks(procs, timeout=TIMEOUT):
    """Wait for the processes of `start_ranks` (those still running after `timeout` are killed, and TimeoutExpired
    raised); a CompletedProcess with the outputs of all ranks and the first non-zero exit status (0 when every
    rank succeeded)."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:  # a rank left waiting in a collective
                proc.kill()
                proc.wait()
    texts = []
    for proc in procs:
        for output in proc.outputs:
            output.seek(0)
            texts.append(output.read())
            output.close()
    status = next((proc.returncode for proc in procs if proc.returncode != 0), 0)
    return subprocess.CompletedProcess(procs[0].args, status, ''.join(texts[0::2]), ''.join(texts[1::2]))


def run_ranks(cmd, cwd, nproc=2, timeout=TIMEOUT, **env):
    """`cmd` as `nproc` processes (see `start_ranks`), waited for (see `finish_ranks`)."""
    return finish_ranks(start_ranks(cmd, cwd, nproc, **env), timeout)


def fork_ranks(target, nproc=2, timeout=TIMEOUT):
    """`target()` in `nproc` processes forked from this one, each with the environment torchrun gives its workers
    and one thread (as OMP_NUM_THREADS=1 in the launched runs): a two-process run without the seconds each new
    interpreter spends importing torch. Returns the exit statuses (a SystemExit's code; 1 for an exception,
    whose traceback goes to stderr)."""
    import multiprocessing
    port = str(free_port())
    context = multiprocessing.get_context('fork')
    procs = [context.Process(target=_forked_rank, args=(target, rank, nproc, port)) for rank in range(nproc)]
    for proc in procs:
        proc.start()
    deadline = time.time() + timeout
    for proc in procs:
        proc.join(max(deadline - time.time(), 1))
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def _forked_rank(target, rank, nproc, port):
    import traceback
    for key in ('TORCHELASTIC_RUN_ID', 'GROUP_RANK'):
        os.environ.pop(key, None)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    torch.set_num_threads(1)
    status = 0
    try:
        target()
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - a rank's failure becomes its exit status
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # not the parent's clean-up (pytest's, the loggers')


def must_succeed(proc):
    assert proc.returncode == 0, (f'exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n'
                                  f'STDERR:\n{proc.stderr[-4000:]}')


def common(data, out, batch=2, iters=2, **flags):
    """The shared flags of a short CPU run on the generated data; `flags` as keyword arguments
    (log_iter=1 -> --log-iter 1, skip_val=True -> --skip-val)."""
    args = ['--no-cuda', '--data', str(data), '--crop-size', '64,64', '--workers', '0',
            '--batch-size', str(batch), '--max-iterations', str(iters),
            '--save-dir', str(out / 'ckpt'), '--log-dir', str(out / 'logs')]
    for key, value in flags.items():
        flag = '--' + key.replace('_', '-')
        args += [flag] if value is True else [flag, str(value)]
    return args


def log_lines(path):
    return [m for m in (LOG_LINE.search(line) for line in open(path)) if m]


def poly(lr, i, max_iterations):
    return lr * (1 - i / max_iterations) ** 0.9


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return False


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b, where=''):
    """Every tensor of two nested containers equal, bit for bit (other leaves equal too)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f'{where}: keys {sorted(a)} != {sorted(b)}'
        for key in a:
            assert_same_tensors(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f'{where}[{i}]')
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f'{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max()})'
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


class Killed(BaseException):
    """The end of a process, inside this one (not an Exception: nothing may handle it)."""


def run_in_process(name, argv, kill_at=None):
    """`train_<name>.py`'s main in this process, with one thread as the launched processes have (OMP_NUM_THREADS=1:
    the CPU kernels round differently with another number of threads); with `kill_at`, stopped right after the
    resume file of that iteration is on disk, as a pre-empted job (no clean-up, no later file). Returns the
    trained student, or None when killed."""
    import importlib

    from utils import train_loop
    original = train_loop.Trainer._save
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def _save(self, is_best, wait=False):
        kill = self.state.iteration == kill_at
        original(self, is_best, wait=wait or kill)
        if kill:
            raise Killed()

    train_loop.Trainer._save = _save
    try:
        return importlib.import_module(f'train_{name}').main(argv)
    except Killed:
        return None
    finally:
        train_loop.Trainer._save = original
        torch.set_num_threads(threads)
