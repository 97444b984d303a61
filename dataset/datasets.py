"""The data set classes of the original code, on one shared base, and the folder data set for a user's own
data.

Items are `(image, label, name)`: image float32 CHW in BGR order minus MEAN_BGR (no std), label int64
HW with `ignore_label` (-1) for ignored pixels, name = the image file's name without its extension.

Training samples follow the original transform (random scale 0.5..2.0 in steps of 0.1, bilinear image,
nearest label, pad bottom/right to the crop, random crop, horizontal flip), but only the source region
that lands in the crop window is resampled, so the cost does not grow with the full 2048x1024 image.

The random draws of a training sample come from a generator seeded by the sample's key: the training
sampler hands `(index, seed)` pairs whose seed depends only on `--seed` and the sample's place in the run
(`utils.seeding.sample_seed`), so the samples do not depend on the number of loader workers or on a
restart. A plain integer index draws its seed from torch's global generator.
"""
import logging
import os

import torch
from torch.utils import data

from dataset import lists
from dataset.errors import DataError
from dataset.imageio import read_image, read_label
from utils.errors import UserError

__all__ = [
    'MEAN_BGR', 'DataError', 'CITYSCAPES_LABELID_TO_TRAINID', 'CITYSCAPES_TRAINID_TO_LABELID',
    'CSTrainValSet', 'CSValSet', 'CSTestSet', 'VOCDataSet', 'VOCDataValSet', 'ADETrainSet', 'ADEValSet',
    'COCOTrainSet', 'COCOValSet', 'VOCDataTestSet', 'ADETestSet', 'COCOTestSet', 'CamvidTrainSet',
    'CamvidValSet', 'CamvidTestSet', 'FolderTrainSet',
    'FolderValSet', 'FolderTestSet', 'SampleParams', 'draw_sample_params', 'scale_crop_flip',
    'read_class_names',
]

logger = logging.getLogger(__name__)

# Per-channel mean of the original code, in B, G, R order.
MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


# Official Cityscapes labelId -> trainId; every id not listed here (0..6, 9, 10, 14..16, 18, 29, 30)
# is ignored. Kept as a dict over all 34 ids (ignored ones -> -1) so that eval can invert it.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                         24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_LABELID_TO_TRAINID = {label_id: _CITYSCAPES_TRAIN_IDS.get(label_id, -1) for label_id in range(34)}
# trainId t -> labelId, for writing predictions in the official format.
CITYSCAPES_TRAINID_TO_LABELID = [label_id for label_id, _ in sorted(
    _CITYSCAPES_TRAIN_IDS.items(), key=lambda item: item[1])]


# ---------------------------------------------------------------------------------------------------
# The training transform, written as two pure functions so that tests can drive it with fixed draws.

class SampleParams(tuple):
    """(scale factor, crop row offset, crop column offset, flip) in scaled-image coordinates."""
    __slots__ = ()

    def __new__(cls, factor, h_off, w_off, flip):
        return super().__new__(cls, (float(factor), int(h_off), int(w_off), bool(flip)))

    factor = property(lambda self: self[0])
    h_off = property(lambda self: self[1])
    w_off = property(lambda self: self[2])
    flip = property(lambda self: self[3])


def scaled_size(height, width, factor):
    """Size of the whole image after scaling by factor (rounded, as OpenCV's resize with fx, fy)."""
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def draw_sample_params(height, width, crop_size, scale, mirror, generator):
    """Random draws of one training sample, in the order of the original: scale, crop offsets, flip."""
    crop_h, crop_w = crop_size
    factor = 0.5 + int(torch.randint(0, 16, (1,), generator=generator)) / 10.0 if scale else 1.0
    scaled_h, scaled_w = scaled_size(height, width, factor)
    # Offsets range over the padded image (padding only ever extends it to the crop size).
    h_off = int(torch.randint(0, max(scaled_h, crop_h) - crop_h + 1, (1,), generator=generator))
    w_off = int(torch.randint(0, max(scaled_w, crop_w) - crop_w + 1, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator)) if mirror else False
    return SampleParams(factor, h_off, w_off, flip)


def _bilinear_taps(start, length, factor, in_size):
    """The two source indices and the weight of the second for scaled positions start..start+length-1 of one
    axis: OpenCV's INTER_LINEAR (and torch's bilinear without antialias) with half-pixel centres, source
    position (x + 0.5) / factor - 0.5 clamped at 0, the last index repeated at the far edge. Computed in float32
    from the float32 1 / factor, as torch's kernel does, so that the taps and weights are its own."""
    dst = torch.arange(start, start + length, dtype=torch.float32)
    src = (torch.tensor(1.0 / factor, dtype=torch.float32) * (dst + 0.5) - 0.5).clamp_(min=0)
    first = src.floor()
    weight = src - first
    first = first.to(torch.long).clamp_(max=in_size - 1)
    return first, (first + 1).clamp_(max=in_size - 1), weight


def _resample_bilinear(image, h_off, valid_h, w_off, valid_w, factor):
    """The window (h_off, w_off, valid_h x valid_w) of `image` (uint8 C x H x W) scaled by `factor`, float32.

    Written with index gathers and elementwise products and sums, one rounding per operation, so that every
    pixel is the same whatever the number of threads (torch's bilinear kernel splits the work into vector and
    scalar parts by thread, which rounds some pixels differently: a one-grey-level difference once rounded to
    whole numbers, and a run that depended on the number of data loader workers)."""
    rows, rows_next, row_weight = _bilinear_taps(h_off, valid_h, factor, image.shape[1])
    cols, cols_next, col_weight = _bilinear_taps(w_off, valid_w, factor, image.shape[2])
    first_row, first_col = int(rows[0]), int(cols[0])
    # The source columns as rows (C x W x H), so that every gather copies whole rows.
    columns = image[:, first_row:int(rows_next[-1]) + 1, first_col:int(cols_next[-1]) + 1].transpose(1, 2).contiguous()
    # across each source row first, then between rows: torch's order of the products and sums
    across = (columns.index_select(1, cols - first_col).to(torch.float32) * (1 - col_weight)[:, None]
              + columns.index_select(1, cols_next - first_col).to(torch.float32) * col_weight[:, None])
    across = across.transpose(1, 2).contiguous()
    return (across.index_select(1, rows - first_row) * (1 - row_weight)[:, None]
            + across.index_select(1, rows_next - first_row) * row_weight[:, None])


def _nearest_taps(start, length, inverse_factor, in_size):
    """Source indices of OpenCV's INTER_NEAREST (and torch's 'nearest'): floor(dst / factor)."""
    dst = torch.arange(start, start + length, dtype=torch.float64)
    return (dst * inverse_factor).floor_().to(torch.long).clamp_(max=in_size - 1)


def scale_crop_flip(image, raw_label, params, crop_size, label_lut, ignore_label=-1):
    """One training sample from a decoded image and raw label, for the given draws.

    image: uint8 (3, H, W) RGB; raw_label: integer (H, W) raw ids (or None); label_lut: int64 table
    raw id -> train id. Equals scaling the whole image by params.factor (bilinear, half-pixel centres;
    nearest for the label), subtracting the mean, padding bottom/right to crop_size (image 0, label
    ignore), cropping at (h_off, w_off) and flipping, but resamples only the source region under the
    crop window.
    Returns (float32 (3, crop_h, crop_w) BGR minus mean, int64 (crop_h, crop_w) or None).
    """
    crop_h, crop_w = crop_size
    _, height, width = image.shape
    factor, h_off, w_off, flip = params
    scaled_h, scaled_w = scaled_size(height, width, factor)
    valid_h = min(crop_h, scaled_h - h_off)   # rows of the crop that lie on the scaled image
    valid_w = min(crop_w, scaled_w - w_off)
    # The valid part sits at the top left of the crop, or at the top right once flipped.
    col_start = crop_w - valid_w if flip else 0

    if factor == 1.0:
        patch = image[:, h_off:h_off + valid_h, w_off:w_off + valid_w]
    else:
        # Float rather than torch's uint8 kernel: its fixed-point rounding is off by one from OpenCV about
        # three times as often. OpenCV resizes uint8 to uint8 (rounding half up): the original sees whole numbers.
        patch = _resample_bilinear(image, h_off, valid_h, w_off, valid_w, factor).add_(0.5).floor_()
    if flip:
        patch = patch.flip(-1)
    out_image = torch.zeros(3, crop_h, crop_w, dtype=torch.float32)
    for channel, mean in enumerate(MEAN_BGR):  # BGR output channel c is RGB input channel 2 - c
        torch.sub(patch[2 - channel], mean, out=out_image[channel, :valid_h, col_start:col_start + valid_w])

    if raw_label is None:
        return out_image, None
    if factor == 1.0:
        raw = raw_label[h_off:h_off + valid_h, w_off:w_off + valid_w]
    else:
        # Nearest neighbour by index gathers (exact OpenCV indices): rows, then columns after a
        # transpose so that both gathers copy contiguous runs.
        rows_nn = _nearest_taps(h_off, valid_h, 1.0 / factor, height)
        cols_nn = _nearest_taps(w_off, valid_w, 1.0 / factor, width)
        first_col = int(cols_nn[0])
        raw = raw_label[:, first_col:int(cols_nn[-1]) + 1].index_select(0, rows_nn)
        raw = raw.t().contiguous().index_select(0, cols_nn - first_col).t()
    if flip:
        raw = raw.flip(-1)
    out_label = torch.full((crop_h, crop_w), ignore_label, dtype=torch.int64)
    out_label[:valid_h, col_start:col_start + valid_w] = label_lut[raw.to(torch.long)]
    return out_image, out_label



def whole_image(image, raw_label, label_lut):
    """A validation sample: the whole image, BGR minus mean, and its mapped label (or None)."""
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
    out_image = image.flip(0).to(torch.float32).sub_(mean)
    out_label = None if raw_label is None else label_lut[raw_label.to(torch.long)]
    return out_image, out_label


def _sample_generator(seed):
    """The generator of one training sample's draws: `seed`, or one drawn from torch's global generator."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------------------------------
# The shared base.

class _SegmentationSet(data.Dataset):
    """Reads a list of (image, label) files and produces training or validation samples.

    Subclasses set: `key` (the --dataset name), `num_class`, `split` (the layout folder scanned when
    there is no list file), and `_label_mapping(ignore_label) -> int64 lut of 256 raw ids`,
    `legal_max` / `legal_extra` (legal raw label values: 0..legal_max and legal_extra).
    """
    key = None
    num_class = None
    split = None
    labelled = True
    legal_max = 255
    legal_extra = ()

    def _setup(self, root, list_path, train, max_iters=None, crop_size=(512, 512), scale=True,
               mirror=True, ignore_label=-1):
        self.root = os.fspath(root)
        self.list_path = None if list_path is None else os.fspath(list_path)
        self.train = train
        self.crop_h, self.crop_w = _pair(crop_size, 'crop_size')
        self.is_scale = scale
        self.is_mirror = mirror
        self.ignore_label = ignore_label
        self.label_lut = self._label_mapping(ignore_label)

        if not os.path.isdir(self.root):
            raise DataError(f'data root {self.root} does not exist (or is not a folder); '
                            f'set it in settings.py or pass --data DIR')
        if self.list_path is not None and os.path.isfile(self.list_path):
            entries = lists.read_list(self.key, self.root, self.list_path, self.split, self.labelled)
            source = self.list_path
        else:
            entries = lists.scan_layout(self.key, self.root, self.split, self.labelled)
            source = f'the {self.split} layout under {self.root}'
            if self.list_path is None:
                logger.warning('no list file given; built a list of %d samples by scanning %s',
                               len(entries), self.root)
            else:
                logger.warning('list file %s not found; built a list of %d samples by scanning %s',
                               self.list_path, len(entries), self.root)
        if not entries:
            raise DataError(f'no samples in {source}: check the list file or the data set layout '
                            f'({lists.layout_hint(self.key, self.split, self.labelled)})')
        _check_files_exist(entries, source, self.root)

        if max_iters:
            repeats = -(-int(max_iters) // len(entries))
            entries = (entries * repeats)[:int(max_iters)]
        self.files = [{'img': img, 'label': label, 'name': _sample_name(img)} for img, label in entries]

    def __len__(self):
        return len(self.files)

    def _read(self, index):
        entry = self.files[index]
        image = read_image(entry['img'])
        raw_label = None
        if self.labelled:
            raw_label = read_label(entry['label'])
            if raw_label.shape != image.shape[1:]:
                raise DataError(
                    f'image {entry["img"]} is {image.shape[2]}x{image.shape[1]} but its label '
                    f'{entry["label"]} is {raw_label.shape[1]}x{raw_label.shape[0]} (width x height); '
                    f'they must have the same size')
            self._check_label_values(raw_label, entry['label'])
        return image, raw_label, entry['name']

    def check_sample(self, index):
        """Read sample `index` as training or evaluation would (without transforming it): raises DataError naming
        the file when its image does not decode, its label has another size or holds values illegal for the data
        set."""
        self._read(index)

    def _check_label_values(self, raw_label, path):
        # Fast path: one reduction; the mask only when something is above the class range.
        if int(raw_label.max()) <= self.legal_max and int(raw_label.min()) >= 0:
            return
        bad = (raw_label > self.legal_max) | (raw_label < 0)
        for value in self.legal_extra:
            bad &= raw_label != value
        if bool(bad.any()):
            values = torch.unique(raw_label[bad])[:10].tolist()
            legal = f'0..{self.legal_max}' + ''.join(f' and {v}' for v in self.legal_extra)
            raise DataError(f'label {path} holds values {values} outside the legal raw values of '
                            f'{self.key} ({legal}); is it the right label file?')

    def __getitem__(self, key):
        """key: an index, or (index, seed) whose seed fixes the random draws of a training sample."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, raw_label, name = self._read(index)
        if self.train:
            params = draw_sample_params(image.shape[1], image.shape[2], (self.crop_h, self.crop_w),
                                        self.is_scale, self.is_mirror, _sample_generator(seed))
            out_image, out_label = scale_crop_flip(image, raw_label, params, (self.crop_h, self.crop_w),
                                                   self.label_lut, self.ignore_label)
        else:
            out_image, out_label = whole_image(image, raw_label, self.label_lut)
        if out_label is None:  # unlabelled (test) images get a label of ignore only
            out_label = torch.full(out_image.shape[1:], self.ignore_label, dtype=torch.int64)
        return out_image, out_label, name

    def __repr__(self):
        return (f'{type(self).__name__}(root={self.root!r}, list_path={self.list_path!r}, '
                f'{len(self)} samples)')


class _TrainingSet(_SegmentationSet):
    def __init__(self, root, list_path, max_iters=None, crop_size=(512, 512), scale=True, mirror=True,
                 ignore_label=-1):
        self._setup(root, list_path, True, max_iters, crop_size, scale, mirror, ignore_label)


class _ValidationSet(_SegmentationSet):
    def __init__(self, root, list_path, ignore_label=-1):
        self._setup(root, list_path, False, ignore_label=ignore_label)


def _pair(value, what):
    if isinstance(value, int):
        return value, value
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f'{what} must be an int or a (height, width) pair, got {value!r}') from None
    return height, width


def _sample_name(image_path):
    return os.path.splitext(os.path.basename(image_path))[0]


def _check_files_exist(entries, source, root, shown=5):
    missing = [path for entry in entries for path in entry if path is not None and not os.path.isfile(path)]
    if missing:
        listed = ', '.join(missing[:shown]) + (', ...' if len(missing) > shown else '')
        raise DataError(f'{len(missing)} file(s) named by {source} do not exist (paths are relative to '
                        f'the data root {root}): {listed}')


def _lut_from(pairs, ignore_label):
    lut = torch.full((256,), ignore_label, dtype=torch.int64)
    raw, mapped = zip(*pairs, strict=True)
    lut[list(raw)] = torch.tensor(mapped, dtype=torch.int64)
    return lut


# ---------------------------------------------------------------------------------------------------
# The built-in data sets.

class _Cityscapes:
    key = 'citys'
    num_class = 19
    legal_max = 33

    @staticmethod
    def _label_mapping(ignore_label):
        return _lut_from(_CITYSCAPES_TRAIN_IDS.items(), ignore_label)


class _VOC:
    key = 'voc'
    num_class = 21
    legal_max = 20
    legal_extra = (255,)

    @staticmethod
    def _label_mapping(ignore_label):
        return _lut_from([(k, k) for k in range(21)], ignore_label)


class _ADE20K:
    key = 'ade20k'
    num_class = 150
    legal_max = 150

    @staticmethod
    def _label_mapping(ignore_label):
        return _lut_from([(k, k - 1) for k in range(1, 151)], ignore_label)


class _COCOStuff:
    key = 'coco'
    num_class = 182
    legal_max = 181
    legal_extra = (255,)

    @staticmethod
    def _label_mapping(ignore_label):
        return _lut_from([(k, k) for k in range(182)], ignore_label)


class _CamVid:
    """SegNet's 11-class CamVid as CIRKD reads it: label value k is class k, 11 (void) is ignored."""
    key = 'camvid'
    num_class = 11
    legal_max = 11

    @staticmethod
    def _label_mapping(ignore_label):
        return _lut_from([(k, k) for k in range(11)], ignore_label)


class _Folder:
    """A user's own data set (`--dataset folder --data DIR`): DIR/classes.txt names the classes, one a line;
    labels hold class ids 0..C-1, and 255 for ignored pixels."""
    key = 'folder'
    legal_extra = (255,)

    def _read_classes(self, root):
        self.class_names = read_class_names(root)
        self.num_class = len(self.class_names)
        self.legal_max = self.num_class - 1

    def _label_mapping(self, ignore_label):
        return _lut_from([(k, k) for k in range(self.num_class)], ignore_label)


class _TestSet(_SegmentationSet):
    """Images without labels (a test split): the label of every item is all ignore."""
    labelled = False
    split = 'test'

    def __init__(self, root, list_path, ignore_label=-1):
        self._setup(root, list_path, False, ignore_label=ignore_label)


class CSTrainValSet(_Cityscapes, _TrainingSet):
    """Cityscapes training set (list lines: `<image> <labelIds png>`)."""
    split = 'train'


class CSValSet(_Cityscapes, _ValidationSet):
    """Cityscapes validation set: whole images."""
    split = 'val'


class CSTestSet(_Cityscapes, _TestSet):
    """Cityscapes test set: image paths only."""


class VOCDataSet(_VOC, _TrainingSet):
    """Pascal VOC 2012 + SBD (train_aug) training set (list lines: `<id>`)."""
    split = 'train'


class VOCDataValSet(_VOC, _ValidationSet):
    split = 'val'


class VOCDataTestSet(_VOC, _TestSet):
    """Pascal VOC 2012 test images (list lines: `<id>`, images in JPEGImages/)."""


class ADETrainSet(_ADE20K, _TrainingSet):
    split = 'train'


class ADEValSet(_ADE20K, _ValidationSet):
    split = 'val'


class ADETestSet(_ADE20K, _TestSet):
    """ADE20K test images (release_test/testing/ of the SceneParsing challenge; settings.py DATA_ADE20K_TEST)."""


class COCOTrainSet(_COCOStuff, _TrainingSet):
    split = 'train'


class COCOValSet(_COCOStuff, _ValidationSet):
    split = 'val'


class COCOTestSet(_COCOStuff, _TestSet):
    """COCO-Stuff test images (settings.py DATA_COCO_TEST)."""


class CamvidTrainSet(_CamVid, _TrainingSet):
    """CamVid training set (list lines: `train/NAME.png trainannot/NAME.png`)."""
    split = 'train'


class CamvidValSet(_CamVid, _ValidationSet):
    split = 'val'


class CamvidTestSet(_CamVid, _ValidationSet):
    """CamVid's test split: labelled (testannot/), so it is evaluated like the validation set (CIRKD's eval.py
    reports its CamVid numbers on camvid_test_list.txt)."""
    split = 'test'


class FolderTrainSet(_Folder, _TrainingSet):
    split = 'train'

    def __init__(self, root, list_path=None, **kwargs):
        self._read_classes(root)
        super().__init__(root, list_path, **kwargs)


class FolderValSet(_Folder, _ValidationSet):
    split = 'val'

    def __init__(self, root, list_path=None, ignore_label=-1):
        self._read_classes(root)
        super().__init__(root, list_path, ignore_label)


class FolderTestSet(_Folder, _TestSet):
    def __init__(self, root, list_path=None, ignore_label=-1):
        self._read_classes(root)
        super().__init__(root, list_path, ignore_label)


CLASSES_FILE = 'classes.txt'


def read_class_names(root):
    """The class names of a folder data set: the lines of `root/classes.txt`, in class-id order (a blank line is
    refused)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f'data root {root} does not exist (or is not a folder); pass the folder of your data '
                        'set with --data DIR')
    path = os.path.join(root, CLASSES_FILE)
    if not os.path.isfile(path):
        raise DataError(f'{path} is missing: a folder data set (--dataset folder) names its classes there, '
                        'one a line, class id 0 first')
    try:
        with open(path, encoding='utf-8-sig') as handle:  # -sig: a byte-order mark is not part of the first name
            lines = [line.strip() for line in handle.read().splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f'cannot read {path}: {error}') from None
    while lines and not lines[-1]:  # blank lines at the end name no class
        lines.pop()
    # a blank line inside would shift the ids of every class after it (line k is class k - 1)
    blank = next((number for number, name in enumerate(lines, 1) if not name), None)
    if blank is not None:
        raise DataError(f'line {blank} of {path} is blank: every line names one class (line k is class id k - 1); '
                        'remove the blank line, or name the class')
    names = lines
    if not names:
        raise DataError(f'{path} names no class: write one class name a line, class id 0 first')
    if len(names) > 255:
        raise DataError(f'{path} names {len(names)} classes; label PNGs hold ids 0..254 (255 is ignored)')
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f'{path} names {", ".join(duplicates)} more than once; every line is one class')
    return names
