"""A user's own data set (`--dataset folder --data DIR`) in the documented layout: training, evaluation with
its JSON results, optional list files, and every bad file named in a clear error."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch import common, run_in_process
from PIL import Image

import eval as eval_script
from dataset import DataError, build_dataset
from models.model_zoo import get_segmentation_model
from utils.errors import run_main

CLASSES = ['background', 'leaf', 'stem']


def write_sample(root, split, name, rng, size=(48, 64), ext='.jpg', label_size=None, label_max=2):
    h, w = size
    label = rng.integers(0, label_max + 1, size=label_size or size, dtype=np.uint8)
    label[:4, :4] = 255  # ignored pixels
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    (root / 'images' / split).mkdir(parents=True, exist_ok=True)
    (root / 'labels' / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / 'images' / split / f'{name}{ext}')
    Image.fromarray(label).save(root / 'labels' / split / f'{name}.png')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('own_data')
    (root / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
    rng = np.random.default_rng(0)
    for i in range(4):
        write_sample(root, 'train', f'plant_{i}', rng, ext='.jpg' if i % 2 else '.png')
    for i in range(2):
        write_sample(root, 'val', f'check_{i}', rng)
    return root


def copy_of(folder, tmp_path):
    target = tmp_path / 'data'
    shutil.copytree(folder, target)
    return target


def test_scanned_layout_and_optional_list(folder, tmp_path):
    train = build_dataset('folder', 'train', data_root=folder, crop_size=(32, 32), max_iters=8)
    val = build_dataset('folder', 'val', data_root=folder)
    assert val.num_class == 3 and list(val.class_names) == CLASSES
    assert len(val) == 2
    image, label, name = val[0]
    assert image.shape[-2:] == (48, 64) and label.shape == (48, 64)
    assert set(label.unique().tolist()) <= {-1, 0, 1, 2} and (label == -1).any()
    assert len(train) == 8 and train[(0, 5)][0].shape[-2:] == (32, 32)
    # a list file DIR/val.txt picks the samples (ids or relative image paths)
    data = copy_of(folder, tmp_path)
    (data / 'val.txt').write_text('check_1\n')
    assert len(build_dataset('folder', 'val', data_root=data)) == 1


BAD_FILES = [
    ('missing label', lambda d: (d / 'labels' / 'val' / 'check_1.png').unlink(), 'check_1'),
    ('label of another size', lambda d: Image.fromarray(np.zeros((20, 20), np.uint8)).save(
        d / 'labels' / 'val' / 'check_1.png'), 'check_1'),
    ('class id outside classes.txt', lambda d: Image.fromarray(np.full((48, 64), 7, np.uint8)).save(
        d / 'labels' / 'val' / 'check_0.png'), 'check_0.png'),
    ('corrupt image', lambda d: (d / 'images' / 'val' / 'check_0.jpg').write_bytes(b'not an image'), 'check_0.jpg'),
    ('no classes.txt', lambda d: (d / 'classes.txt').unlink(), 'classes.txt'),
    ('empty classes.txt', lambda d: (d / 'classes.txt').write_text('\n'), 'classes.txt'),
    ('a class named twice', lambda d: (d / 'classes.txt').write_text('a\nb\na\n'), 'more than once'),
    ('list naming a missing image', lambda d: (d / 'val.txt').write_text('check_9\n'), 'check_9'),
]


@pytest.mark.parametrize('case,damage,named', BAD_FILES, ids=[case for case, _, _ in BAD_FILES])
def test_bad_files_are_named(folder, tmp_path, case, damage, named):
    data = copy_of(folder, tmp_path)
    damage(data)
    with pytest.raises(DataError) as error:
        val = build_dataset('folder', 'val', data_root=data)
        for i in range(len(val)):
            val[i]
    assert named in str(error.value), str(error.value)


def png_labels(root, split):
    """{name: the label PNG's values (int64)} of a split, read with PIL."""
    return {path.stem: np.array(Image.open(path)).astype(np.int64)
            for path in sorted((root / 'labels' / split).glob('*.png'))}


def test_labels_are_the_png_values(folder):
    """Validation and training samples (whole image: no scaling, flip or crop offset) carry the PNGs' values,
    255 as the ignore label."""
    expected = {name: np.where(values == 255, -1, values) for name, values in png_labels(folder, 'val').items()}
    val = build_dataset('folder', 'val', data_root=folder)
    got = {name: label.numpy() for _, label, name in (val[i] for i in range(len(val)))}
    assert got.keys() == expected.keys()
    for name, label in got.items():
        assert np.array_equal(label, expected[name]), name
    train = build_dataset('folder', 'train', data_root=folder, crop_size=(48, 64), max_iters=4, scale=False,
                          mirror=False)
    train_png = png_labels(folder, 'train')
    for index in range(4):
        _, label, name = train[(index, index)]
        assert np.array_equal(label.numpy(), np.where(train_png[name] == 255, -1, train_png[name])), name


def test_train_and_evaluate_own_data(folder, tmp_path):
    """Training with --dataset folder (history by class name), then eval.py: its JSON against a count of the
    network's predictions and the label PNGs."""
    args = common(folder, tmp_path, iters=2, val_per_iters=2) + [
        '--dataset', 'folder', '--model', 'psp_mobile', '--backbone', 'mobile', '--pretrained-base', 'None']
    run_in_process('baseline', args)
    stem = 'baseline_psp_mobile_mobile_folder'
    history = json.loads((tmp_path / 'logs' / f'{stem}_history.jsonl').read_text().splitlines()[0])
    assert list(history['IoU']) == CLASSES
    checkpoint = tmp_path / 'ckpt' / f'{stem}.pth'

    out = tmp_path / 'eval'
    status = run_main(eval_script.main, ['--dataset', 'folder', '--data', str(folder), '--model', 'psp_mobile',
                                         '--backbone', 'mobile', '--pretrained', str(checkpoint), '--save-dir',
                                         str(out), '--workers', '0', '--no-cuda'])
    assert status == 0
    results = list(out.glob('*_val.json'))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert record['dataset'] == 'folder' and record['split'] == 'val' and record['images'] == 2
    assert record['checkpoint'] == checkpoint.name and len(record['sha256']) == 64
    assert list(record['IoU']) == CLASSES

    net = get_segmentation_model('psp_mobile', 'mobile', len(CLASSES), False, pretrained=str(checkpoint)).eval()
    images = {name: image for image, _, name in build_dataset('folder', 'val', data_root=folder)}
    counts = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    for name, label in png_labels(folder, 'val').items():
        with torch.no_grad():
            logits = net(torch.as_tensor(images[name])[None])[0]
        logits = F.interpolate(logits, size=label.shape, mode='bilinear', align_corners=True)
        prediction = logits.argmax(1)[0].numpy()
        np.add.at(counts, (label[label != 255], prediction[label != 255]), 1)
    hits = np.diag(counts)
    union = counts.sum(0) + counts.sum(1) - hits
    iou = [100 * hit / total if total else None for hit, total in zip(hits, union, strict=True)]
    assert record['pixAcc'] == pytest.approx(100 * hits.sum() / counts.sum(), abs=1e-4)
    assert list(record['IoU'].values()) == pytest.approx(iou, abs=1e-4)
    present = [v for v in iou if v is not None]
    assert record['mIoU'] == pytest.approx(sum(present) / len(present), abs=1e-4)


def test_folder_needs_data(tmp_path, capsys):
    import train_baseline
    with pytest.raises(SystemExit) as exit_info:
        train_baseline.parse_args(['--dataset', 'folder', '--no-cuda', '--pretrained-base', 'None'])
    assert exit_info.value.code == 2 and '--data DIR' in capsys.readouterr().err
