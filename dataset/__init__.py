"""The data sets by `--dataset` name: `DATASETS`, `dataset_info` and `build_dataset`.

`DATASET_INFO` is the one registry of the built-in data sets (their names, classes, settings.py variables
and classes per split); `folder` is a user's own data set, whose classes are read from `DIR/classes.txt`.
`DATASET_ALIASES` are other names `--dataset` accepts for a built-in data set (CIRKD's `coco_stuff_164k` for
`coco`): everything here resolves them, while the scripts keep the name the user typed in their file names.
"""
import os
from typing import NamedTuple, Optional

import settings
from dataset.class_names import ADE20K_CLASSES, CAMVID_CLASSES, CITYSCAPES_CLASSES, COCO_STUFF_CLASSES, VOC_CLASSES
from dataset.datasets import (
    CITYSCAPES_LABELID_TO_TRAINID,
    CITYSCAPES_TRAINID_TO_LABELID,
    MEAN_BGR,
    ADETestSet,
    ADETrainSet,
    ADEValSet,
    CamvidTestSet,
    CamvidTrainSet,
    CamvidValSet,
    COCOTestSet,
    COCOTrainSet,
    COCOValSet,
    CSTestSet,
    CSTrainValSet,
    CSValSet,
    DataError,
    FolderTestSet,
    FolderTrainSet,
    FolderValSet,
    VOCDataSet,
    VOCDataTestSet,
    VOCDataValSet,
    read_class_names,
)

__all__ = ['DATASETS', 'SPLITS', 'FOLDER', 'DATASET_INFO', 'DATASET_ALIASES', 'DatasetInfo', 'dataset_info',
           'canonical_name', 'build_dataset', 'resolve_root', 'settings_list_path', 'check_ignore_label',
           'DataError', 'MEAN_BGR', 'CITYSCAPES_LABELID_TO_TRAINID', 'CITYSCAPES_TRAINID_TO_LABELID']

_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAINING_ONLY = ('max_iters', 'crop_size', 'scale', 'mirror')
FOLDER = 'folder'


class DatasetInfo(NamedTuple):
    num_class: int
    class_names: list
    root_setting: Optional[str]           # settings.py variable of the data root (None: --data only)
    list_settings: dict                   # split -> settings.py variable of the list file
    classes: dict                         # split -> data set class
    test_root_setting: Optional[str] = None   # settings.py variable of a separate test root


DATASET_INFO = {
    'citys': DatasetInfo(19, CITYSCAPES_CLASSES, 'DATA_CS',
                         {'train': 'DATALIST_CS_TRAIN', 'val': 'DATALIST_CS_VAL', 'test': 'DATALIST_CS_TEST'},
                         {'train': CSTrainValSet, 'val': CSValSet, 'test': CSTestSet}),
    'voc': DatasetInfo(21, VOC_CLASSES, 'DATA_VOC',
                       {'train': 'DATALIST_VOC_TRAIN', 'val': 'DATALIST_VOC_VAL', 'test': 'DATALIST_VOC_TEST'},
                       {'train': VOCDataSet, 'val': VOCDataValSet, 'test': VOCDataTestSet}),
    'camvid': DatasetInfo(11, CAMVID_CLASSES, 'DATA_CAMVID',
                          {'train': 'DATALIST_CAMVID_TRAIN', 'val': 'DATALIST_CAMVID_VAL',
                           'test': 'DATALIST_CAMVID_TEST'},
                          {'train': CamvidTrainSet, 'val': CamvidValSet, 'test': CamvidTestSet}),
    'ade20k': DatasetInfo(150, ADE20K_CLASSES, 'DATA_ADE20K',
                          {'train': 'DATALIST_ADE20K_TRAIN', 'val': 'DATALIST_ADE20K_VAL',
                           'test': 'DATALIST_ADE20K_TEST'},
                          {'train': ADETrainSet, 'val': ADEValSet, 'test': ADETestSet}, 'DATA_ADE20K_TEST'),
    'coco': DatasetInfo(182, COCO_STUFF_CLASSES, 'DATA_COCO',
                        {'train': 'DATALIST_COCO_TRAIN', 'val': 'DATALIST_COCO_VAL', 'test': 'DATALIST_COCO_TEST'},
                        {'train': COCOTrainSet, 'val': COCOValSet, 'test': COCOTestSet}, 'DATA_COCO_TEST'),
}
# Another name -> the DATASET_INFO name it stands for.
DATASET_ALIASES = {'coco_stuff_164k': 'coco'}
_FOLDER_CLASSES = {'train': FolderTrainSet, 'val': FolderValSet, 'test': FolderTestSet}
# The names `--dataset` accepts.
DATASETS = tuple(DATASET_INFO) + tuple(DATASET_ALIASES) + (FOLDER,)
SPLITS = ('train', 'val', 'test')


def _unknown(name):
    return DataError(f'unknown data set {name!r} (--dataset): choose from {", ".join(DATASETS)}')


def canonical_name(name):
    """The DATASET_INFO name of `name` (an alias resolved); other names unchanged."""
    return DATASET_ALIASES.get(name, name)


def dataset_info(name, data_root=None):
    """The DatasetInfo of `name` (or of the data set an alias names); for `folder`, built from
    `data_root/classes.txt` (--data is required)."""
    name = canonical_name(name)
    if name in DATASET_INFO:
        return DATASET_INFO[name]
    if name != FOLDER:
        raise _unknown(name)
    if data_root is None:
        raise DataError('--dataset folder needs --data DIR, the folder holding classes.txt, images/ and labels/')
    names = read_class_names(os.path.abspath(os.path.expanduser(os.fspath(data_root))))
    return DatasetInfo(len(names), names, None, {}, _FOLDER_CLASSES)


def _setting(name):
    """The value of a settings.py variable as a path, or None when it is missing or 'None' (an old
    settings.py copied from the original may lack the newer names)."""
    value = getattr(settings, name, None) if name else None
    if value is None or str(value) in ('', 'None'):
        return None
    # Relative paths in settings.py are relative to the repository (where settings.py lives).
    path = os.path.expanduser(str(value))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(_REPO_DIR, path))


def settings_list_path(name, split):
    """The list file settings.py names for the split of `name`, or None."""
    info = dataset_info(name) if name != FOLDER else None
    return _setting(info.list_settings.get(split)) if info else None


def check_ignore_label(name, ignore_label, num_class=None):
    """The ignore value must not be a class of the data set (it would silently drop that class)."""
    num_class = dataset_info(name).num_class if num_class is None else num_class
    if 0 <= ignore_label < num_class:
        raise DataError(f'--ignore-label {ignore_label} is a class of {name} (0..{num_class - 1}); use a '
                        f'negative value (default -1) or one >= {num_class}')


def resolve_root(name, data_root=None, flag='--data', split='train'):
    """The data root of `name` for `split`: data_root (the `flag` option) if given, else the settings.py
    value (the test root of ADE20K / COCO-Stuff for their test split); it must exist."""
    if data_root is not None:
        root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
        if not os.path.isdir(root):
            raise DataError(f'data root {root} ({flag}) does not exist; pass the folder of the {name} data set'
                            + ('' if name == FOLDER else f', or set it in settings.py and leave out {flag}'))
        return root
    if name == FOLDER:
        raise DataError(f'--dataset folder needs {flag} DIR, the folder holding classes.txt, images/ and labels/')
    info = dataset_info(name)
    variable = info.test_root_setting if split == 'test' and info.test_root_setting else info.root_setting
    root = _setting(variable)
    if root is None:
        raise DataError(f'settings.py does not set {variable} (the {split} images of {name}): set it, or pass '
                        f'{flag} DIR')
    if not os.path.isdir(root):
        raise DataError(f'data root {root} of the {name} {split} split does not exist: set {variable} in '
                        f'settings.py (now {getattr(settings, variable)!r}) or pass {flag} DIR')
    return root


def build_dataset(name, split, data_root=None, list_path=None, **kwargs):
    """The data set `name` (DATASETS) for split train / val / test.

    data_root: the data set's folder (--data; for the test split of ADE20K and COCO-Stuff, the folder of
    the test images); None means settings.py's root. list_path: a list file; None means settings.py's list
    file (a folder data set: DIR/<split>.txt), and when that does not exist the list is built by scanning
    the standard layout under the root (logged). kwargs go to the class (training: max_iters, crop_size,
    scale, mirror, ignore_label; val / test: ignore_label, and the training-only ones are dropped).
    """
    if split not in SPLITS:
        raise DataError(f'unknown split {split!r}: choose from {", ".join(SPLITS)}')
    info = dataset_info(name, data_root)
    root = resolve_root(name, data_root, split=split)
    if list_path is None:
        list_path = os.path.join(root, f'{split}.txt') if name == FOLDER else settings_list_path(name, split)
    if split != 'train':
        kwargs = {k: v for k, v in kwargs.items() if k not in _TRAINING_ONLY}
    return info.classes[split](root, list_path, **kwargs)
