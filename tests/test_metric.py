"""The metric, multi-scale prediction, shard sampler, palettes and pictures, against hand-worked values."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.evaluation import ShardSampler, evaluate, predict, scaled_size
from utils.metric import ConfusionMatrix, format_iou_table, format_summary
from utils.palette import (
    ADE20K_COLORS,
    CITYSCAPES_COLORS,
    bit_colormap,
    cityscapes_trainid_to_labelid,
    class_colors,
    colorize,
    colorize_rgb,
)
from utils.visualize import IMAGE_MEAN_BGR, denormalize_image, make_panel

# ---------------------------------------------------------------- confusion matrix

def test_confusion_matrix_by_hand():
    # 3 classes; labels row-major, -1 and 7 are ignored.
    label = torch.tensor([[0, 0, 1, 1],
                          [2, 2, -1, 7]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 0]])
    cm = ConfusionMatrix(3).update(pred, label)
    expected = torch.tensor([[1, 1, 0],   # true 0: one right, one called 1
                             [0, 2, 0],   # true 1: both right
                             [1, 0, 1]])  # true 2: one right, one called 0
    assert torch.equal(cm.mat, expected)
    pix_acc, miou, iou = cm.compute()
    assert pix_acc == pytest.approx(4 / 6)
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = 1/2
    assert iou.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_absent_classes_are_left_out_of_the_mean():
    # 5 classes: class 3 never labelled nor predicted (NaN, left out), class 4 never labelled but
    # predicted once (IoU 0, counted), class 2 labelled but never predicted (IoU 0, counted).
    label = torch.tensor([0, 0, 1, 2, 2, -1])
    pred = torch.tensor([0, 4, 1, 0, 1, 3])  # the 3 sits on an ignored pixel: not counted
    pix_acc, miou, iou = ConfusionMatrix(5).update(pred, label).compute()
    assert pix_acc == pytest.approx(2 / 5)
    # class 0: TP 1, labelled 2, predicted 2 -> 1/3; class 1: TP 1, labelled 1, predicted 2 -> 1/2
    assert iou[:3].tolist() == pytest.approx([1 / 3, 1 / 2, 0.0])
    assert math.isnan(iou[3].item())
    assert iou[4].item() == 0.0
    assert miou == pytest.approx((1 / 3 + 1 / 2 + 0 + 0) / 4)
    # The original averaged over all 5 classes (NaN -> 0 with its epsilon): a lower number.
    assert miou > (1 / 3 + 1 / 2) / 5


def test_accumulation_equals_one_update_and_ignore_255():
    torch.manual_seed(0)
    label = torch.randint(0, 6, (4, 9, 11))
    label[label == 5] = 255
    pred = torch.randint(0, 5, (4, 9, 11))
    whole = ConfusionMatrix(5).update(pred, label)
    parts = ConfusionMatrix(5)
    for i in range(4):
        parts.update(pred[i], label[i])
    assert torch.equal(whole.mat, parts.mat)
    assert whole.mat.dtype == torch.int64
    assert int(whole.mat.sum()) == int((label != 255).sum())
    # Against a direct numpy count.
    lab, prd = label.numpy().ravel(), pred.numpy().ravel()
    keep = lab != 255
    direct = np.zeros((5, 5), np.int64)
    np.add.at(direct, (lab[keep], prd[keep]), 1)
    assert np.array_equal(whole.mat.numpy(), direct)


def test_empty_and_bad_inputs():
    cm = ConfusionMatrix(3)
    pix_acc, miou, iou = cm.compute()
    assert math.isnan(pix_acc) and math.isnan(miou) and torch.isnan(iou).all()
    with pytest.raises(ValueError, match='shape'):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='class indices'):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r'\[0, 3\)'):
        cm.update(torch.full((2, 2), 3), torch.zeros(2, 2, dtype=torch.long))


def test_table_and_summary_format():
    iou = torch.tensor([0.5, float('nan'), 0.123456], dtype=torch.float64)
    table = format_iou_table(iou, ['road', 'sidewalk', 'traffic light'])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[1].split()[-1] == '50.000' and 'road' in lines[1]
    assert lines[2].split()[-1] == '-'
    assert lines[3].split()[-1] == '12.346' and 'traffic light' in lines[3]
    assert format_summary(0.9512345, 0.7) == 'Overall validation pixAcc: 95.123, mIoU: 70.000'


# ---------------------------------------------------------------- shard sampler

@pytest.mark.parametrize('length,world', [(3, 2), (7, 3), (2, 4), (0, 2), (5, 1)])
def test_shard_sampler_covers_every_index_once(length, world):
    dataset = list(range(length))
    shards = [list(ShardSampler(dataset, num_replicas=world, rank=r)) for r in range(world)]
    joined = sorted(i for shard in shards for i in shard)
    assert joined == list(range(length))
    assert all(len(ShardSampler(dataset, world, r)) == len(shards[r]) for r in range(world))


# ---------------------------------------------------------------- multi-scale + flip

class TinyNet(nn.Module):
    """Output stride 2, not symmetric under flips, returns a list like the real networks."""

    def __init__(self, num_class=4):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, num_class, 3, stride=2, padding=1)
        self.bias_x = nn.Parameter(torch.linspace(-1, 1, num_class).view(1, num_class, 1, 1))

    def forward(self, x):
        out = self.conv(x)
        ramp = torch.linspace(0, 1, out.shape[-1], device=x.device).view(1, 1, 1, -1)
        return [out + self.bias_x * ramp, out.detach() * 0]


def test_scaled_size_matches_interpolate_scale_factor():
    image = torch.zeros(1, 3, 37, 53)
    for scale in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 0.3):
        out = F.interpolate(image, scale_factor=scale, mode='bilinear', align_corners=True)
        assert tuple(out.shape[-2:]) == scaled_size(37, 53, scale)


def direct_prediction(net, image, scales, flip):
    """Logits at the image's size averaged over `scales` (and the flipped image's, flipped back), written out with
    F.interpolate: the reference of `predict`."""
    height, width = image.shape[-2:]

    def full(x):
        return F.interpolate(net(x)[0], size=(height, width), mode='bilinear', align_corners=True)

    total = 0
    with torch.no_grad():
        for s in scales:
            x = F.interpolate(image, scale_factor=s, mode='bilinear', align_corners=True)
            if flip:
                total = total + 0.5 * (full(x) + torch.flip(full(torch.flip(x, dims=[3])), dims=[3]))
            else:
                total = total + full(x)
    return total / len(scales)


def test_predict_multi_scale_flip_against_direct_computation():
    net = TinyNet().eval()
    torch.manual_seed(2)
    image = torch.randn(1, 3, 21, 30)
    scales = (0.5, 1.0, 1.75)
    got = predict(net, image, scales=scales, flip=True)
    expected = direct_prediction(net, image, scales, flip=True)
    assert got.shape == (1, 4, 21, 30)
    assert torch.allclose(got, expected, atol=1e-6)
    # Flip makes a difference for this network, so the test would notice a missing flip-back.
    assert not torch.allclose(predict(net, image, scales=scales, flip=False), expected, atol=1e-3)
    with pytest.raises(ValueError):
        predict(net, image, scales=(0.0,))


def test_evaluate_counts_each_pixel_and_restores_mode():
    """evaluate's confusion matrix against a count with numpy of the direct predictions (ignored pixels out)."""
    net = TinyNet()
    net.train()
    torch.manual_seed(3)
    images = torch.randn(3, 3, 12, 16)
    labels = torch.randint(-1, 4, (3, 12, 16))
    loader = [(images[i:i + 1], labels[i:i + 1], [f'img{i}']) for i in range(3)]
    seen = []
    cm = evaluate(net, loader, 4, 'cpu', scales=(1.0, 0.5), flip=True,
                  on_prediction=lambda pos, img, lab, pred, names: seen.append((pos, names[0], pred.shape)))
    assert net.training
    assert [s[:2] for s in seen] == [(0, 'img0'), (1, 'img1'), (2, 'img2')]
    net.eval()
    counts = np.zeros((4, 4), np.int64)
    for i in range(3):
        prediction = direct_prediction(net, images[i:i + 1], (1.0, 0.5), True).argmax(1)[0].numpy()
        label = labels[i].numpy()
        np.add.at(counts, (label[label >= 0], prediction[label >= 0]), 1)
    assert counts.sum() == int((labels >= 0).sum()) and np.count_nonzero(counts) > 4  # not one class everywhere
    assert np.array_equal(cm.mat.numpy(), counts)


# Two processes against one: tests/test_eval.py runs eval.py under torchrun on three images.


# ---------------------------------------------------------------- palettes and pictures

def test_cityscapes_palette_official_colours():
    assert CITYSCAPES_COLORS.shape == (19, 3)
    assert tuple(CITYSCAPES_COLORS[0]) == (128, 64, 128)     # road
    assert tuple(CITYSCAPES_COLORS[10]) == (70, 130, 180)    # sky
    assert tuple(CITYSCAPES_COLORS[13]) == (0, 0, 142)       # car
    assert tuple(CITYSCAPES_COLORS[18]) == (119, 11, 32)     # bicycle
    label = np.array([[0, 10], [13, -1]])
    rgb = colorize_rgb(label, 'citys')
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[1, 1].tolist() == [0, 0, 0]
    image = colorize(label, 'citys')
    assert image.mode == 'P'
    assert np.array(image).tolist() == [[0, 10], [13, 255]]
    assert np.array_equal(np.array(image.convert('RGB')), rgb)


def test_cityscapes_trainid_to_labelid():
    from dataset.datasets import CITYSCAPES_LABELID_TO_TRAINID
    train_ids = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                          [10, 11, 12, 13, 14, 15, 16, 17, 18, 255]])
    label_ids = cityscapes_trainid_to_labelid(train_ids)
    assert label_ids.dtype == np.uint8
    assert label_ids.tolist() == [[7, 8, 11, 12, 13, 17, 19, 20, 21, 22],
                                  [23, 24, 25, 26, 27, 28, 31, 32, 33, 0]]  # ignore -> 0 'unlabeled'
    assert cityscapes_trainid_to_labelid(torch.tensor([[-1, 13]])).tolist() == [[0, 26]]
    # Round trip through the data set's own labelId -> trainId table.
    back = np.vectorize(lambda i: CITYSCAPES_LABELID_TO_TRAINID[int(i)])(label_ids[:, :9])
    assert np.array_equal(back, train_ids[:, :9])


def test_voc_ade_coco_palettes():
    voc = bit_colormap(256)
    assert voc[1].tolist() == [128, 0, 0] and voc[2].tolist() == [0, 128, 0]
    assert voc[15].tolist() == [192, 128, 128]  # person
    assert voc[255].tolist() == [224, 224, 192]  # the VOC boundary colour
    assert len(np.unique(voc, axis=0)) == 256
    assert colorize_rgb(np.array([[15, -1]]), 'voc').tolist() == [[[192, 128, 128], [224, 224, 192]]]
    # ADE20K: class k is written as k + 1 (the annotation encoding), ignore as 0.
    ade = colorize(np.array([[0, 149, -1]]), 'ade20k')
    assert np.array(ade).tolist() == [[1, 150, 0]]
    assert colorize_rgb(np.array([[0, 149]]), 'ade20k').tolist() == [[[120, 120, 120], [92, 0, 255]]]
    assert len(ADE20K_COLORS) == 150 and len(np.unique(ADE20K_COLORS, axis=0)) >= 149
    assert class_colors('coco', 182).shape == (182, 3)
    assert np.array(colorize(np.array([[181, -1]]), 'coco')).tolist() == [[181, 255]]


def test_denormalize_and_panel():
    # pictures wide enough for their titles (a title wider than its picture widens the column)
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3)).astype(np.uint8)
    normalised = rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) - np.array(
        IMAGE_MEAN_BGR, np.float32).reshape(3, 1, 1)
    assert np.array_equal(denormalize_image(torch.from_numpy(normalised)), rgb)
    label = np.zeros((48, 64), np.int64)
    panel = make_panel([('image', rgb), ('gt', colorize_rgb(label, 'citys')),
                        ('pred', colorize(label, 'citys')), ('half', rgb[::2, ::2])])
    assert panel.mode == 'RGB'
    assert panel.height > 48 and panel.width == 64 * 4 + 4 * 3
    # The first column is pasted unchanged below the title bar.
    assert np.array_equal(np.array(panel)[-48:, :64], rgb)
