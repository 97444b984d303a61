"""Files written by training: the student checkpoints and the resume file.

- `{stem}.pth` (latest) and `{stem}_best_model.pth` (best validation mIoU): a plain state dict of the
  student, without any `module.` prefix, loadable by `get_segmentation_model(..., pretrained=path)`;
- `{stem}_resume.pth`: everything needed to continue the run (student, the method's modules, buffers,
  optimizers and generators, the student's optimizer, iteration, best mIoU, flags).

`stem` is `{method}_{model}_{backbone}_{dataset}`. Every file is written to a temporary file in the same
directory and renamed over the target, so a crash or a kill never leaves a half-written checkpoint.
"""
import os
import secrets
import threading

import torch

from models.checkpoint import safe_load
from utils.errors import UserError
from utils.results import EXECUTION_FLAGS, FILE_FLAGS

RESUME_FORMAT = 'hwd-resume-v3'


class ResumeError(UserError):
    """A resume file that cannot continue this run."""


def checkpoint_stem(method, model, backbone, dataset):
    return f'{method}_{model}_{backbone}_{dataset}'


def checkpoint_paths(save_dir, stem):
    """Paths of the latest, best and resume files."""
    save_dir = os.path.expanduser(save_dir)
    return {
        'latest': os.path.join(save_dir, f'{stem}.pth'),
        'best': os.path.join(save_dir, f'{stem}_best_model.pth'),
        'resume': os.path.join(save_dir, f'{stem}_resume.pth'),
    }


def _create_temporary(directory, base):
    """A new file beside the target, opened for writing. Created with mode 0o666 so that the process's
    umask gives it the usual permissions (mkstemp would make it 0600)."""
    while True:
        path = os.path.join(directory, f'.{base}.{secrets.token_hex(6)}.tmp')
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = _create_temporary(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb') as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise


class BackgroundWriter:
    """Writes checkpoints in a thread so that training does not wait for the disk.

    `submit` first waits for the previous batch of files (at most one batch in flight, so memory stays
    bounded) and re-raises its error, if any; `wait` blocks until everything is on disk. The objects
    must not change after submission: pass copies (`cpu_copy` makes them).
    """

    def __init__(self):
        self._thread = None
        self._error = None

    def _write(self, items):
        try:
            for obj, path in items:
                atomic_save(obj, path)
        except BaseException as error:  # reported to the training thread by wait()
            self._error = error

    def submit(self, items):
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(list(items),), name='checkpoint-writer',
                                        daemon=False)
        self._thread.start()

    def wait(self, quiet=False):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and quiet:
            self._error = None
        if self._error is not None:
            error, self._error = self._error, None
            raise UserError(f'could not write a checkpoint: {error} (check --save-dir: free space, '
                            'permissions)') from error


def cpu_copy(obj):
    """Nested dicts / lists with every tensor copied to the CPU (a snapshot later steps cannot alter)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {key: cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(value) for value in obj)
    return obj


def plain_state_dict(module):
    """State dict of a network, unwrapped from DDP, on the CPU (copies, so later steps cannot alter it)."""
    module = getattr(module, 'module', module)
    return cpu_copy(module.state_dict())


# ---------------------------------------------------------------- resume file

def flags_for_resume(args):
    """The flags as plain values (for the record and the consistency check on resume)."""
    plain = {}
    for key, value in vars(args).items():
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str)) or (
                isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
            plain[key] = value
    return plain


def load_resume_state(path):
    """Read and sanity-check a resume file (never runs code from the file)."""
    state = safe_load(path, ResumeError, flag='--resume')
    if not isinstance(state, dict) or state.get('format') != RESUME_FORMAT:
        raise ResumeError(f'--resume {path}: not a resume file written by this version of the training code (a '
                          'plain checkpoint goes to --pretrained / --student-pretrained instead)')
    return state


def _flag_value(key, value):
    if key in FILE_FLAGS and isinstance(value, str):
        return os.path.basename(os.path.normpath(value))
    return value


def resume_differences(saved, args):
    """The run-defining flags whose values differ between a resume file's flags and this run's, as
    ['--flag saved (this run: now)', ...]. Flags that only say where and how the run executes (workers,
    folders, logging, validation) may differ; checkpoint flags compare by file name."""
    now = flags_for_resume(args)
    problems = []
    for key in sorted(set(saved) | set(now)):
        if key in EXECUTION_FLAGS:
            continue
        before, after = _flag_value(key, saved.get(key)), _flag_value(key, now.get(key))
        if before != after:
            shown = lambda v: 'unset' if v is None else v  # noqa: E731
            problems.append(f"--{key.replace('_', '-')} {shown(before)} (this run: {shown(after)})")
    return problems


def check_resume_matches(state, path, method, args):
    """The resume file must come from the same method and the same run-defining flags."""
    problems = []
    if state.get('method') != method:
        problems.append(f"method {state.get('method')!r} (this script trains {method!r})")
    problems += resume_differences(state.get('args', {}), args)
    if problems:
        raise ResumeError(f'--resume {path} belongs to another run: ' + '; '.join(problems) +
                          '. Use the same flags as the interrupted run, or another --save-dir.')
