"""CamVid in CIRKD's layout (train/ + trainannot/, ..., 11 classes, 11 ignored) and CIRKD's name of COCO-Stuff,
`coco_stuff_164k`, on generated data."""
import json
import logging

import numpy as np
import pytest
import torch
from launch import common
from PIL import Image

import settings
import train_baseline
from dataset import (
    DATASET_INFO,
    DATASETS,
    build_dataset,
    check_ignore_label,
    dataset_info,
    resolve_root,
    settings_list_path,
)
from dataset.class_names import CAMVID_CLASSES
from dataset.datasets import CamvidTestSet, CamvidTrainSet, CamvidValSet, DataError
from dataset.make_lists import main as make_lists_main
from dataset.toy import main as toy_main
from utils.errors import run_main

pytestmark = pytest.mark.usefixtures('one_thread')

SPLITS = ('train', 'val', 'test')


@pytest.fixture(scope='module')
def camvid(toy_root):
    return toy_root('camvid', num_train=4, num_val=3, num_test=2, size=(48, 64))


def names_in(folder):
    return sorted(p.name for p in folder.glob('*.png'))


def missing_list(tmp_path):
    return str(tmp_path / 'no_such_list.txt')


def test_toy_camvid_has_the_real_layout_and_void_pixels(camvid):
    # (and the toy generator's hidden list of the files it wrote)
    assert sorted(p.name for p in camvid.iterdir()) == ['.toy_files.txt', 'test', 'testannot', 'train', 'trainannot',
                                                        'val', 'valannot']
    counts = {}
    values = set()
    for split in SPLITS:
        images, labels = names_in(camvid / split), names_in(camvid / f'{split}annot')
        assert images == labels   # an image and its label share the name
        counts[split] = len(images)
        for name in labels:
            label = Image.open(camvid / f'{split}annot' / name)
            assert label.mode == 'L' and label.size == Image.open(camvid / split / name).size == (64, 48)
            values |= set(np.unique(np.asarray(label)).tolist())
    assert counts == {'train': 4, 'val': 3, 'test': 2}
    assert values <= set(range(12)) and 11 in values and len(values) >= 7


def test_classes_and_settings():
    info = dataset_info('camvid')
    assert info.num_class == 11 and len(info.class_names) == 11 and info.class_names is CAMVID_CLASSES
    assert CAMVID_CLASSES[0] == 'Sky' and CAMVID_CLASSES[3] == 'Road' and CAMVID_CLASSES[10] == 'Bicyclist'
    assert info.classes == {'train': CamvidTrainSet, 'val': CamvidValSet, 'test': CamvidTestSet}
    assert all(info.classes[split].labelled for split in SPLITS)   # CamVid's test split has labels
    assert settings.DATA_CAMVID and info.root_setting == 'DATA_CAMVID'
    for split in SPLITS:
        assert settings_list_path('camvid', split).endswith(f'dataset/list/CamVid/camvid_{split}_list.txt')
    assert 'camvid' in DATASETS


def test_cirkd_list_files_are_read(camvid, tmp_path):
    names = names_in(camvid / 'val')
    list_path = tmp_path / 'camvid_val_list.txt'
    list_path.write_text(''.join(f'val/{n} valannot/{n}\n' for n in reversed(names)))
    dataset = CamvidValSet(camvid, str(list_path))
    assert [f['img'] for f in dataset.files] == [str(camvid / 'val' / n) for n in reversed(names)]
    assert [f['label'] for f in dataset.files] == [str(camvid / 'valannot' / n) for n in reversed(names)]
    assert dataset.files[0]['name'] == names[-1][:-len('.png')]
    # Sample ids name the same files.
    list_path.write_text(''.join(n[:-len('.png')] + '\n' for n in names))
    assert [f['label'] for f in CamvidValSet(camvid, str(list_path)).files] == \
        [str(camvid / 'valannot' / n) for n in names]


def test_splits_are_scanned_without_a_list(camvid, tmp_path, caplog):
    missing = missing_list(tmp_path)
    with caplog.at_level(logging.WARNING, logger='dataset'):
        train = build_dataset('camvid', 'train', data_root=camvid, list_path=missing, crop_size=(32, 40), max_iters=6)
    assert f'list file {missing} not found; built a list of 4 samples by scanning {camvid}' in caplog.text
    assert isinstance(train, CamvidTrainSet) and len(train) == 6
    assert [f['label'] for f in train.files[:4]] == [str(camvid / 'trainannot' / n) for n in names_in(camvid / 'train')]
    for index in range(2):
        image, label, name = train[index]
        assert image.shape == (3, 32, 40) and image.dtype == torch.float32
        assert label.shape == (32, 40) and label.dtype == torch.int64 and label.min() >= -1 and label.max() < 11
        assert isinstance(name, str)
    ignored = 0
    for split, cls, count in (('val', CamvidValSet, 3), ('test', CamvidTestSet, 2)):
        dataset = build_dataset('camvid', split, data_root=camvid, list_path=missing, crop_size=(32, 40))
        assert isinstance(dataset, cls) and len(dataset) == count
        labels = torch.stack([dataset[i][1] for i in range(count)])
        assert dataset[0][0].shape == (3, 48, 64) and labels.shape == (count, 48, 64)
        # Whole labelled images (the test split too): several classes, void (11) ignored.
        assert len(torch.unique(labels[labels >= 0])) >= 5 and labels.min() >= -1 and labels.max() <= 10
        ignored += int((labels == -1).sum())
    assert ignored > 0


def test_labels_map_11_to_ignore_and_refuse_other_values(tmp_path):
    (tmp_path / 'val').mkdir()
    (tmp_path / 'valannot').mkdir()
    raw = np.array([[0, 5, 10, 11], [11, 3, 8, 1]], np.uint8)
    Image.fromarray(np.full((2, 4, 3), 100, np.uint8)).save(tmp_path / 'val' / 'a.png')
    Image.fromarray(raw).save(tmp_path / 'valannot' / 'a.png')
    missing = missing_list(tmp_path)
    _, label, name = CamvidValSet(tmp_path, missing)[0]
    assert name == 'a' and label.tolist() == [[0, 5, 10, -1], [-1, 3, 8, 1]]
    assert CamvidValSet(tmp_path, missing, ignore_label=255)[0][1][0, 3] == 255
    raw[1, 2] = 12
    Image.fromarray(raw).save(tmp_path / 'valannot' / 'a.png')
    with pytest.raises(DataError, match=r'label .*valannot/a\.png holds values \[12\] .*camvid \(0\.\.11\)'):
        CamvidValSet(tmp_path, missing)[0]


def test_make_lists_writes_cirkd_lists_that_read_back(camvid, tmp_path):
    for split in SPLITS:
        out = tmp_path / f'camvid_{split}_list.txt'
        assert run_main(make_lists_main, ['--dataset', 'camvid', '--root', str(camvid), '--split', split,
                                          '--out', str(out)]) == 0
        names = names_in(camvid / split)
        assert out.read_text().splitlines() == [f'{split}/{n} {split}annot/{n}' for n in names]
        listed = build_dataset('camvid', split, data_root=camvid, list_path=str(out))
        assert [f['label'] for f in listed.files] == [str(camvid / f'{split}annot' / n) for n in names]


def test_toy_cli_for_camvid(tmp_path):
    root = tmp_path / 'cv'
    assert run_main(toy_main, ['--dataset', 'camvid', '--root', str(root), '--num-train', '1', '--num-val', '1',
                               '--num-test', '1', '--size', '24,32']) == 0
    assert {p.parent.name for p in root.rglob('*.png')} == {'train', 'trainannot', 'val', 'valannot', 'test',
                                                            'testannot'}
    assert run_main(toy_main, ['--dataset', 'ade20k', '--root', str(tmp_path / 'x'), '--num-test', '1']) == 2


def test_coco_stuff_164k_is_coco(toy_root, tmp_path, monkeypatch):
    root = toy_root('coco', num_train=2, num_val=2, size=(32, 48))
    assert 'coco_stuff_164k' in DATASETS and 'coco_stuff_164k' not in DATASET_INFO
    assert dataset_info('coco_stuff_164k') is dataset_info('coco') is DATASET_INFO['coco']
    for split in SPLITS:
        assert settings_list_path('coco_stuff_164k', split) == settings_list_path('coco', split)
    with pytest.raises(DataError, match='coco_stuff_164k'):
        check_ignore_label('coco_stuff_164k', 7)
    check_ignore_label('coco_stuff_164k', 255)
    monkeypatch.setattr(settings, 'DATA_COCO', str(root))
    assert resolve_root('coco_stuff_164k') == resolve_root('coco') == str(root)
    missing = missing_list(tmp_path)
    for split in ('train', 'val'):
        alias = build_dataset('coco_stuff_164k', split, list_path=missing, crop_size=(24, 24), max_iters=2)
        coco = build_dataset('coco', split, list_path=missing, crop_size=(24, 24), max_iters=2)
        assert type(alias) is type(coco) and alias.files == coco.files
        for index in range(2):
            seeded = (index, 7)   # the same draws for a training sample
            for a, b in zip(alias[seeded], coco[seeded], strict=True):
                assert a == b if isinstance(a, str) else torch.equal(a, b)
    out = tmp_path / 'alias.txt'
    assert run_main(make_lists_main, ['--dataset', 'coco_stuff_164k', '--root', str(root), '--split', 'val',
                                      '--out', str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2 and '\t' in out.read_text()


def test_short_training_run_on_camvid(camvid, tmp_path):
    argv = common(camvid, tmp_path, batch=2, iters=2, val_per_iters=2) + [
        '--dataset', 'camvid', '--crop-size', '32,32', '--model', 'psp_mobile', '--backbone', 'mobile',
        '--pretrained-base', 'None']
    train_baseline.main(argv)
    stem = 'baseline_psp_mobile_mobile_camvid'
    history = [json.loads(line) for line in (tmp_path / 'logs' / f'{stem}_history.jsonl').read_text().splitlines()]
    assert history[-1]['iteration'] == 2
    assert list(history[-1]['IoU']) == CAMVID_CLASSES
    assert (tmp_path / 'ckpt' / f'{stem}_best_model.pth').is_file()
