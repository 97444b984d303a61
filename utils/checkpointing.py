"""Files written by training: the student checkpoints and the resume file.

- `{stem}.pth` (latest) and `{stem}_best_model.pth` (best validation mIoU): a plain state dict of the
  student, without any `module.` prefix, loadable by `get_segmentation_model(..., pretrained=path)`;
- `{stem}_resume.pth`: everything needed to continue the run (student, trainable modules of the method,
  optimizer, iteration, best mIoU, random states per process, flags).

`stem` is `{method}_{model}_{backbone}_{dataset}`. Every file is written to a temporary file in the same
directory and renamed over the target, so a crash or a kill never leaves a half-written checkpoint.
"""
import os
import random
import tempfile
import threading

import numpy as np
import torch

from utils.errors import UserError

RESUME_FORMAT = 'hwd-resume-v1'

_UMASK = os.umask(0)
os.umask(_UMASK)

# Flags that must match between the interrupted run and its continuation: they fix the networks, the
# sample order and the learning-rate schedule.
RESUME_FIXED_FLAGS = ('dataset', 'batch_size', 'max_iterations', 'seed', 'crop_size')


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


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
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
    must not change after submission: pass copies (`plain_state_dict` makes them).
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
    return {key: value.detach().to('cpu', copy=True) for key, value in module.state_dict().items()}


# ---------------------------------------------------------------- random states

def capture_rng_state():
    """This process's random states, as tensors and plain lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        'python': [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


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


def make_resume_state(method, iteration, student_state, extra, optimizer, best_miou, rng_states, args, scaler=None):
    state = {
        'format': RESUME_FORMAT,
        'method': method,
        'iteration': int(iteration),
        'max_iterations': int(args.max_iterations),
        'best_miou': float(best_miou),
        'student': student_state,
        'extra': plain_state_dict(extra) if extra is not None else {},
        'optimizer': cpu_copy(optimizer.state_dict()),
        'rng': rng_states,
        'args': flags_for_resume(args),
    }
    if scaler is not None:
        state['scaler'] = cpu_copy(scaler.state_dict())
    return state


def load_resume_state(path):
    """Read and sanity-check a resume file (never runs code from the file)."""
    from models.checkpoint import safe_load
    state = safe_load(path, ResumeError, flag='--resume')
    if not isinstance(state, dict) or state.get('format') != RESUME_FORMAT:
        raise ResumeError(f'--resume {path}: not a resume file written by this training code (a plain '
                          'checkpoint goes to --pretrained / --student-pretrained instead)')
    return state


def check_resume_matches(state, path, method, model, backbone, args):
    """The resume file must come from the same method, networks, data and schedule."""
    saved = state.get('args', {})
    problems = []
    if state.get('method') != method:
        problems.append(f"method {state.get('method')!r} (this script trains {method!r})")
    saved_model = saved.get('student_model', saved.get('model'))
    saved_backbone = saved.get('student_backbone', saved.get('backbone'))
    if (saved_model, saved_backbone) != (model, backbone):
        problems.append(f'network {saved_model} {saved_backbone} (this run: {model} {backbone})')
    for key in RESUME_FIXED_FLAGS:
        if key in saved:
            now = getattr(args, key)
            now = list(now) if isinstance(now, tuple) else now
            if saved[key] != now:
                problems.append(f"--{key.replace('_', '-')} {saved[key]} (this run: {now})")
    if problems:
        raise ResumeError(f'--resume {path} belongs to another run: ' + '; '.join(problems) +
                          '. Use the same flags as the interrupted run, or another --save-dir.')
