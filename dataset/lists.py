"""List files: reading them, and building them by scanning a data set's standard layout.

A list line names one sample: `<image path> <label path>` separated by a tab or spaces (paths relative
to the data root), or an id (VOC always; COCO-Stuff and ADE20K lists of the original also use ids).
A Cityscapes test list holds image paths only.
"""
import glob
import os

from dataset.errors import DataError

DATASETS = ('citys', 'voc', 'ade20k', 'coco')
SPLITS = ('train', 'val', 'test')

# Folder of each split under images/ and annotations/ (ADE20K, COCO-Stuff) or leftImg8bit/, gtFine/.
_SPLIT_FOLDERS = {
    'citys': {'train': 'train', 'val': 'val', 'test': 'test'},
    'ade20k': {'train': 'training', 'val': 'validation'},
    'coco': {'train': 'train2017', 'val': 'val2017'},
    'voc': {'train': 'train', 'val': 'val'},
}
VOC_VAL_IDS = os.path.join('ImageSets', 'Segmentation', 'val.txt')


def _split_folder(key, split):
    try:
        return _SPLIT_FOLDERS[key][split]
    except KeyError:
        raise DataError(f'data set {key} has no {split} split here (choose from '
                        f'{", ".join(_SPLIT_FOLDERS.get(key, {}))})') from None


def layout_hint(key, split):
    """Where scanning looks for the samples of a split, for error messages."""
    folder = _SPLIT_FOLDERS.get(key, {}).get(split, split)
    return {
        'citys': f'leftImg8bit/{folder}/<city>/*_leftImg8bit.png with gtFine/{folder}/<city>/*_gtFine_labelIds.png',
        'voc': f'SegmentationClassAug/<id>.png with JPEGImages/<id>.jpg, split by {VOC_VAL_IDS}',
        'ade20k': f'images/{folder}/*.jpg with annotations/{folder}/*.png',
        'coco': f'images/{folder}/*.jpg with annotations/{folder}/*.png',
    }.get(key, '?')


def _id_paths(key, split, sample_id):
    """(image, label) relative paths of a sample given by its id."""
    if key == 'voc':
        return (os.path.join('JPEGImages', sample_id + '.jpg'),
                os.path.join('SegmentationClassAug', sample_id + '.png'))
    folder = _split_folder(key, split)
    return (os.path.join('images', folder, sample_id + '.jpg'),
            os.path.join('annotations', folder, sample_id + '.png'))


def _resolve(root, path):
    # Some published lists start their relative paths with '/' (e.g. '/JPEGImages/x.jpg').
    if os.path.isabs(path) and os.path.exists(path):
        return path
    return os.path.join(root, path.lstrip('/'))


def read_list(key, root, list_path, split, labelled=True):
    """[(image path, label path or None)] under root, from a list file."""
    try:
        with open(list_path, encoding='utf-8') as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f'cannot read list file {list_path}: {error}') from None
    entries = []
    for number, line in enumerate(lines, 1):
        fields = [f.strip() for f in (line.split('\t') if '\t' in line else line.split())]
        fields = [f for f in fields if f]
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(f'line {number} of list file {list_path} has {len(fields)} fields; expected '
                            f'"<image> <label>" separated by a tab or spaces (tab-separate paths with spaces)')
        if len(fields) == 1 and labelled:
            token = fields[0]
            if key == 'citys' or os.path.splitext(token)[1].lower() in ('.png', '.jpg', '.jpeg'):
                raise DataError(f'line {number} of list file {list_path} names one file ({token}); '
                                f'expected "<image> <label>"')
            image, label = _id_paths(key, split, token)
        elif len(fields) == 1:
            image, label = fields[0], None
        else:
            image, label = fields[0], (fields[1] if labelled else None)
        entries.append((_resolve(root, image), None if label is None else _resolve(root, label)))
    return entries


def scan_layout(key, root, split, labelled=True):
    """[(image path, label path or None)] found in the standard layout of the split, sorted."""
    if key == 'voc':
        return _scan_voc(root, split)
    folder = _split_folder(key, split)
    if key == 'citys':
        images = sorted(glob.glob(os.path.join(glob.escape(root), 'leftImg8bit', folder, '*',
                                               '*_leftImg8bit.png')))
        entries = []
        for image in images:
            city = os.path.basename(os.path.dirname(image))
            stem = os.path.basename(image)[:-len('_leftImg8bit.png')]
            label = os.path.join(root, 'gtFine', folder, city, stem + '_gtFine_labelIds.png')
            entries.append((image, label if labelled else None))
        return entries
    # ADE20K and COCO-Stuff: images/<split>/<name>.jpg, annotations/<split>/<name>.png
    images = sorted(glob.glob(os.path.join(glob.escape(root), 'images', folder, '*.jpg')))
    return [(image, os.path.join(root, 'annotations', folder,
                                 os.path.splitext(os.path.basename(image))[0] + '.png') if labelled else None)
            for image in images]


def _read_ids(path):
    with open(path, encoding='utf-8') as handle:
        return [line.split()[0] for line in handle if line.strip()]


def _scan_voc(root, split):
    # The augmented training set is every SBD/VOC label except the VOC 2012 validation images.
    val_file = os.path.join(root, VOC_VAL_IDS)
    if split not in ('train', 'val'):
        raise DataError(f'data set voc has no {split} split here (choose from train, val)')
    if not os.path.isfile(val_file):
        raise DataError(f'cannot build the VOC {split} list by scanning {root}: {val_file} (the '
                        f'validation ids) is missing; give list files (settings.py DATALIST_VOC_TRAIN, '
                        f'DATALIST_VOC_VAL)')
    val_ids = _read_ids(val_file)
    if split == 'val':
        ids = val_ids
    else:
        excluded = set(val_ids)
        labels = glob.glob(os.path.join(glob.escape(root), 'SegmentationClassAug', '*.png'))
        ids = sorted(i for i in (os.path.splitext(os.path.basename(p))[0] for p in labels) if i not in excluded)
    return [tuple(os.path.join(root, p) for p in _id_paths('voc', split, i)) for i in ids]


def format_list(key, root, entries):
    """List file text for entries: VOC ids, otherwise tab-separated paths relative to root."""
    lines = []
    for image, label in entries:
        rel_image = os.path.relpath(image, root)
        if key == 'voc':
            lines.append(os.path.splitext(os.path.basename(rel_image))[0])
        elif label is None:
            lines.append(rel_image)
        else:
            lines.append(rel_image + '\t' + os.path.relpath(label, root))
    return ''.join(line + '\n' for line in lines)
