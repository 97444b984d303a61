"""The data sets by `--dataset` name: `DATASET_INFO` and `build_dataset`."""
import os
from typing import NamedTuple, Optional

from dataset.class_names import ADE20K_CLASSES, CITYSCAPES_CLASSES, COCO_STUFF_CLASSES, VOC_CLASSES
from dataset.datasets import (CITYSCAPES_LABELID_TO_TRAINID, CITYSCAPES_TRAINID_TO_LABELID, MEAN_BGR,
                              ADETrainSet, ADEValSet, COCOTrainSet, COCOValSet, CSTestSet, CSTrainValSet,
                              CSValSet, DataError, VOCDataSet, VOCDataValSet)

__all__ = ['DATASET_INFO', 'DatasetInfo', 'build_dataset', 'resolve_root', 'check_ignore_label', 'DataError', 'MEAN_BGR',
           'CITYSCAPES_LABELID_TO_TRAINID', 'CITYSCAPES_TRAINID_TO_LABELID']

_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAINING_ONLY = ('max_iters', 'crop_size', 'scale', 'mirror')


class DatasetInfo(NamedTuple):
    num_class: int
    class_names: list
    root_setting: str                 # settings.py variable of the data root
    list_settings: dict               # split -> settings.py variable of the list file
    train_class: type
    val_class: type
    test_class: Optional[type] = None


DATASET_INFO = {
    'citys': DatasetInfo(19, CITYSCAPES_CLASSES, 'DATA_CS',
                         {'train': 'DATALIST_CS_TRAIN', 'val': 'DATALIST_CS_VAL', 'test': 'DATALIST_CS_TEST'},
                         CSTrainValSet, CSValSet, CSTestSet),
    'voc': DatasetInfo(21, VOC_CLASSES, 'DATA_VOC',
                       {'train': 'DATALIST_VOC_TRAIN', 'val': 'DATALIST_VOC_VAL'},
                       VOCDataSet, VOCDataValSet),
    'ade20k': DatasetInfo(150, ADE20K_CLASSES, 'DATA_ADE20K',
                          {'train': 'DATALIST_ADE20K_TRAIN', 'val': 'DATALIST_ADE20K_VAL'},
                          ADETrainSet, ADEValSet),
    'coco': DatasetInfo(182, COCO_STUFF_CLASSES, 'DATA_COCO',
                        {'train': 'DATALIST_COCO_TRAIN', 'val': 'DATALIST_COCO_VAL'},
                        COCOTrainSet, COCOValSet),
}


def _info(name):
    try:
        return DATASET_INFO[name]
    except KeyError:
        raise DataError(f'unknown data set {name!r} (--dataset): choose from {", ".join(DATASET_INFO)}') from None


def _from_settings(path):
    # Relative paths in settings.py are relative to the repository (where settings.py lives).
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(_REPO_DIR, path))


def check_ignore_label(name, ignore_label):
    """The ignore value must not be a class of the data set (it would silently drop that class)."""
    num_class = _info(name).num_class
    if 0 <= ignore_label < num_class:
        raise DataError(f'--ignore-label {ignore_label} is a class of {name} (0..{num_class - 1}); use a '
                        f'negative value (default -1) or one >= {num_class}')


def resolve_root(name, data_root=None, flag='--data'):
    """The data root of `name`: data_root (the `flag` option) if given, else the settings.py value;
    it must exist."""
    import settings
    info = _info(name)
    if data_root is not None:
        root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
        if not os.path.isdir(root):
            raise DataError(f'data root {root} ({flag}) does not exist; pass the folder of the {name} '
                            f'data set, or set {info.root_setting} in settings.py and leave out {flag}')
        return root
    configured = getattr(settings, info.root_setting)
    root = _from_settings(configured)
    if not os.path.isdir(root):
        raise DataError(f'data root {root} of the {name} data set does not exist: set '
                        f'{info.root_setting} in settings.py (now {configured!r}) or pass {flag} DIR')
    return root


def build_dataset(name, split, data_root=None, list_path=None, **kwargs):
    """The data set `name` (citys, voc, ade20k, coco) for split train / val / test.

    data_root: the data set's folder (--data); None means settings.py's root. list_path: a list file;
    None means settings.py's list file, and when that does not exist the list is built by scanning the
    standard layout under the root (logged on the 'dataset' logger). kwargs go to the class (training:
    max_iters, crop_size, scale, mirror, ignore_label; val / test: ignore_label, and the training-only
    ones are dropped).
    """
    import settings
    info = _info(name)
    classes = {'train': info.train_class, 'val': info.val_class, 'test': info.test_class}
    if split not in classes:
        raise DataError(f'unknown split {split!r}: choose from train, val, test')
    if classes[split] is None:
        raise DataError(f'data set {name} has no {split} split (choose from train, val)')
    root = resolve_root(name, data_root)
    if list_path is None:
        list_path = _from_settings(getattr(settings, info.list_settings[split]))
    if split != 'train':
        kwargs = {k: v for k, v in kwargs.items() if k not in _TRAINING_ONLY}
    return classes[split](root, list_path, **kwargs)

