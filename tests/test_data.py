"""The data layer: the nine classes on generated data in the four real layouts, label mappings,
preprocessing constants, the training transform, lists, and every data error."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import settings
from dataset import DATASET_INFO, build_dataset
from dataset.datasets import (
    CITYSCAPES_LABELID_TO_TRAINID,
    CITYSCAPES_TRAINID_TO_LABELID,
    MEAN_BGR,
    ADETrainSet,
    ADEValSet,
    COCOTrainSet,
    COCOValSet,
    CSTestSet,
    CSTrainValSet,
    CSValSet,
    DataError,
    SampleParams,
    VOCDataSet,
    VOCDataValSet,
    draw_sample_params,
    scale_crop_flip,
)
from dataset.imageio import read_label
from dataset.make_lists import main as make_lists_main
from dataset.make_lists import make_list
from dataset.toy import main as toy_main
from dataset.toy import make_toy_dataset
from utils.errors import UserError, run_main
from utils.samplers import IterationSampler

TRAIN_VAL = {'citys': (CSTrainValSet, CSValSet), 'voc': (VOCDataSet, VOCDataValSet),
             'ade20k': (ADETrainSet, ADEValSet), 'coco': (COCOTrainSet, COCOValSet)}

# The Cityscapes labelId -> trainId table (cityscapesScripts' labels.py), written out independently of the
# code under test.
CITYSCAPES_TABLE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                   25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _missing(tmp_path):
    # A list path that does not exist, so that the layout is scanned whatever settings.py says.
    return str(tmp_path / 'no_such_list.txt')


def _write_citys_pair(root, image, label, split='val', stem='city_000000_000001'):
    image_rel = f'leftImg8bit/{split}/city/{stem}_leftImg8bit.png'
    label_rel = f'gtFine/{split}/city/{stem}_gtFine_labelIds.png'
    for rel, array in ((image_rel, image), (label_rel, label)):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(array).save(os.path.join(root, rel))
    list_path = os.path.join(root, f'{split}.lst')
    with open(list_path, 'w') as handle:
        handle.write(f'{image_rel}\t{label_rel}\n')
    return list_path


def _write_voc_pair(root, label, sample_id='2007_000001', palette=True):
    os.makedirs(os.path.join(root, 'JPEGImages'), exist_ok=True)
    os.makedirs(os.path.join(root, 'SegmentationClassAug'), exist_ok=True)
    Image.fromarray(np.full(label.shape + (3,), 128, np.uint8)).save(
        os.path.join(root, 'JPEGImages', sample_id + '.jpg'))
    if palette:
        image = Image.frombytes('P', label.shape[::-1], label.astype(np.uint8).tobytes())
        # Colours whose grey value differs from the index, so reading colours would show.
        image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    else:
        image = Image.fromarray(label.astype(np.uint8))
    image.save(os.path.join(root, 'SegmentationClassAug', sample_id + '.png'))
    list_path = os.path.join(root, 'val.txt')
    with open(list_path, 'w') as handle:
        handle.write(sample_id + '\n')
    return list_path


def _write_two_path_pair(root, key, label):
    folder = {'ade20k': 'validation', 'coco': 'val2017'}[key]
    image_rel, label_rel = f'images/{folder}/a.jpg', f'annotations/{folder}/a.png'
    os.makedirs(os.path.join(root, 'images', folder), exist_ok=True)
    os.makedirs(os.path.join(root, 'annotations', folder), exist_ok=True)
    Image.fromarray(np.full(label.shape + (3,), 90, np.uint8)).save(os.path.join(root, image_rel))
    Image.fromarray(label.astype(np.uint8)).save(os.path.join(root, label_rel))
    list_path = os.path.join(root, 'val.txt')
    with open(list_path, 'w') as handle:
        handle.write(f'{image_rel} {label_rel}\n')
    return list_path


# ---------------------------------------------------------------------------------------------------
# Each class on generated data, in each layout.

@pytest.mark.parametrize('key', ['citys', 'voc', 'ade20k', 'coco'])
def test_each_class_on_generated_data(key, toy_root, tmp_path):
    root = toy_root(key)
    train_class, val_class = TRAIN_VAL[key]
    train = train_class(root, _missing(tmp_path), max_iters=6, crop_size=(48, 40))
    val = val_class(root, _missing(tmp_path))
    assert len(train) == 6 and len(val) == 3
    assert train.num_class == val.num_class == DATASET_INFO[key].num_class
    for dataset, shape in ((train, (48, 40)), (val, (64, 128))):
        for index in range(len(dataset) if dataset is val else 2):
            image, label, name = dataset[index]
            assert image.dtype == torch.float32 and image.shape == (3,) + shape
            assert label.dtype == torch.int64 and label.shape == shape
            assert label.min() >= -1 and label.max() < dataset.num_class
            assert isinstance(name, str) and name == os.path.splitext(os.path.basename(
                dataset.files[index]['img']))[0]
    # The generated scenes hold several classes (VOC: background, car, person, plant) and some ignored
    # pixels (over the validation set).
    labels = torch.cat([val[i][1].flatten() for i in range(len(val))])
    assert len(torch.unique(labels[labels >= 0])) >= (4 if key == 'voc' else 6)
    assert (labels == -1).any()


def test_build_dataset_scans_when_the_list_file_is_missing(toy_root, tmp_path, caplog):
    root = toy_root('citys', num_test=2)
    missing = _missing(tmp_path)
    with caplog.at_level(logging.INFO, logger='dataset'):
        train = build_dataset('citys', 'train', data_root=root, list_path=missing, crop_size=(32, 32),
                              max_iters=5)
    assert isinstance(train, CSTrainValSet) and len(train) == 5
    assert f'list file {missing} not found; built a list of 4 samples by scanning {root}' in caplog.text
    val = build_dataset('citys', 'val', data_root=root, list_path=missing, crop_size=(32, 32))
    assert isinstance(val, CSValSet) and len(val) == 3   # training-only kwargs are dropped for val
    test = build_dataset('citys', 'test', data_root=root, list_path=missing)
    image, label, name = test[0]
    assert isinstance(test, CSTestSet) and len(test) == 2
    assert image.shape == (3, 64, 128) and label.shape == (64, 128) and bool((label == -1).all())
    assert name.endswith('_leftImg8bit')


def test_dataset_info_fields():
    for info in DATASET_INFO.values():
        assert len(info.class_names) == info.num_class
        assert hasattr(settings, info.root_setting)
        assert all(hasattr(settings, name) for name in info.list_settings.values())
        assert sorted(info.classes) == ['test', 'train', 'val']
        assert all(cls.num_class == info.num_class for cls in info.classes.values())
    assert DATASET_INFO['citys'].classes['test'] is CSTestSet
    # The names of the original's settings.py, so that a copy of it works here unchanged.
    original = ['DATA_CS', 'DATALIST_CS_TRAIN', 'DATALIST_CS_VAL', 'DATALIST_CS_TEST', 'DATA_VOC',
                'DATALIST_VOC_TRAIN', 'DATALIST_VOC_VAL', 'DATALIST_VOC_TEST', 'DATA_ADE20K', 'DATA_ADE20K_TEST',
                'DATALIST_ADE20K_TRAIN', 'DATALIST_ADE20K_VAL', 'DATALIST_ADE20K_TEST', 'DATA_COCO', 'DATA_COCO_TEST',
                'DATALIST_COCO_TRAIN', 'DATALIST_COCO_VAL', 'DATALIST_COCO_TEST']
    assert all(hasattr(settings, name) for name in original)


# ---------------------------------------------------------------------------------------------------
# Label mappings and reading.

def test_every_cityscapes_label_id_maps_as_spec(tmp_path):
    raw = np.repeat(np.arange(34, dtype=np.uint8)[None, :], 2, axis=0)  # 2 x 34, every labelId
    list_path = _write_citys_pair(str(tmp_path), np.zeros((2, 34, 3), np.uint8), raw)
    _, label, _ = CSValSet(str(tmp_path), list_path)[0]
    expected = [CITYSCAPES_TABLE.get(label_id, -1) for label_id in range(34)]
    assert label[0].tolist() == expected and label[1].tolist() == expected
    assert CITYSCAPES_LABELID_TO_TRAINID == {i: CITYSCAPES_TABLE.get(i, -1) for i in range(34)}
    assert [CITYSCAPES_TABLE[i] for i in CITYSCAPES_TRAINID_TO_LABELID] == list(range(19))
    # A different ignore label is honoured by the same table.
    _, label, _ = CSValSet(str(tmp_path), list_path, ignore_label=255)[0]
    assert label[0, 0] == 255 and label[0, 7] == 0


def test_voc_ade_coco_mappings(tmp_path):
    voc_raw = np.array([[0, 1, 20, 255]], np.uint8).repeat(3, axis=0)
    _, label, _ = VOCDataValSet(str(tmp_path / 'voc'), _write_voc_pair(str(tmp_path / 'voc'), voc_raw))[0]
    assert label[0].tolist() == [0, 1, 20, -1]
    ade_raw = np.array([[0, 1, 2, 150]], np.uint8).repeat(3, axis=0)
    _, label, _ = ADEValSet(str(tmp_path / 'ade'), _write_two_path_pair(str(tmp_path / 'ade'), 'ade20k', ade_raw))[0]
    assert label[0].tolist() == [-1, 0, 1, 149]
    coco_raw = np.array([[0, 90, 181, 255]], np.uint8).repeat(3, axis=0)
    _, label, _ = COCOValSet(str(tmp_path / 'coco'), _write_two_path_pair(str(tmp_path / 'coco'), 'coco', coco_raw))[0]
    assert label[0].tolist() == [0, 90, 181, -1]


def test_palette_png_labels_are_read_as_indices(tmp_path, toy_root):
    raw = np.arange(12, dtype=np.uint8).reshape(3, 4) % 21
    _write_voc_pair(str(tmp_path), raw, palette=True)
    path = tmp_path / 'SegmentationClassAug' / '2007_000001.png'
    assert Image.open(path).mode == 'P'
    assert read_label(str(path)).tolist() == raw.tolist()
    # The generated VOC labels are palette PNGs too, with 255 outlines.
    voc_label = next((toy_root('voc') / 'SegmentationClassAug').glob('*.png'))
    assert Image.open(voc_label).mode == 'P'
    values = set(np.unique(read_label(str(voc_label)).numpy()).tolist())
    assert values <= set(range(21)) | {255} and 255 in values


def test_bgr_order_and_mean(tmp_path):
    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0] = 255                      # pure red
    image[0, 0] = (0, 0, 255)                # one pure blue pixel
    list_path = _write_citys_pair(str(tmp_path), image, np.full((4, 6), 7, np.uint8))
    out, _, _ = CSValSet(str(tmp_path), list_path)[0]
    assert out.shape == (3, 4, 6)
    assert torch.allclose(out[:, 1, 1], torch.tensor([-104.00698793, -116.66876762, 255 - 122.67891434]))
    assert torch.allclose(out[:, 1, 1], torch.tensor([-104.0, -116.7, 132.3]), atol=0.05)
    assert torch.allclose(out[:, 0, 0], torch.tensor([255 - MEAN_BGR[0], -MEAN_BGR[1], -MEAN_BGR[2]]))


def test_grey_images_get_three_equal_channels_and_exif_is_ignored(tmp_path):
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    list_path = _write_citys_pair(str(tmp_path), grey, np.full((4, 6), 7, np.uint8))
    out, _, _ = CSValSet(str(tmp_path), list_path)[0]
    restored = out + torch.tensor(MEAN_BGR).view(3, 1, 1)
    for channel in range(3):
        assert torch.allclose(restored[channel], torch.from_numpy(grey).float(), atol=1e-4)
    # A JPEG whose EXIF says "rotate 90": the stored 4x6 pixels are used as they are.
    exif = Image.Exif()
    exif[0x0112] = 6
    root = tmp_path / 'ade'
    list_path = _write_two_path_pair(str(root), 'ade20k', np.ones((4, 6), np.uint8))
    Image.fromarray(np.full((4, 6, 3), 90, np.uint8)).save(root / 'images/validation/a.jpg', exif=exif)
    out, label, _ = ADEValSet(str(root), list_path)[0]
    assert out.shape == (3, 4, 6) and label.shape == (4, 6)


# ---------------------------------------------------------------------------------------------------
# The training transform.

def _reference_sample(image, raw, lut, params, crop):
    """The original algorithm on the whole image: scale all of it, mean, pad, crop, flip."""
    factor, h_off, w_off, flip = params
    height, width = raw.shape
    if factor != 1.0:
        # OpenCV's resize with fx = fy = factor: size round(H * factor), taps at (x + 0.5) / factor - 0.5.
        size = [round(height * factor), round(width * factor)]
        scaled = torch.ops.aten.upsample_bilinear2d(image[None].float(), size, False, factor, factor)[0]
        scaled = (scaled + 0.5).floor()
        # OpenCV's INTER_NEAREST: floor(x * (1 / factor)), in double precision.
        rows = np.minimum(np.floor(np.arange(scaled.shape[1]) * (1.0 / factor)), height - 1).astype(np.int64)
        cols = np.minimum(np.floor(np.arange(scaled.shape[2]) * (1.0 / factor)), width - 1).astype(np.int64)
        raw = raw[rows][:, cols]
    else:
        scaled = image.float()
    bgr = scaled.flip(0) - torch.tensor(MEAN_BGR).view(3, 1, 1)
    label = lut[raw.long()]
    pad_h, pad_w = max(crop[0] - bgr.shape[1], 0), max(crop[1] - bgr.shape[2], 0)
    bgr = F.pad(bgr, (0, pad_w, 0, pad_h), value=0.0)
    label = F.pad(label, (0, pad_w, 0, pad_h), value=-1)
    bgr = bgr[:, h_off:h_off + crop[0], w_off:w_off + crop[1]]
    label = label[h_off:h_off + crop[0], w_off:w_off + crop[1]]
    if flip:
        bgr, label = bgr.flip(-1), label.flip(-1)
    return bgr, label


def test_crop_window_equals_whole_image_scaling():
    generator = torch.Generator().manual_seed(0)
    lut = CSTrainValSet._label_mapping(-1)
    differing = total = 0
    for height, width, crop in ((60, 90, (40, 50)), (50, 70, (64, 96)), (80, 40, (30, 30))):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        # Smooth label regions, as real ones, plus every labelId somewhere.
        raw = torch.randint(0, 34, (height // 10 + 1, width // 10 + 1), generator=generator, dtype=torch.uint8)
        raw = raw.repeat_interleave(10, 0).repeat_interleave(10, 1)[:height, :width].contiguous()
        for k in range(16):
            factor = 0.5 + k / 10.0
            for _ in range(3):
                params = draw_sample_params(height, width, crop, True, True, generator)
                params = SampleParams(factor, *params[1:]) if params.factor != factor else params
                scaled_h, scaled_w = round(height * factor), round(width * factor)
                h_off = min(params.h_off, max(scaled_h, crop[0]) - crop[0])
                w_off = min(params.w_off, max(scaled_w, crop[1]) - crop[1])
                params = SampleParams(factor, h_off, w_off, params.flip)
                out_image, out_label = scale_crop_flip(image, raw, params, crop, lut)
                ref_image, ref_label = _reference_sample(image, raw, lut, params, crop)
                assert out_image.shape == (3,) + crop and out_label.shape == crop
                difference = (out_image - ref_image).abs()
                assert difference.max() <= 1.0 + 1e-4, (height, width, params)
                differing += int((difference > 1e-3).sum()) + int((out_label != ref_label).sum()) * 3
                total += difference.numel()
    assert differing / total < 0.002


def test_pad_crop_and_flip_values():
    # A 3x4 image, scale off, 5x6 crop: the whole image at the top left, padding with 0 / ignore.
    image = torch.arange(36, dtype=torch.uint8).view(3, 3, 4)
    raw = torch.tensor([[7, 8, 11, 0], [21, 23, 26, 24], [7, 7, 7, 7]], dtype=torch.uint8)
    lut = CSTrainValSet._label_mapping(-1)
    out, label = scale_crop_flip(image, raw, SampleParams(1.0, 0, 0, False), (5, 6), lut)
    mean = torch.tensor(MEAN_BGR).view(3, 1, 1)
    assert torch.allclose(out[:, :3, :4], image.flip(0).float() - mean)
    assert bool((out[:, 3:, :] == 0).all()) and bool((out[:, :, 4:] == 0).all())
    assert label[:3, :4].tolist() == [[0, 1, 2, -1], [8, 10, 13, 11], [0, 0, 0, 0]]
    assert bool((label[3:] == -1).all()) and bool((label[:, 4:] == -1).all())
    # Flipped: the padding moves to the left, the columns are reversed.
    out_f, label_f = scale_crop_flip(image, raw, SampleParams(1.0, 0, 0, True), (5, 6), lut)
    assert torch.equal(out_f, out.flip(-1)) and torch.equal(label_f, label.flip(-1))
    # A crop inside a larger image: offsets select the window.
    big = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    big_raw = torch.randint(0, 34, (20, 30), dtype=torch.uint8)
    out, label = scale_crop_flip(big, big_raw, SampleParams(1.0, 5, 7, False), (8, 9), lut)
    assert torch.allclose(out, big[:, 5:13, 7:16].flip(0).float() - mean)
    assert torch.equal(label, lut[big_raw[5:13, 7:16].long()])


def test_training_set_draws_follow_the_spec(toy_root, tmp_path):
    generator = torch.Generator().manual_seed(1)
    draws = [draw_sample_params(100, 200, (64, 64), True, True, generator) for _ in range(400)]
    factors = {round(d.factor, 6) for d in draws}
    assert factors == {round(0.5 + k / 10, 6) for k in range(16)}
    assert 120 < sum(d.flip for d in draws) < 280
    for d in draws:
        scaled_h, scaled_w = round(100 * d.factor), round(200 * d.factor)
        assert 0 <= d.h_off <= max(scaled_h, 64) - 64 and 0 <= d.w_off <= max(scaled_w, 64) - 64
    fixed = [draw_sample_params(100, 200, (64, 64), False, False, generator) for _ in range(20)]
    assert all(d.factor == 1.0 and not d.flip for d in fixed)
    # scale=False, mirror=False: the crop is a plain window of the image.
    dataset = CSTrainValSet(toy_root('citys'), _missing(tmp_path), crop_size=(32, 48), scale=False, mirror=False)
    image, _, _ = dataset[0]
    train_list = tmp_path / 'train.lst'
    make_list('citys', str(toy_root('citys')), 'train', str(train_list))
    val_image, _, _ = CSValSet(toy_root('citys'), str(train_list))[0]   # the same file, whole
    found = [(h, w) for h in range(64 - 32 + 1) for w in range(128 - 48 + 1)
             if torch.equal(val_image[:, h:h + 32, w:w + 48], image)]
    assert found


def _first_samples(dataset, workers, seed, iterations=2, batch=2):
    """The samples of the first iterations, as the training loop's sampler hands them out."""
    sampler = IterationSampler(len(dataset), iterations, batch, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
    images, labels = zip(*[(image, label) for image, label, _ in loader], strict=True)
    return torch.cat(images), torch.cat(labels)


def test_reproducible_with_a_seed(toy_root, tmp_path):
    dataset = CSTrainValSet(toy_root('citys'), _missing(tmp_path), max_iters=4, crop_size=(32, 32))
    a_images, a_labels = _first_samples(dataset, 0, seed=3)
    b_images, b_labels = _first_samples(dataset, 0, seed=3)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    c_images, _ = _first_samples(dataset, 0, seed=4)
    assert not torch.equal(a_images, c_images)
    # The samples depend on the seed, not on the number of workers.
    for workers in (1, 2):
        images, labels = _first_samples(dataset, workers, seed=3)
        assert torch.equal(images, a_images) and torch.equal(labels, a_labels)
    # A sample's draws come from its key: the same (index, seed) gives the same sample in any order.
    assert all(torch.equal(dataset[(1, 99)][0], dataset[(1, 99)][0]) for _ in range(2))
    assert not torch.equal(dataset[(1, 99)][0], dataset[(1, 98)][0])
    # A plain index draws its seed from torch's global generator.
    torch.manual_seed(5)
    first = dataset[2][0]
    torch.manual_seed(5)
    assert torch.equal(dataset[2][0], first)


def test_max_iters_repeats_and_truncates(toy_root, tmp_path):
    dataset = CSTrainValSet(toy_root('citys'), _missing(tmp_path), max_iters=10)
    assert len(dataset) == 10
    assert [f['img'] for f in dataset.files[:4]] == [f['img'] for f in dataset.files[4:8]]
    assert len(CSTrainValSet(toy_root('citys'), _missing(tmp_path), max_iters=3)) == 3
    assert len(CSTrainValSet(toy_root('citys'), _missing(tmp_path))) == 4


# ---------------------------------------------------------------------------------------------------
# Lists.

@pytest.mark.parametrize('key', ['citys', 'voc', 'ade20k', 'coco'])
def test_make_lists_writes_a_list_the_classes_read(key, toy_root, tmp_path):
    root = toy_root(key)
    for split in ('train', 'val'):
        out = tmp_path / f'{key}_{split}.txt'
        argv = ['--dataset', key, '--root', str(root), '--split', split, '--out', str(out)]
        assert run_main(make_lists_main, argv) == 0
        lines = out.read_text().splitlines()
        assert len(lines) == (4 if split == 'train' else 3)
        if key == 'voc':
            assert all(len(line.split()) == 1 and not line.endswith('.jpg') for line in lines)
        else:
            assert all(len(line.split('\t')) == 2 for line in lines)
        listed = TRAIN_VAL[key][split == 'val'](root, str(out))
        scanned = TRAIN_VAL[key][split == 'val'](root, _missing(tmp_path))
        assert [f['img'] for f in listed.files] == [f['img'] for f in scanned.files]
        assert [f['label'] for f in listed.files] == [f['label'] for f in scanned.files]


def test_list_lines_accept_spaces_ids_and_leading_slashes(toy_root, tmp_path):
    root = toy_root('coco')
    out = tmp_path / 'coco_val.txt'
    make_list('coco', str(root), 'val', str(out))
    pairs = [line.split('\t') for line in out.read_text().splitlines()]
    variants = {
        'spaces': ''.join(f'{a}   {b}\n' for a, b in pairs),
        'slashes': ''.join(f'/{a} /{b}\n' for a, b in pairs),
        'ids': ''.join(os.path.splitext(os.path.basename(a))[0] + '\n' for a, _ in pairs),
    }
    expected = [f['img'] for f in COCOValSet(root, str(out)).files]
    for name, text in variants.items():
        path = tmp_path / f'{name}.txt'
        path.write_text(text)
        assert [os.path.normpath(f['img']) for f in COCOValSet(root, str(path)).files] == \
            [os.path.normpath(p) for p in expected], name
    # Cityscapes test list: image paths only.
    citys = toy_root('citys', num_test=2)
    test_list = tmp_path / 'test.lst'
    make_list('citys', str(citys), 'test', str(test_list))
    assert all('\t' not in line and 'leftImg8bit/test/' in line for line in test_list.read_text().splitlines())
    assert len(CSTestSet(citys, str(test_list))) == 2


# ---------------------------------------------------------------------------------------------------
# Errors: each names the file, setting or flag to fix.

def test_missing_root_names_the_setting_and_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, 'DATA_CS', str(tmp_path / 'nowhere'))
    with pytest.raises(DataError, match=r'DATA_CS.*settings\.py.*--data'):
        build_dataset('citys', 'train')
    with pytest.raises(DataError, match='--data'):
        build_dataset('citys', 'val', data_root=tmp_path / 'also_nowhere')
    assert run_main(make_lists_main, ['--dataset', 'citys', '--split', 'train']) == 2
    assert issubclass(DataError, UserError)


def test_unknown_names_are_errors(toy_root):
    with pytest.raises(UserError, match='citys'):
        build_dataset('cityscape', 'train', data_root=toy_root('citys'))
    with pytest.raises(UserError, match='train, val, test'):
        build_dataset('voc', 'testing', data_root=toy_root('voc'))


def test_missing_files_in_a_list_are_named_with_their_count(toy_root, tmp_path):
    root = toy_root('citys')
    out = tmp_path / 'train.lst'
    make_list('citys', str(root), 'train', str(out))
    lines = out.read_text().splitlines()
    extra = [f'leftImg8bit/train/x/gone{i}_leftImg8bit.png\tgtFine/train/x/gone{i}_gtFine_labelIds.png'
             for i in range(4)]
    out.write_text('\n'.join(lines + extra) + '\n')
    with pytest.raises(DataError) as error:
        CSTrainValSet(str(root), str(out))
    message = str(error.value)
    assert message.startswith('8 file(s) named by ' + str(out))
    assert 'gone0_leftImg8bit.png' in message and 'gone0_gtFine_labelIds.png' in message
    # A line with too many fields, and a Cityscapes line with one path.
    out.write_text('a b c\n')
    with pytest.raises(DataError, match='line 1 of list file'):
        CSTrainValSet(str(root), str(out))
    out.write_text(lines[0].split('\t')[0] + '\n')
    with pytest.raises(DataError, match='expected "<image> <label>"'):
        CSTrainValSet(str(root), str(out))


def test_corrupt_image_is_named_at_read_time(toy_root, tmp_path):
    root = tmp_path / 'citys'
    shutil.copytree(toy_root('citys'), root)
    dataset = CSValSet(str(root), _missing(tmp_path))
    broken = dataset.files[1]['img']
    with open(broken, 'r+b') as handle:   # keep the signature, garble the rest
        handle.seek(40)
        handle.write(b'\x00garbage' * 50)
    dataset[0]
    with pytest.raises(DataError, match=f'image {broken}'):
        dataset[1]
    open(broken, 'wb').close()
    with pytest.raises(DataError, match=f'image {broken} is an empty file'):
        dataset[1]
    with open(dataset.files[2]['label'], 'wb') as handle:
        handle.write(b'not a png at all')
    with pytest.raises(DataError, match='label ' + dataset.files[2]['label']):
        dataset[2]


def test_image_and_label_of_different_sizes(tmp_path):
    list_path = _write_citys_pair(str(tmp_path), np.zeros((4, 6, 3), np.uint8), np.full((4, 5), 7, np.uint8))
    with pytest.raises(DataError, match=r'is 6x4 but its label .*gtFine_labelIds.png is 5x4'):
        CSValSet(str(tmp_path), list_path)[0]


@pytest.mark.parametrize('key, value', [('voc', 30), ('voc', 21), ('citys', 34), ('citys', 255),
                                        ('ade20k', 151), ('coco', 200)])
def test_illegal_label_values_are_named(key, value, tmp_path):
    raw = np.zeros((3, 4), np.uint8)
    raw[1, 2] = value
    root = str(tmp_path)
    if key == 'voc':
        list_path = _write_voc_pair(root, raw)
        dataset = VOCDataValSet(root, list_path)
    elif key == 'citys':
        dataset = CSValSet(root, _write_citys_pair(root, np.zeros((3, 4, 3), np.uint8), raw))
    else:
        dataset = TRAIN_VAL[key][1](root, _write_two_path_pair(root, key, raw))
    with pytest.raises(DataError, match=rf'label .*\.png holds values \[{value}\]'):
        dataset[0]


def test_colour_labels_are_refused(tmp_path):
    colour = np.zeros((3, 4, 3), np.uint8)
    colour[..., 0] = 128
    list_path = _write_citys_pair(str(tmp_path), np.zeros((3, 4, 3), np.uint8), colour)
    with pytest.raises(DataError, match='is a colour image'):
        CSValSet(str(tmp_path), list_path)[0]


def test_voc_scan_needs_the_validation_ids(toy_root, tmp_path):
    root = tmp_path / 'voc'
    shutil.copytree(toy_root('voc'), root)
    os.remove(root / 'ImageSets' / 'Segmentation' / 'val.txt')
    with pytest.raises(DataError, match=r'ImageSets/Segmentation/val.txt.*DATALIST_VOC_TRAIN'):
        VOCDataSet(str(root), _missing(tmp_path))


# ---------------------------------------------------------------------------------------------------
# The generated data set.

def test_toy_dataset_is_deterministic_and_has_the_real_layout(tmp_path):
    a = make_toy_dataset('citys', tmp_path / 'a', num_train=2, num_val=1, size=(32, 64), seed=5)
    b = make_toy_dataset('citys', tmp_path / 'b', num_train=2, num_val=1, size=(32, 64), seed=5)
    c = make_toy_dataset('citys', tmp_path / 'c', num_train=2, num_val=1, size=(32, 64), seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob('*.png'))
    assert len(files) == 6
    assert str(files[0]).startswith('gtFine/train/') and str(files[-1]).startswith('leftImg8bit/val/')
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    labels = np.concatenate([np.asarray(Image.open(a / f)).ravel() for f in files if 'gtFine' in str(f)])
    assert set(np.unique(labels).tolist()) <= {1, 7, 8, 11, 17, 21, 22, 23, 24, 26}
    assert run_main(toy_main, ['--dataset', 'ade20k', '--root', str(tmp_path / 'cli'), '--num-train', '1',
                     '--num-val', '1', '--size', '24,40']) == 0
    assert (tmp_path / 'cli' / 'images' / 'training' / 'ADE_train_00000001.jpg').is_file()
    assert run_main(toy_main, ['--dataset', 'voc', '--root', str(tmp_path / 'x'), '--num-test', '1']) == 2


def test_corrupt_png_is_named(tmp_path):
    import dataset.imageio as imageio
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\nnonsense')
    with pytest.raises(DataError, match=f'image {bad} cannot be decoded'):
        imageio.read_image(str(bad))


def test_samples_do_not_depend_on_the_number_of_threads():
    """Data loader workers run with one thread, the main process with several: a sample must not change with
    that (torch's bilinear kernel rounds some pixels differently by thread count)."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 97, 203), dtype=torch.uint8, generator=generator)
    raw = torch.randint(0, 34, (97, 203), dtype=torch.uint8, generator=generator)
    lut = CSTrainValSet._label_mapping(-1)
    threads = torch.get_num_threads()
    try:
        for k in range(16):
            params = SampleParams(0.5 + k / 10.0, 3, 5, k % 2 == 1)
            samples = []
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                samples.append(scale_crop_flip(image, raw, params, (64, 96), lut))
            for out_image, out_label in samples[1:]:
                assert torch.equal(out_image, samples[0][0]) and torch.equal(out_label, samples[0][1]), params
    finally:
        torch.set_num_threads(threads)
