"""Reading checkpoints safely and loading them into a network, with errors that say what is wrong.

Files are read with `torch.load(weights_only=True)`: a pickle that names anything but tensors and
plain containers is refused before any of it runs.
"""
import logging
import os
import pickle
import re
from collections.abc import Mapping

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

# Extra keys of the ImageNet backbone files (classification layers) that the dilated backbones lack.
BACKBONE_EXTRA_PREFIXES = ('fc.', 'classifier.', 'features.18.', 'head.')
# Share of the backbone's tensors a backbone file must provide: fewer means it is the wrong file.
MIN_BACKBONE_COVERAGE = 0.9
# How many keys of each kind an error message lists.
SHOW_KEYS = 5


class CheckpointError(UserError):
    """A checkpoint file that cannot be read, or does not fit the network asked for."""


def no_file(path):
    """True for the spellings of "no file": None, '' and the string 'None' of the original scripts."""
    return path is None or (isinstance(path, str) and path in ('', 'None'))


def _is_tensor_mapping(obj):
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_failure(exc):
    """Why torch.load(weights_only=True) refused a file, in one line."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(exc))
    detail = text.split('WeightsUnpickler error:', 1)[-1].split('Check the documentation')[0]
    detail = ' '.join(detail.split())
    refused_global = re.search(r'Unsupported global: GLOBAL (\S+)', detail)
    if refused_global:
        return ('it holds Python objects, not only tensors (%s), which could run code when loaded; '
                'refused without running anything' % refused_global.group(1))
    if 'WeightsUnpickler error:' not in text:
        detail = ' '.join(text.split())
    return 'it is not a PyTorch checkpoint (%s: %s)' % (type(exc).__name__, detail[:200] or 'no detail')


def safe_load(path, error_type=None, flag='checkpoint'):
    """torch.load(path, weights_only=True) on the CPU; a missing file, or one that is not a checkpoint
    or would run code, raises `error_type` (CheckpointError) with one line naming `flag` and the file."""
    error_type = error_type or CheckpointError
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = 'is a directory, not a file' if os.path.isdir(path) else 'does not exist'
        raise error_type('%s %s %s' % (flag, path, what))
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, OSError, AttributeError,
            ImportError, IndexError, KeyError, UnicodeDecodeError) as exc:
        # What torch.load raises for a file that is not a checkpoint (zip or legacy pickle) or that would
        # need code to load; anything else is a bug and propagates.
        raise error_type('cannot read %s %s: %s' % (flag, path, _load_failure(exc))) from None


def is_resume_file(obj):
    """Whether a loaded checkpoint is a resume file of the training loop (utils/train_state.py), which holds the
    student's weights under 'student' beside the optimizer and the rest of the run."""
    return isinstance(obj, Mapping) and str(obj.get('format', '')).startswith('hwd-resume') and \
        _is_tensor_mapping(obj.get('student'))


def read_state_dict(path):
    """The state dict stored in `path` (tensors on the CPU), without a DistributedDataParallel
    `module.` prefix. A plain state dict is the format; a dict that wraps one under 'state_dict' or
    'model' (a training checkpoint) is accepted too, and a resume file gives its student's weights (the log says
    so). Anything else raises CheckpointError naming the file; nothing in the file is executed."""
    obj = safe_load(path)
    state = obj
    if is_resume_file(obj):
        logger.info('%s is a resume file: using the weights of its student (iteration %s)', path,
                    obj.get('iteration', '?'))
        state = obj['student']
    elif isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        for wrapper in ('state_dict', 'model'):
            if _is_tensor_mapping(obj.get(wrapper)):
                state = obj[wrapper]
                break
    if not _is_tensor_mapping(state):
        raise CheckpointError('checkpoint %s holds a %s, not a state dict (a mapping from parameter '
                              'names to tensors)' % (path, type(obj).__name__))
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


# The final 1x1 classifiers of the heads (DeepLabV3, PSP, UPerNet, SegFormer, and SegFormer in the layout of
# the official release): their rows are the number of classes.
CLASSIFIER_KEYS = ('head.block.4.weight', 'head.classifier.weight', 'head.conv_last.1.weight', 'linear_pred.weight',
                   'decode_head.linear_pred.weight')


def classifier_rows(state):
    """Number of classes of a whole-network state dict (rows of its final classifier), or None."""
    for key in CLASSIFIER_KEYS:
        if key in state:
            return int(state[key].shape[0])
    return None


def _compare(state, expected):
    """(missing, unexpected, wrongly shaped) keys of `state` against `expected` (name -> tensor)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    return missing, unexpected, wrong_shape


def _list_keys(title, keys, describe=lambda k: k):
    if not keys:
        return None
    shown = ', '.join(describe(k) for k in keys[:SHOW_KEYS])
    more = ', ... (%d more)' % (len(keys) - SHOW_KEYS) if len(keys) > SHOW_KEYS else ''
    return '%d %s: %s%s' % (len(keys), title, shown, more)


def _shape_text(shape):
    return '[%s]' % ', '.join(str(d) for d in shape)


def load_network_checkpoint(net, state, path, describe, identify=None):
    """Load the whole-network state dict `state`, read from `path`, strictly; `describe` = (model, backbone,
    num_class).

    Only `num_batches_tracked` counters may be absent (files from old PyTorch versions lack them;
    they do not change the outputs). Any other difference raises one CheckpointError that first says
    which network the file holds (`identify(state)` -> text or None) and then lists the missing,
    unexpected and wrongly shaped keys."""
    model, backbone, num_class = describe
    expected = net.state_dict()
    missing, unexpected, wrong_shape = _compare(state, expected)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected or wrong_shape:
        found = identify(state) if identify is not None else None
        parts = [
            _list_keys('wrongly shaped keys (file vs network)', wrong_shape,
                       lambda k: '%s %s vs %s' % (k, _shape_text(state[k].shape),
                                                  _shape_text(expected[k].shape))),
            _list_keys('missing keys', missing),
            _list_keys('unexpected keys', unexpected),
        ]
        message = 'checkpoint %s does not fit the network asked for (model=%s, backbone=%s, num_class=%d)' % (
            path, model, backbone, num_class)
        if found is not None:
            found_model, found_backbone, found_classes = found
            message += ': this file is a %s/%s network for %d classes' % (found_model, found_backbone, found_classes)
            if (found_model, found_backbone) == (model, backbone):
                message += '; pick the --dataset it was trained on'
            else:
                message += ('; pass --model %s --backbone %s (or the matching --teacher-*/--student-* flags)'
                            % (found_model, found_backbone))
        else:
            rows = classifier_rows(state)
            if rows is not None and rows != num_class and not missing and not unexpected:
                message += ': its classifier has %d classes; pick the --dataset it was trained on' % rows
            else:
                message += ': it matches no network of the model zoo; check --model/--backbone (or '
                message += '--teacher-*/--student-*) against the file'
        message += '. Keys: ' + '; '.join(p for p in parts if p)
        raise CheckpointError(message)
    net.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent, checked above
    logger.info('loaded %d tensors of model=%s backbone=%s from %s', len(state), model, backbone, path)


def _strip_prefix(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def plain_layout(prefixes=('',)):
    """An ImageNet layout whose keys are the backbone's own names, possibly under one of `prefixes` (a whole
    segmentation network's `pretrained.`, an OpenMMLab file's `backbone.`): the prefix under which the file
    matches best is used."""
    def convert(state, expected):
        candidates = [_strip_prefix(state, prefix) for prefix in prefixes]
        best = max(candidates, key=lambda s: sum(k in expected for k in s))
        return best if any(k in expected for k in best) else None
    return convert


def load_backbone_checkpoint(net, path, backbone_name=''):
    """Load an ImageNet backbone file into the network's backbone (`net.imagenet_target()`).

    The file's layout is found among `net.imagenet_layouts()` (name, convert(state, expected) -> state in the
    backbone's names or None): the layout that provides the most of the backbone's tensors is used, and the
    log names it. Keys the backbone does not have (classification layers) are skipped. Coverage is counted
    over the weights and running statistics, not `num_batches_tracked` (which some released files lack); fewer
    than 90% of them found, or any found with a wrong shape, raises CheckpointError. Returns (found, counted).
    """
    state = read_state_dict(path)
    root, counted = net.imagenet_target()
    expected = root.state_dict()
    label = ('%s backbone' % backbone_name) if backbone_name else 'backbone'
    best_name, best, best_found = None, {}, []
    for name, convert in net.imagenet_layouts():
        converted = convert(state, expected)
        if converted is None:
            continue
        found = [k for k in counted if k in converted]
        if len(found) > len(best_found):
            best_name, best, best_found = name, converted, found
    state, found = best, best_found
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong_shape:
        raise CheckpointError(
            'backbone checkpoint %s does not fit the %s: %s. Is it the file for this backbone '
            '(--pretrained-base / --student-pretrained-base)?' % (
                path, label, _list_keys('wrongly shaped keys (file vs network)', wrong_shape,
                                        lambda k: '%s %s vs %s' % (k, _shape_text(state[k].shape),
                                                                   _shape_text(expected[k].shape)))))
    if len(found) < MIN_BACKBONE_COVERAGE * len(counted):
        missing = [k for k in counted if k not in state]
        layouts = ', '.join(name for name, _ in net.imagenet_layouts())
        raise CheckpointError(
            'backbone checkpoint %s holds only %d of the %d tensors of the %s (at least %d%% needed; layouts '
            'read: %s): %s. Is it the file for this backbone (--pretrained-base / --student-pretrained-base)?'
            % (path, len(found), len(counted), label, round(100 * MIN_BACKBONE_COVERAGE), layouts,
               _list_keys('missing keys', missing)))
    usable = {k: v for k, v in state.items() if k in expected}
    skipped = [k for k in state if k not in expected and not k.startswith(BACKBONE_EXTRA_PREFIXES)]
    if skipped:
        logger.warning('ignored %s in backbone checkpoint %s', _list_keys('unknown keys', skipped), path)
    if len(found) < len(counted):
        logger.warning('backbone checkpoint %s lacks %s; they keep their initial values', path,
                       _list_keys('tensors', [k for k in counted if k not in state]))
    root.load_state_dict(usable, strict=False)
    logger.info('loaded %d of %d backbone tensors from %s (layout: %s)', len(found), len(counted), path, best_name)
    return len(found), len(counted)
