"""List files: reading them, and building them by scanning a data set's standard layout.

A list line names one sample: `<image path> <label path>` separated by a tab or spaces (paths relative
to the data root), or a sample id (VOC always; ADE20K, COCO-Stuff, CamVid and folder lists may use ids too).
Test lists without labels hold image paths or ids only (CamVid's test split is labelled).
"""
import glob
import os

from dataset.errors import DataError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# CamVid's labels of split S lie in S + this suffix (trainannot/ beside train/).
CAMVID_LABEL_SUFFIX = 'annot'

# Folder of each split under images/ and annotations/ (ADE20K, COCO-Stuff), leftImg8bit/ and gtFine/
# (Cityscapes) or images/ and labels/ (a folder data set); CamVid's images are in the folder itself under the
# root and its labels in the folder + 'annot' (train/ and trainannot/). The ADE20K and COCO-Stuff test roots
# (DATA_ADE20K_TEST, DATA_COCO_TEST in settings.py) hold their images directly: folder ''.
_SPLIT_FOLDERS = {
    'citys': {'train': 'train', 'val': 'val', 'test': 'test'},
    'ade20k': {'train': 'training', 'val': 'validation', 'test': ''},
    'coco': {'train': 'train2017', 'val': 'val2017', 'test': ''},
    'voc': {'train': 'train', 'val': 'val', 'test': 'test'},
    'camvid': {'train': 'train', 'val': 'val', 'test': 'test'},
    'folder': {'train': 'train', 'val': 'val', 'test': 'test'},
}
# VOC 2012's lists of ids; scanning uses them to split the augmented set into train_aug / val / test.
VOC_ID_FILES = {'val': os.path.join('ImageSets', 'Segmentation', 'val.txt'),
                'test': os.path.join('ImageSets', 'Segmentation', 'test.txt')}


def _split_folder(key, split):
    try:
        return _SPLIT_FOLDERS[key][split]
    except KeyError:
        raise DataError(f'data set {key} has no {split} split here (choose from '
                        f'{", ".join(_SPLIT_FOLDERS.get(key, {}))})') from None


# Where the test images lie under a data set's root: ADE20K's SceneParsing release_test/testing/ (or an
# images/testing/ beside training/ and validation/), COCO's images/test2017/.
TEST_IMAGE_FOLDERS = {
    'ade20k': (os.path.join('release_test', 'testing'), os.path.join('images', 'testing')),
    'coco': (os.path.join('images', 'test2017'),),
}


def layout_hint(key, split, labelled=True):
    """Where scanning looks for the samples of a split, for error messages (the images alone for an unlabelled
    split)."""
    folder = _SPLIT_FOLDERS.get(key, {}).get(split, split)
    if split == 'test' and key in ('ade20k', 'coco'):
        places = ', '.join(f'{folder}/*.jpg' for folder in TEST_IMAGE_FOLDERS[key])
        return f'*.jpg directly under the test root, or under the data set root in {places}'
    if not labelled:
        return {
            'citys': f'leftImg8bit/{folder}/<city>/*_leftImg8bit.png',
            'camvid': f'{folder}/<name>.png',
            'folder': f'images/{folder}/<name>.jpg|png',
        }.get(key, layout_hint(key, split))
    return {
        'citys': f'leftImg8bit/{folder}/<city>/*_leftImg8bit.png with gtFine/{folder}/<city>/*_gtFine_labelIds.png',
        'voc': f'SegmentationClassAug/<id>.png with JPEGImages/<id>.jpg, split by {VOC_ID_FILES["val"]}'
               if split != 'test' else f'JPEGImages/<id>.jpg for the ids of {VOC_ID_FILES["test"]}',
        'ade20k': f'images/{folder}/*.jpg with annotations/{folder}/*.png',
        'coco': f'images/{folder}/*.jpg with annotations/{folder}/*.png',
        'camvid': f'{folder}/<name>.png with {folder}{CAMVID_LABEL_SUFFIX}/<name>.png',
        'folder': f'images/{folder}/<name>.jpg|png with labels/{folder}/<name>.png',
    }.get(key, '?')


def _id_paths(key, root, split, sample_id, labelled):
    """(image, label or None) relative paths of a sample given by its id."""
    if key == 'voc':
        return (os.path.join('JPEGImages', sample_id + '.jpg'),
                os.path.join('SegmentationClassAug', sample_id + '.png') if labelled else None)
    folder = _split_folder(key, split)
    if key == 'camvid':
        return (os.path.join(folder, sample_id + '.png'),
                os.path.join(folder + CAMVID_LABEL_SUFFIX, sample_id + '.png') if labelled else None)
    if key == 'folder':
        image = next((os.path.join('images', folder, sample_id + ext) for ext in IMAGE_EXTENSIONS
                      if os.path.isfile(os.path.join(root, 'images', folder, sample_id + ext))),
                     os.path.join('images', folder, sample_id + '.jpg'))
        return image, os.path.join('labels', folder, sample_id + '.png') if labelled else None
    if split == 'test':
        return sample_id + '.jpg', None
    return (os.path.join('images', folder, sample_id + '.jpg'),
            os.path.join('annotations', folder, sample_id + '.png') if labelled else None)


def _resolve(root, path):
    # Some published lists start their relative paths with '/' (e.g. '/JPEGImages/x.jpg').
    if os.path.isabs(path) and os.path.exists(path):
        return path
    return os.path.join(root, path.lstrip('/'))


def _is_image_path(token):
    return os.path.splitext(token)[1].lower() in IMAGE_EXTENSIONS


def read_list(key, root, list_path, split, labelled=True):
    """[(image path, label path or None)] under root, from a list file."""
    try:
        # utf-8-sig: a byte-order mark, which some editors write, is not part of the first path
        with open(list_path, encoding='utf-8-sig') as handle:
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
        token = fields[0]
        if len(fields) == 2:
            image, label = token, (fields[1] if labelled else None)
        elif key == 'voc' or not _is_image_path(token):
            if key == 'citys':
                raise DataError(f'line {number} of list file {list_path} names no image file ({token}); '
                                f'expected "<image> <label>"')
            image, label = _id_paths(key, root, split, token, labelled)
        elif labelled:
            raise DataError(f'line {number} of list file {list_path} names one file ({token}); '
                            f'expected "<image> <label>"')
        else:
            image, label = token, None
        entries.append((_resolve(root, image), None if label is None else _resolve(root, label)))
    return entries


def _glob(root, *parts):
    return sorted(glob.glob(os.path.join(glob.escape(root), *parts)))


def scan_layout(key, root, split, labelled=True):
    """[(image path, label path or None)] found in the standard layout of the split, sorted."""
    if key == 'voc':
        return _scan_voc(root, split, labelled)
    folder = _split_folder(key, split)
    if key == 'citys':
        entries = []
        for image in _glob(root, 'leftImg8bit', folder, '*', '*_leftImg8bit.png'):
            city = os.path.basename(os.path.dirname(image))
            stem = os.path.basename(image)[:-len('_leftImg8bit.png')]
            label = os.path.join(root, 'gtFine', folder, city, stem + '_gtFine_labelIds.png')
            entries.append((image, label if labelled else None))
        return entries
    if key == 'folder':
        return _pair_by_name(root, os.path.join('images', folder), os.path.join('labels', folder), labelled)
    if key == 'camvid':
        return _pair_by_name(root, folder, folder + CAMVID_LABEL_SUFFIX, labelled)
    if split == 'test':
        # The test root holds the images themselves (settings.py's DATA_ADE20K_TEST / DATA_COCO_TEST); given the
        # data set's root instead, they are found at their standard place under it.
        for where in ('',) + TEST_IMAGE_FOLDERS.get(key, ()):
            images = _glob(root, *filter(None, (where, '*.jpg')))
            if images:
                return [(image, None) for image in images]
        return []
    return [(image, os.path.join(root, 'annotations', folder, _stem(image) + '.png') if labelled else None)
            for image in _glob(root, 'images', folder, '*.jpg')]


def _pair_by_name(root, image_dir, label_dir, labelled):
    """Every image in root/image_dir with the PNG of the same name in root/label_dir."""
    images = [p for p in _glob(root, image_dir, '*') if _is_image_path(p)]
    return [(image, os.path.join(root, label_dir, _stem(image) + '.png') if labelled else None) for image in images]


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _read_ids(path):
    with open(path, encoding='utf-8-sig') as handle:
        return [line.split()[0] for line in handle if line.strip()]


def _scan_voc(root, split, labelled):
    _split_folder('voc', split)
    id_file = os.path.join(root, VOC_ID_FILES['test' if split == 'test' else 'val'])
    if not os.path.isfile(id_file):
        raise DataError(f'cannot build the VOC {split} list by scanning {root}: {id_file} is missing; give '
                        f'list files (settings.py DATALIST_VOC_TRAIN, DATALIST_VOC_VAL, DATALIST_VOC_TEST)')
    ids = _read_ids(id_file)
    if split == 'train':
        # The augmented training set is every SBD/VOC label except the VOC 2012 validation images.
        excluded = set(ids)
        ids = sorted(i for i in map(_stem, _glob(root, 'SegmentationClassAug', '*.png')) if i not in excluded)
    return [tuple(None if p is None else os.path.join(root, p) for p in _id_paths('voc', root, split, i, labelled))
            for i in ids]


def format_list(key, root, entries):
    """List file text for entries: VOC ids, otherwise paths relative to root, tab-separated (CamVid: one
    space, as CIRKD's camvid_*_list.txt, unless a path holds whitespace)."""
    lines = []
    for image, label in entries:
        rel_image = os.path.relpath(image, root)
        if key == 'voc':
            lines.append(_stem(rel_image))
        elif label is None:
            lines.append(rel_image)
        else:
            rel_label = os.path.relpath(label, root)
            spaced = key == 'camvid' and not any(c.isspace() for c in rel_image + rel_label)
            lines.append(rel_image + (' ' if spaced else '\t') + rel_label)
    return ''.join(line + '\n' for line in lines)
