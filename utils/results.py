"""Machine-readable results: what eval.py and training write beside their text logs, and what
`python -m utils.compare` reads.

- eval.py: `{save_dir}/{model}_{backbone}_{dataset}_{method}_{split}.json`, one object: data set, split,
  number of images, scales, flip, the checkpoint's file name and SHA-256, pixAcc, mIoU and the per-class
  IoU by class name (percent; null for a class that occurs neither in the labels nor in the predictions);
- training: `{stem}_flags.json` (the run's flags, method, networks, data set and seed, written once at
  the start) and `{stem}_history.jsonl` (one object per validation: iteration, pixAcc, mIoU, per-class
  IoU, the means of the loss terms since the previous validation; the first also holds the teacher's
  pixAcc and mIoU in a distillation run), in --log-dir and, when it is another folder, in --save-dir.
"""
import hashlib
import json
import math
import os

FLAGS_SUFFIX = '_flags.json'
# Flags (argparse names) that say where and how a run executes, not what it computes: they may change on
# resume, and runs of a sweep that differ only in these (and --seed) are seeds of one setting.
EXECUTION_FLAGS = frozenset({
    'workers', 'gpu_id', 'no_cuda', 'local_rank', 'save_dir', 'log_dir', 'log_iter', 'save_per_iters',
    'val_per_iters', 'skip_val', 'resume', 'overwrite', 'data', 'rank', 'world_size', 'distributed', 'device'})
# Checkpoint flags: a file may move to another folder, so only its name must stay the same.
FILE_FLAGS = frozenset({
    'pretrained', 'pretrained_base', 'teacher_pretrained', 'teacher_pretrained_base', 'student_pretrained',
    'student_pretrained_base'})
HISTORY_SUFFIX = '_history.jsonl'


def percent(value):
    """A fraction as a percentage rounded to 1e-6, or None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if math.isnan(value) else round(value * 100, 6)


def metrics_record(pix_acc, miou, iou, class_names):
    """{'pixAcc', 'mIoU', 'IoU': {class name: IoU}} in percent."""
    return {'pixAcc': percent(pix_acc), 'mIoU': percent(miou),
            'IoU': {str(name): percent(value) for name, value in zip(class_names, iou.tolist(), strict=True)}}


def file_sha256(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, obj):
    """Write `obj` as indented JSON through a temporary file, so that a reader never sees half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f'{path}.partial'
    with open(partial, 'w', encoding='utf-8') as handle:
        json.dump(obj, handle, indent=1, allow_nan=False)
        handle.write('\n')
    os.replace(partial, path)


def read_history(path):
    """The objects of a history file, one a line (a missing file has none)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding='utf-8') as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_history(path, records):
    """Rewrite a history file with `records`, one JSON object a line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f'{path}.partial'
    with open(partial, 'w', encoding='utf-8') as handle:
        for record in records:
            handle.write(json.dumps(record, allow_nan=False) + '\n')
    os.replace(partial, path)
