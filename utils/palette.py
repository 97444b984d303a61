"""Colour palettes of the data sets and the label encodings of saved prediction PNGs.

A saved colour PNG is a palette ('P' mode) image whose pixel values are the data set's own label
encoding, so that the file is both a picture and a label map:
- citys: trainIds 0..18, ignore = 255 (black); the official Cityscapes colours;
- voc: class ids 0..20, ignore = 255 (VOC's boundary colour); the standard VOC colour map;
- ade20k: class k stored as k + 1 (the ADEChallenge annotation values), ignore = 0 (black); the
  ADE20K palette;
- coco (and its alias coco_stuff_164k): class ids 0..181 (stuffthingmaps values), ignore = 255; the VOC-style
  colour map over 256 ids;
- camvid: class ids 0..10, ignore = 11 (CamVid's void, black); CamVid's colour code (Brostow et al., 2008);
- folder (a user's own data set): class ids, ignore = 255; the VOC colour map.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dataset import canonical_name
from dataset.datasets import CITYSCAPES_TRAINID_TO_LABELID
from utils.errors import UserError

# Official Cityscapes colours of the 19 training classes (cityscapesScripts labels.py), in trainId order.
CITYSCAPES_COLORS = np.array([
    (128, 64, 128),   # road
    (244, 35, 232),   # sidewalk
    (70, 70, 70),     # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),   # traffic light
    (220, 220, 0),    # traffic sign
    (107, 142, 35),   # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),   # sky
    (220, 20, 60),    # person
    (255, 0, 0),      # rider
    (0, 0, 142),      # car
    (0, 0, 70),       # truck
    (0, 60, 100),     # bus
    (0, 80, 100),     # train
    (0, 0, 230),      # motorcycle
    (119, 11, 32),    # bicycle
], dtype=np.uint8)

# CamVid's colour code (Brostow et al., 2008) for SegNet's 11 classes, in class-id order.
CAMVID_COLORS = np.array([
    (128, 128, 128),  # Sky
    (128, 0, 0),      # Building
    (192, 192, 128),  # Pole
    (128, 64, 128),   # Road
    (0, 0, 192),      # Sidewalk
    (128, 128, 0),    # Tree
    (192, 128, 128),  # SignSymbol
    (64, 64, 128),    # Fence
    (64, 0, 128),     # Car
    (64, 64, 0),      # Pedestrian
    (0, 128, 192),    # Bicyclist
], dtype=np.uint8)

# The ADE20K (SceneParsing) colours of the 150 classes, class 0 (wall) first.
ADE20K_COLORS = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
], dtype=np.uint8)
assert len(ADE20K_COLORS) == 150


def bit_colormap(n=256):
    """The PASCAL VOC colour map: the bits of the id, three at a time, go to the high bits of R, G, B."""
    ids = np.arange(n, dtype=np.int64)
    colors = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):  # 8 rounds of 3 bits cover ids < 2**24
        shift = 7 - bit
        for channel in range(3):
            colors[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << shift
    return colors.astype(np.uint8)


def _full_palette(colors, offset, ignore_index, ignore_color):
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[offset:offset + len(colors)] = colors
    palette[ignore_index] = ignore_color
    return palette


@dataclass(frozen=True)
class LabelEncoding:
    """How a data set's classes are written into a palette PNG: class c -> c + offset, ignore -> ignore_index."""
    offset: int
    ignore_index: int
    palette: np.ndarray  # 256 x 3 uint8

    def encode(self, label):
        """Class map (ints, ignore < 0 or >= the class count of the palette) -> uint8 PNG values."""
        label = np.asarray(label).astype(np.int64)
        out = label + self.offset
        valid = (label >= 0) & (out < 256) & (out != self.ignore_index)
        return np.where(valid, out, self.ignore_index).astype(np.uint8)


_VOC_MAP = bit_colormap(256)
ENCODINGS = {
    'citys': LabelEncoding(0, 255, _full_palette(CITYSCAPES_COLORS, 0, 255, (0, 0, 0))),
    'voc': LabelEncoding(0, 255, _VOC_MAP),
    'ade20k': LabelEncoding(1, 0, _full_palette(ADE20K_COLORS, 1, 0, (0, 0, 0))),
    'coco': LabelEncoding(0, 255, _VOC_MAP),
    'camvid': LabelEncoding(0, 11, _full_palette(CAMVID_COLORS, 0, 11, (0, 0, 0))),
    'folder': LabelEncoding(0, 255, _VOC_MAP),
}


def get_encoding(dataset):
    try:
        return ENCODINGS[canonical_name(dataset)]
    except KeyError:
        raise UserError(f'no colour palette for data set {dataset!r}; known: {", ".join(sorted(ENCODINGS))}') from None


def class_colors(dataset, num_class):
    """num_class x 3 uint8: the colour of each class of `dataset`."""
    enc = get_encoding(dataset)
    return enc.palette[enc.offset:enc.offset + num_class].copy()


def colorize(label, dataset):
    """Class map (H x W; ignore -1) -> palette PIL image in the data set's encoding (see module doc)."""
    enc = get_encoding(dataset)
    values = enc.encode(_to_numpy(label))
    image = Image.frombytes('P', (values.shape[1], values.shape[0]), np.ascontiguousarray(values).tobytes())
    image.putpalette(enc.palette.reshape(-1).tolist())
    return image


def colorize_rgb(label, dataset):
    """Class map (H x W; ignore -1) -> H x W x 3 uint8 RGB array."""
    enc = get_encoding(dataset)
    return enc.palette[enc.encode(_to_numpy(label))]


def cityscapes_trainid_to_labelid(pred):
    """trainId map (H x W ints, ignore < 0 or 255) -> uint8 labelId map for the official evaluation."""
    pred = _to_numpy(pred).astype(np.int64)
    # Values that are no trainId (the ignore label) become labelId 0, 'unlabeled'.
    table = np.zeros(256, dtype=np.uint8)
    table[:len(CITYSCAPES_TRAINID_TO_LABELID)] = CITYSCAPES_TRAINID_TO_LABELID
    return table[np.where((pred >= 0) & (pred < 256), pred, 255)]


def _to_numpy(array):
    if hasattr(array, 'detach'):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f'expected an H x W label map, got shape {array.shape}')
    return array
