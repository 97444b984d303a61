"""A small synthetic data set in the real layout of Cityscapes, VOC (aug), CamVid, ADE20K or COCO-Stuff.

Street scenes made of textured regions: sky at the top, a road narrowing to a horizon, sidewalks and
grass beside it, buildings with window grids, trees, poles, cars and people drawn as shapes. Each class
has its own colour, texture frequency and orientation, and every image varies (lighting, colours,
layout, noise), so a small network learns the classes partly and a larger one better. Deterministic for
a seed; fast enough to write a hundred 128x256 images in a few seconds.

    python -m dataset.toy --dataset citys --root DIR [--num-train N --num-val M --size H,W --seed S]

The file names are those of the real data sets (`aachen_000000_000019_leftImg8bit.png`), so a root pointed at real
data by mistake would lose its files: nothing is written when a file it would write already exists and is not one
it wrote itself (those are listed in TOY_LIST in the root).
"""
import argparse
import os
import pathlib
import sys

import numpy as np
from PIL import Image

from dataset import DATASET_ALIASES, canonical_name
from dataset.class_names import ADE20K_CLASSES, CAMVID_CLASSES, COCO_STUFF_CLASSES
from utils.errors import UserError, run_main
from utils.options import non_negative_int
from utils.palette import bit_colormap

# The files the generator wrote under a root, one relative path a line: only these may be written over.
TOY_LIST = '.toy_files.txt'

# Scene classes of the generator (indices into the tables below).
SKY, ROAD, SIDEWALK, BUILDING, VEGETATION, CAR, PERSON, POLE, TERRAIN, VOID = range(10)
SCENE_CLASSES = ('sky', 'road', 'sidewalk', 'building', 'vegetation', 'car', 'person', 'pole',
                 'terrain', 'void')

# Raw label value of each scene class in each data set's label files (the values users' files hold).
RAW_LABELS = {
    # Cityscapes labelIds: sky 23, road 7, sidewalk 8, building 11, vegetation 21, car 26, person 24,
    # pole 17, terrain 22, ego vehicle 1 (ignored).
    'citys': (23, 7, 8, 11, 21, 26, 24, 17, 22, 1),
    # VOC: background for stuff, pottedplant 16, car 7, person 15; 255 (ignore) marks the void.
    'voc': (0, 0, 0, 0, 16, 7, 15, 0, 0, 255),
    # CamVid (SegNet's 11 classes): terrain is vegetation there, so Tree; 11 (void, ignored) marks the void.
    'camvid': tuple(CAMVID_CLASSES.index(n) for n in
                    ('Sky', 'Road', 'Sidewalk', 'Building', 'Tree', 'Car', 'Pedestrian', 'Pole', 'Tree')) + (11,),
    # ADE20K: 1-based indices of the 150 classes, 0 = other (ignored).
    'ade20k': tuple(ADE20K_CLASSES.index(n) + 1 for n in
                    ('sky', 'road', 'sidewalk', 'building', 'tree', 'car', 'person', 'pole', 'grass')) + (0,),
    # COCO-Stuff stuffthingmaps: category id - 1, 255 unlabelled.
    'coco': tuple(COCO_STUFF_CLASSES.index(n) for n in
                  ('sky-other', 'road', 'pavement', 'building-other', 'tree', 'car', 'person', 'metal',
                   'grass')) + (255,),
}

# Appearance: RGB base colour, texture amplitude, frequency (cycles per pixel at 256 px width) and
# orientation (degrees). Road and sidewalk, or grass and trees, share colours and differ in texture.
_BASE_RGB = np.array([
    (135, 175, 225),   # sky
    (105, 100, 105),   # road
    (140, 130, 125),   # sidewalk
    (150, 110, 90),    # building
    (70, 125, 60),     # vegetation
    (0, 0, 0),         # car: a colour per car
    (0, 0, 0),         # person: a colour per person
    (95, 95, 90),      # pole
    (100, 140, 70),    # terrain
    (35, 35, 40),      # void (ego vehicle)
], dtype=np.float32)
_TEXTURE_AMP = np.array([6, 14, 18, 0, 26, 4, 10, 8, 20, 6], dtype=np.float32)
_TEXTURE_FREQ = np.array([0.01, 0.22, 0.16, 0.0, 0.38, 0.05, 0.30, 0.25, 0.30, 0.1], dtype=np.float32)
_TEXTURE_ANGLE = np.array([90, 0, 90, 0, 45, 0, 90, 90, 10, 0], dtype=np.float32)
_CAR_COLOURS = np.array([(200, 30, 30), (30, 60, 160), (220, 220, 220), (30, 30, 30), (150, 150, 160),
                         (210, 180, 40)], dtype=np.float32)
_CLOTHES_COLOURS = np.array([(180, 40, 60), (40, 40, 120), (230, 200, 80), (60, 60, 60), (90, 160, 90),
                             (200, 120, 170)], dtype=np.float32)

_SPLIT_CODES = {'train': 1, 'val': 2, 'test': 3}
# Data sets whose toy version can have a test split: Cityscapes (images only), CamVid (labelled, as the real one).
_TEST_SPLITS = ('citys', 'camvid')
# CamVid's video sequences, which start its file names (0001TP_006690.png), by split.
_CAMVID_SEQUENCES = {'train': ('0001TP', '0006R0', '0016E5'), 'val': ('0016E5',), 'test': ('Seq05VD', '0001TP')}


def _ellipse(xs, ys, cx, cy, rx, ry):
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1


def make_scene(size, rng, noise=9.0):
    """(uint8 RGB image HxWx3, scene class map HxW) of one random street scene; `noise` is the standard
    deviation of the per-pixel noise."""
    height, width = size
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    classes = np.full((height, width), SKY, dtype=np.uint8)
    # Per-image variation of the class colours; `colour` is the per-pixel base colour.
    class_rgb = _BASE_RGB + rng.normal(0, 10, _BASE_RGB.shape).astype(np.float32)
    colour = class_rgb[classes]

    def paint(mask, scene_class, rgb=None):
        classes[mask] = scene_class
        colour[mask] = class_rgb[scene_class] if rgb is None else rgb

    horizon = height * rng.uniform(0.35, 0.55)
    ground = ys >= horizon
    depth = np.clip((ys - horizon) / max(height - horizon, 1.0), 0, 1)   # 0 at horizon, 1 at bottom
    vanish_x = width * rng.uniform(0.35, 0.65)
    road_half = depth * width * rng.uniform(0.35, 0.6)
    walk_half = road_half * rng.uniform(1.3, 1.7)
    offset = np.abs(xs - vanish_x)
    paint(ground & (offset >= walk_half), TERRAIN)
    paint(ground & (offset < walk_half), SIDEWALK)
    paint(ground & (offset < road_half), ROAD)

    # Buildings along the horizon, with a window grid drawn later as their texture.
    x = rng.uniform(-0.1, 0.1) * width
    while x < width:
        block_w = width * rng.uniform(0.08, 0.25)
        top = horizon - height * rng.uniform(0.1, 0.4)
        if rng.random() < 0.8:
            paint((xs >= x) & (xs < x + block_w) & (ys >= top) & (ys < horizon + 0.02 * height), BUILDING)
        x += block_w + width * rng.uniform(0.0, 0.06)

    # Trees: crowns as ellipses over the buildings, near the road sides.
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0, width), horizon - height * rng.uniform(0.0, 0.2)
        rx, ry = width * rng.uniform(0.04, 0.1), height * rng.uniform(0.06, 0.15)
        paint(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1, VEGETATION)

    # Poles: thin vertical bars standing on the sidewalk.
    for _ in range(rng.integers(0, 4)):
        foot = horizon + (height - horizon) * rng.uniform(0.1, 0.6)
        d = (foot - horizon) / max(height - horizon, 1.0)
        side = rng.choice((-1.0, 1.0))
        px = vanish_x + side * d * width * rng.uniform(0.45, 0.55) * 1.1
        half_w = max(0.6, 0.012 * width * (0.3 + d))
        paint((np.abs(xs - px) < half_w) & (ys < foot) & (ys > foot - height * (0.2 + 0.5 * d)), POLE)

    # Cars on the road and people on the sidewalks, far ones first, sized by their distance.
    objects = [(rng.uniform(0.05, 1.0), CAR) for _ in range(rng.integers(1, 5))]
    objects += [(rng.uniform(0.05, 1.0), PERSON) for _ in range(rng.integers(0, 5))]
    for d, kind in sorted(objects):
        bottom = horizon + d * (height - horizon)
        if kind == CAR:
            car_h = max(3.0, 0.45 * d * (height - horizon) + 2)
            car_w = car_h * rng.uniform(1.4, 2.2)
            cx = vanish_x + rng.uniform(-0.7, 0.7) * d * width * 0.45
            body = (np.abs(xs - cx) < car_w / 2) & (ys < bottom) & (ys > bottom - car_h * 0.6)
            cabin = (np.abs(xs - cx) < car_w * 0.32) & (ys <= bottom - car_h * 0.6) & (ys > bottom - car_h)
            rgb = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] + rng.normal(0, 8, 3).astype(np.float32)
            paint(body, CAR, rgb)
            paint(cabin, CAR, rgb * 0.4 + 20)   # dark windows
        else:
            person_h = max(4.0, 0.7 * d * (height - horizon) + 3)
            side = rng.choice((-1.0, 1.0))
            cx = vanish_x + side * d * width * rng.uniform(0.4, 0.6) * 1.15
            torso = _ellipse(xs, ys, cx, bottom - person_h * 0.55, person_h * 0.16, person_h * 0.45)
            head = _ellipse(xs, ys, cx, bottom - person_h * 0.93, person_h * 0.09, person_h * 0.09)
            paint(torso, PERSON, _CLOTHES_COLOURS[rng.integers(len(_CLOTHES_COLOURS))])
            paint(head, PERSON, np.array((215, 170, 140), dtype=np.float32))

    # An ego-vehicle bonnet (ignored) at the bottom of some images.
    if rng.random() < 0.5:
        paint(ys > height * (1 - rng.uniform(0.04, 0.1)) - 0.03 * height * np.cos(
            (xs - width / 2) / width * np.pi), VOID)

    # Texture: an oriented sinusoid per class (frequency scaled with the image width), window grids on
    # buildings, a vertical gradient on the sky, then lighting and pixel noise.
    scale = 256.0 / width
    angle = np.deg2rad(_TEXTURE_ANGLE + rng.normal(0, 8, len(_TEXTURE_ANGLE)))[classes]
    freq = (_TEXTURE_FREQ * scale * rng.uniform(0.85, 1.15))[classes]
    phase = rng.uniform(0, 2 * np.pi, len(_TEXTURE_AMP)).astype(np.float32)[classes]
    wave = np.sin(2 * np.pi * freq * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)
    texture = _TEXTURE_AMP[classes] * wave
    window_period = rng.uniform(6, 10) / scale
    windows = ((xs % window_period) < window_period * 0.5) & ((ys % window_period) < window_period * 0.55)
    texture += np.where(classes == BUILDING, np.where(windows, -45.0, 10.0), 0.0)
    texture += np.where(classes == SKY, (ys / height) * 40.0, 0.0)
    image = colour + texture[..., None]
    image = image * rng.uniform(0.75, 1.2) + rng.normal(0, 10, 3)
    image += rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), classes


def _raw_label(dataset, classes):
    raw = np.asarray(RAW_LABELS[dataset], dtype=np.uint8)[classes]
    if dataset == 'voc':
        # VOC marks object outlines with 255 (ignored): a 1-2 pixel band outside every object.
        objects = raw != 0
        grown = objects.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1)):
            grown |= np.roll(objects, (dy, dx), axis=(0, 1))
        raw[grown & ~objects] = 255
    return raw


def _sample_paths(dataset, split, index):
    """(image path, label path or None) relative to the root, in the data set's real layout."""
    if dataset == 'citys':
        city = {'train': ('aachen', 'bochum'), 'val': ('frankfurt', 'lindau'), 'test': ('berlin',)}[split]
        city = city[index % len(city)]
        stem = f'{city}_{index // 2:06d}_{19 + index:06d}'
        return (f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png',
                f'gtFine/{split}/{city}/{stem}_gtFine_labelIds.png')
    if dataset == 'voc':
        sample_id = f'{2007 + index % 6}_{index * 2 + (split == "val"):06d}'
        return f'JPEGImages/{sample_id}.jpg', f'SegmentationClassAug/{sample_id}.png'
    if dataset == 'camvid':
        sequences = _CAMVID_SEQUENCES[split]
        name = f'{sequences[index % len(sequences)]}_{(index + 1) * 30 + _SPLIT_CODES[split]:06d}.png'
        return f'{split}/{name}', f'{split}annot/{name}'
    if dataset == 'ade20k':
        folder, prefix = {'train': ('training', 'ADE_train'), 'val': ('validation', 'ADE_val')}[split]
        return f'images/{folder}/{prefix}_{index + 1:08d}.jpg', f'annotations/{folder}/{prefix}_{index + 1:08d}.png'
    folder = {'train': 'train2017', 'val': 'val2017'}[split]
    sample_id = f'{(index + 1) * 9 + (split == "val") * 4:012d}'
    return f'images/{folder}/{sample_id}.jpg', f'annotations/{folder}/{sample_id}.png'


def make_toy_dataset(dataset, root, num_train=20, num_val=10, size=(128, 256), seed=0, num_test=0):
    """Write a synthetic data set `dataset` (citys, voc, camvid, ade20k, coco or an alias) under root, in its
    real layout.

    num_test: test images, Cityscapes (leftImg8bit/test only, no labels) or CamVid (test/ with testannot/).
    Returns the root as a Path. The same arguments always write the same files.
    """
    dataset = canonical_name(dataset)
    if dataset not in RAW_LABELS:
        raise UserError(f'unknown data set {dataset!r} (--dataset): choose from {", ".join(RAW_LABELS)}')
    height, width = (int(v) for v in size)
    if height < 8 or width < 8:
        raise UserError(f'toy image size {height}x{width} is too small (--size H,W, at least 8,8)')
    if num_test and dataset not in _TEST_SPLITS:
        raise UserError(f'test images (--num-test) exist only for {" and ".join(_TEST_SPLITS)}')
    counts = {'train': num_train, 'val': num_val, 'test': num_test}
    for split, count in counts.items():
        if int(count) < 0:
            raise UserError(f'{count} {split} images: the number of images (--num-{split}) cannot be negative')
    root = pathlib.Path(root)
    _check_nothing_replaced(root, _written_files(dataset, counts))
    palette = bit_colormap(256).reshape(-1).tolist() if dataset == 'voc' else None
    for split, count in counts.items():
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
            image, classes = make_scene((height, width), rng)
            image_rel, label_rel = _sample_paths(dataset, split, index)
            image_path = root / image_rel
            image_path.parent.mkdir(parents=True, exist_ok=True)
            if image_rel.endswith('.png'):
                Image.fromarray(image).save(image_path, compress_level=1)
            else:
                Image.fromarray(image).save(image_path, quality=92)
            if split == 'test' and dataset == 'citys':
                continue
            raw = _raw_label(dataset, classes)
            if palette is None:
                label = Image.fromarray(raw)
            else:  # VOC labels are palette PNGs: class indices shown with the VOC colours
                label = Image.frombytes('P', (width, height), raw.tobytes())
                label.putpalette(palette)
            label_path = root / label_rel
            label_path.parent.mkdir(parents=True, exist_ok=True)
            label.save(label_path, compress_level=1)
    if dataset == 'voc':
        # The validation ids, as in VOC2012's ImageSets; scanning uses them to split train_aug / val.
        ids = [pathlib.Path(_sample_paths('voc', 'val', i)[0]).stem for i in range(num_val)]
        sets = root / 'ImageSets' / 'Segmentation'
        sets.mkdir(parents=True, exist_ok=True)
        (sets / 'val.txt').write_text(''.join(i + '\n' for i in ids))
    return root


def _written_files(dataset, counts):
    """The paths (relative to the root) that make_toy_dataset writes for these counts."""
    paths = []
    for split, count in counts.items():
        for index in range(count):
            image, label = _sample_paths(dataset, split, index)
            paths += [image] if split == 'test' and dataset == 'citys' else [image, label]
    if dataset == 'voc':
        paths.append('ImageSets/Segmentation/val.txt')
    return paths


def _check_nothing_replaced(root, paths, shown=3):
    """Refuse to write over a file this generator did not write (the root may hold real data), then record `paths`
    as its own in the root's TOY_LIST."""
    record = root / TOY_LIST
    own = set(record.read_text(encoding='utf-8').splitlines()) if record.is_file() else set()
    foreign = [path for path in paths if path not in own and (root / path).exists()]
    if foreign:
        listed = ', '.join(foreign[:shown]) + (f' and {len(foreign) - shown} more' if len(foreign) > shown else '')
        raise UserError(f'{root} (--root) already holds {len(foreign)} file(s) that the toy data set would overwrite '
                        f'and that it did not write ({listed}): give an empty or new folder')
    root.mkdir(parents=True, exist_ok=True)
    record.write_text(''.join(path + '\n' for path in sorted(own | set(paths))), encoding='utf-8')


def _parse_size(text):
    try:
        height, width = (int(v) for v in text.replace('x', ',').split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected H,W (e.g. 128,256), got {text!r}') from None
    return height, width


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write a small synthetic segmentation data set in the '
                                                 'real layout of a data set.')
    parser.add_argument('--dataset', default='citys', choices=sorted(RAW_LABELS) + sorted(DATASET_ALIASES))
    parser.add_argument('--root', required=True,
                        help='folder to write (created if needed); files the generator did not write are never '
                             'overwritten')
    parser.add_argument('--num-train', type=non_negative_int, default=20)
    parser.add_argument('--num-val', type=non_negative_int, default=10)
    parser.add_argument('--num-test', type=non_negative_int, default=0,
                        help='test images: citys (no labels), camvid (labelled, test/ and testannot/)')
    parser.add_argument('--size', type=_parse_size, default=(128, 256), help='H,W (default 128,256)')
    parser.add_argument('--seed', type=non_negative_int, default=0)
    args = parser.parse_args(argv)
    try:
        root = make_toy_dataset(args.dataset, args.root, args.num_train, args.num_val, args.size, args.seed,
                                args.num_test)
    except OSError as error:
        raise UserError(f'cannot write the toy data set under {args.root} (--root): {error}') from None
    print(f'wrote {args.num_train} train, {args.num_val} val'
          + (f', {args.num_test} test' if args.num_test else '')
          + f' {args.size[0]}x{args.size[1]} {args.dataset} samples under {os.path.abspath(root)}')


if __name__ == '__main__':
    sys.exit(run_main(main))
