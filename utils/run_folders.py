"""What a training run may write where, checked before it writes anything.

A run's files are named by its stem, `{method}_{model}_{backbone}_{dataset}` (`utils.checkpointing`), in
`--save-dir` (checkpoints, resume file, flags and history) and `--log-dir` (log, flags and history). So that no
finished work is ever lost to a typo or a second launch:

- `utils.options.check_output_folder` (at argument time, creating nothing): --save-dir / --log-dir must be a
  folder this user can write, or a place where one can be made;
- `claim_run_folders`: rank 0 takes the run's lock (`{stem}.lock` in each folder) and refuses a folder that
  already holds this stem's results (checkpoints, resume file or history) unless the run continues them
  (`--resume auto`) or replaces them (`--overwrite`); the other processes learn the verdict, so that every
  process stops (rank 0 printing why), or none does;
- `RunLock`: one file per folder and stem, created atomically (O_CREAT | O_EXCL) with the pid and host of the
  run that holds it, touched every LOCK_HEARTBEAT seconds and removed when the run ends, also on errors and
  signals. A lock left by a run that was killed is taken over, with a warning in the run's log: on the same host
  when its process is gone, from another host when it has not been touched for LOCK_STALE_SECONDS.
"""
import json
import os
import secrets
import socket
import threading
import time

from utils.checkpointing import checkpoint_paths, checkpoint_stem
from utils.distributed import agree_on_error
from utils.errors import UserError
from utils.options import student_names
from utils.results import FLAGS_SUFFIX, HISTORY_SUFFIX

LOCK_SUFFIX = '.lock'
LOG_SUFFIX = '_log.txt'  # the run's log in --log-dir
# A running run touches its lock this often; a lock of another host untouched for LOCK_STALE_SECONDS is stale.
LOCK_HEARTBEAT = 30.0
LOCK_STALE_SECONDS = 300.0
# A lock file still empty this long after its creation was left by a process killed while writing it.
EMPTY_LOCK_SECONDS = 10.0


def run_stem(args, method):
    """The stem of a run's file names: `{method}_{model}_{backbone}_{dataset}` (the student's networks)."""
    model, backbone, _, _ = student_names(args)
    return checkpoint_stem(method, model, backbone, args.dataset)


def _folders(args):
    """The run's folders: --save-dir and, when it is another folder, --log-dir."""
    folders = [os.path.abspath(os.path.expanduser(args.save_dir))]
    log_dir = os.path.abspath(os.path.expanduser(args.log_dir))
    if log_dir != folders[0]:
        folders.append(log_dir)
    return folders


def result_files(args, stem):
    """The files of the run's results in its folders: checkpoints, resume file and history (not the flags file
    or the log, which a run that stopped before its first save also leaves)."""
    paths = list(checkpoint_paths(args.save_dir, stem).values())
    return paths + [os.path.join(folder, stem + HISTORY_SUFFIX) for folder in _folders(args)]


def _overwritten_files(args, stem):
    """Everything --overwrite removes: the results, the flags files and the log."""
    folders = _folders(args)
    log_dir = folders[-1]
    return (result_files(args, stem) + [os.path.join(folder, stem + FLAGS_SUFFIX) for folder in folders]
            + [os.path.join(log_dir, stem + LOG_SUFFIX)])


def _describe(paths, shown=3):
    names = [os.path.basename(path) for path in paths]
    return ', '.join(names[:shown]) + (f' and {len(names) - shown} more' if len(names) > shown else '')


def check_not_overwriting(args, stem, method):
    """Refuse a run that would replace the results of another run in its folders (see the module docstring)."""
    found = [path for path in result_files(args, stem) if os.path.exists(path)]
    if not found or getattr(args, 'overwrite', False):
        return
    folder = os.path.dirname(found[0])
    resume_path = checkpoint_paths(args.save_dir, stem)['resume']
    ways = 'continue that run with --resume auto, give another --save-dir / --log-dir, or replace it with --overwrite'
    if args.resume is None:
        raise UserError(f'{folder} already holds the files of an earlier {method} run of the same networks and data '
                        f'set ({_describe(found)}); this run would overwrite them: {ways}')
    if args.resume == 'auto' and not os.path.isfile(resume_path):
        raise UserError(f'--resume auto: {folder} holds files of this run ({_describe(found)}) but no resume file '
                        f'{os.path.basename(resume_path)} to continue from; starting afresh would overwrite them: '
                        'give another --save-dir / --log-dir, or replace them with --overwrite')
    own_file = args.resume == 'auto' or (os.path.exists(resume_path) and os.path.samefile(args.resume, resume_path))
    if not own_file:
        raise UserError(f'--resume {args.resume} would continue into {folder}, which holds the files of another '
                        f'run ({_describe(found)}): {ways}')


def _remove_overwritten(args, stem):
    removed = []
    for path in _overwritten_files(args, stem):
        if os.path.exists(path):
            os.remove(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- the lock

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """The lock files of one run (one per folder); `acquire` raises UserError when another live run holds one."""

    def __init__(self, paths):
        self.paths = list(paths)
        self.held = []
        self.removed = []  # the files of an earlier run that --overwrite removed
        self.warnings = []  # locks taken over, to log once logging is set up
        self.text = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'token': secrets.token_hex(8)})
        self._stop = threading.Event()
        self._heartbeat = None

    def acquire(self):
        try:
            for path in self.paths:
                self._acquire_one(path)
                self.held.append(path)
        except BaseException:
            self.release()
            raise
        self._heartbeat = threading.Thread(target=self._touch, name='run-lock-heartbeat', daemon=True)
        self._heartbeat.start()
        return self

    def _acquire_one(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._stale_holder(path)
                if holder is not None:
                    self._take_over(path, holder)
                continue
            with os.fdopen(fd, 'w', encoding='utf-8') as handle:
                handle.write(self.text)
            return
        raise UserError(f'could not take the lock {path}: other runs keep taking it; is another run starting into '
                        'the same folder?')

    def _stale_holder(self, path):
        """The text of the lock at `path` when the run holding it is gone (None: it is alive; raises UserError)."""
        try:
            with open(path, encoding='utf-8') as handle:
                text = handle.read()
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return None  # released meanwhile: try again
        try:
            holder = json.loads(text)
            pid, host = int(holder['pid']), str(holder['host'])
        except (ValueError, KeyError, TypeError):
            if age > EMPTY_LOCK_SECONDS:  # a process killed between creating and writing it
                return text
            time.sleep(0.2)  # being written right now
            return None
        if host == socket.gethostname():
            if pid != os.getpid() and _pid_alive(pid):
                raise UserError(f'another run (pid {pid}, started {holder.get("started")}) is writing the same files '
                                f'in {os.path.dirname(path)} (lock {path}): wait for it, or give another --save-dir '
                                '/ --log-dir (if no such run is going on, remove the lock file)')
            self.warnings.append(f'took over the lock {path} of a run that is gone (pid {pid}, started '
                                 f'{holder.get("started")})')
            return text
        if age <= LOCK_STALE_SECONDS:
            raise UserError(f'a run on {host} (pid {pid}, started {holder.get("started")}) is writing the same files '
                            f'in {os.path.dirname(path)} (lock {path}, touched {age:.0f} s ago): wait for it, or give '
                            f'another --save-dir / --log-dir (a lock untouched for {LOCK_STALE_SECONDS:.0f} s is '
                            'taken over)')
        self.warnings.append(f'took over the lock {path} of a run on {host} (pid {pid}) that has not touched it for '
                             f'{age:.0f} s')
        return text

    @staticmethod
    def _take_over(path, stale_text):
        """Remove the stale lock, unless another process took it over first (then its fresh lock is put back)."""
        moved = f'{path}.{secrets.token_hex(6)}.stale'
        try:
            os.rename(path, moved)
        except FileNotFoundError:
            return
        with open(moved, encoding='utf-8') as handle:
            fresh = handle.read() != stale_text
        if fresh:
            try:
                os.link(moved, path)
            except FileExistsError:
                pass
        os.remove(moved)

    def _touch(self):
        while not self._stop.wait(LOCK_HEARTBEAT):
            for path in self.held:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def release(self):
        """Remove the lock files this run holds (only while they are still its own)."""
        self._stop.set()
        for path in reversed(self.held):
            try:
                with open(path, encoding='utf-8') as handle:
                    if handle.read() != self.text:
                        continue
                os.remove(path)
            except OSError:
                pass
        self.held = []


def claim_run_folders(args, method, ctx):
    """Rank 0 takes the run's locks and checks that the run overwrites nothing (with --overwrite: removes the
    earlier run's files); a refusal stops every process (rank 0 prints it). Returns the RunLock to release at the
    end (None on the other ranks)."""
    stem = run_stem(args, method)
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = RunLock([os.path.join(folder, stem + LOCK_SUFFIX) for folder in _folders(args)]).acquire()
            check_not_overwriting(args, stem, method)
            if getattr(args, 'overwrite', False):
                lock.removed = _remove_overwritten(args, stem)
        except (UserError, OSError) as refused:
            error = refused if isinstance(refused, UserError) else UserError(
                f'cannot prepare --save-dir {args.save_dir} / --log-dir {args.log_dir}: {refused}')
            if lock is not None:
                lock.release()
                lock = None
    agree_on_error(error)
    return lock
