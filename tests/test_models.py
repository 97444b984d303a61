"""The networks: layout against the released checkpoints, outputs, checkpoint loading, FLOPs."""
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models import MODEL_BACKBONES, CheckpointError, get_segmentation_model, read_state_dict
from models.model_zoo import build_segmentation_model, identify_network
from utils.errors import UserError
from utils.flops import count_flops, count_params, format_complexity

# The key layout of the released CIRKD checkpoints (every key and shape), kept with the tests.
MODEL_KEYS = Path(__file__).resolve().parent / 'data' / 'model_keys.json'
SMALL_INPUT = (1, 3, 64, 64)


def parse_config(name):
    """'deeplabv3 backbone=resnet18 aux=True num_class=19' -> (model, backbone, aux, num_class)."""
    model, *fields = name.split()
    kv = dict(field.split('=') for field in fields)
    return model, kv['backbone'], kv['aux'] == 'True', int(kv['num_class'])


def released_layouts():
    if not MODEL_KEYS.is_file():
        pytest.skip('spec file %s not present' % MODEL_KEYS)
    with open(MODEL_KEYS) as f:
        return json.load(f)


@pytest.fixture
def hwd_log(caplog):
    """caplog at level INFO: the library modules log to `logging.getLogger(__name__)` under the root."""
    caplog.set_level(logging.INFO)
    return caplog


def run(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


# ---------------------------------------------------------------- layout and outputs

def test_layout_matches_released_checkpoints():
    layouts = released_layouts()
    assert len(layouts) >= 7
    for name, keys in layouts.items():
        model, backbone, aux, num_class = parse_config(name)
        net = build_segmentation_model(model, backbone, num_class, aux)
        built = [(k, list(v.shape)) for k, v in net.state_dict().items()]
        assert built == [(k, list(shape)) for k, shape in keys.items()], name


# The final classifiers of the HWD / CIRKD heads on ResNets and HWD's MobileNetV2 (the zoo's other families have
# tests of their own).
CLASSIFIERS = {'deeplabv3': 'head.block.4', 'deeplabv3_mobile': 'head.block.4', 'psp': 'head.classifier',
               'psp_mobile': 'head.classifier', 'upernet': 'head.conv_last.1', 'upernet_lite': 'head.conv_last.1'}


def test_only_final_classifiers_have_biases_and_padding_equals_dilation():
    for model, classifier in CLASSIFIERS.items():
        backbone = MODEL_BACKBONES[model][0]
        net = build_segmentation_model(model, backbone, 19, aux=True)
        classifiers = {name for name, m in net.named_modules()
                       if isinstance(m, nn.Conv2d) and m.bias is not None}
        expected = {classifier}
        if backbone != 'mobile':
            expected.add('auxlayer.block.4')
        assert classifiers == expected, model
        for name, m in net.named_modules():
            if isinstance(m, nn.Conv2d):
                pad = m.dilation[0] if m.kernel_size == (3, 3) else 0
                assert m.padding == (pad, pad), name


@pytest.mark.parametrize('model,backbone,aux,feat_ch', [
    ('deeplabv3', 'resnet18', True, 128),
    ('deeplabv3', 'resnet18', False, 128),
    ('psp', 'resnet18', True, 128),
    ('psp', 'resnet18', False, 128),
    ('deeplabv3_mobile', 'mobile', True, 128),  # aux is accepted and ignored
    ('psp_mobile', 'mobile', False, 128),
])
def test_outputs_and_stride_8(model, backbone, aux, feat_ch):
    net = get_segmentation_model(model, backbone, 19, aux)
    out = run(net, torch.randn(2, 3, 64, 96))
    with_aux = aux and backbone != 'mobile'
    assert len(out) == (3 if with_aux else 2)
    assert out[0].shape == (2, 19, 8, 12)
    assert out[-1].shape == (2, feat_ch, 8, 12)
    if with_aux:
        assert out[1].shape == (2, 19, 8, 12)
    # features are what the classifier sees
    classifier = net.head.block[4] if model.startswith('deeplabv3') else net.head.classifier
    torch.testing.assert_close(classifier(out[-1]), out[0])


def test_dilation_rules_of_spec():
    def conv(net, name):
        return dict(net.named_modules())[name]

    def check(net, name, stride, dilation):
        m = conv(net, name)
        assert (m.stride, m.dilation, m.padding) == ((stride,) * 2, (dilation,) * 2, (dilation,) * 2), name

    r18 = build_segmentation_model('deeplabv3', 'resnet18', 19, aux=True)
    for name, stride, dilation in [('layer2.0.conv1', 2, 1), ('layer3.0.conv1', 1, 1), ('layer3.0.conv2', 1, 2),
                                   ('layer3.1.conv1', 1, 2), ('layer4.0.conv1', 1, 2), ('layer4.0.conv2', 1, 4),
                                   ('layer4.1.conv1', 1, 4), ('layer4.1.conv2', 1, 4)]:
        check(r18, 'pretrained.' + name, stride, dilation)
    for i, rate in enumerate((12, 24, 36), start=1):
        check(r18, 'head.aspp.b%d.block.0' % i, 1, rate)
    r50 = build_segmentation_model('psp', 'resnet50', 19, aux=False)
    for name, stride, dilation in [('layer2.0.conv2', 2, 1), ('layer3.0.conv2', 1, 1), ('layer3.1.conv2', 1, 2),
                                   ('layer4.0.conv2', 1, 2), ('layer4.2.conv2', 1, 4)]:
        check(r50, 'pretrained.' + name, stride, dilation)
    assert conv(r50, 'pretrained.layer2.0.downsample.0').stride == (2, 2)
    mobile = build_segmentation_model('deeplabv3_mobile', 'mobile', 19, aux=False)
    for index, stride, dilation in [(1, 1, 1), (2, 2, 1), (4, 2, 1), (6, 1, 1), (7, 1, 1), (8, 1, 2), (13, 1, 2),
                                    (14, 1, 2), (15, 1, 4), (17, 1, 4)]:
        dw = 'conv.0' if index == 1 else 'conv.3'
        check(mobile, 'pretrained.net.features.%d.%s' % (index, dw), stride, dilation)


def test_resnet_stages_have_stride_4_8_8_8():
    net = build_segmentation_model('deeplabv3', 'resnet50', 19, aux=True)
    stages = run(net.pretrained, torch.randn(1, 3, 64, 64))
    assert [tuple(s.shape[1:]) for s in stages] == [(256, 16, 16), (512, 8, 8), (1024, 8, 8), (2048, 8, 8)]


@pytest.mark.parametrize('num_class', [21, 150, 182])
def test_num_class_changes_only_classifier_rows(num_class):
    for model, backbone in (('deeplabv3', 'resnet18'), ('psp_mobile', 'mobile')):
        ref = build_segmentation_model(model, backbone, 19, aux=True).state_dict()
        other = build_segmentation_model(model, backbone, num_class, aux=True).state_dict()
        assert list(ref) == list(other)
        changed = {k for k in ref if ref[k].shape != other[k].shape}
        for k in changed:
            assert k.endswith(('block.4.weight', 'block.4.bias', 'classifier.weight', 'classifier.bias')), k
            assert other[k].shape[0] == num_class and ref[k].shape[1:] == other[k].shape[1:]
        assert len(changed) == (4 if backbone != 'mobile' else 2)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match=r"--model 'deeplab': unknown.*deeplabv3, psp, upernet, .*segformer"):
        get_segmentation_model('deeplab', 'resnet18', 19, True)
    with pytest.raises(UserError, match=r"--backbone 'resnet34' does not fit.*resnet18, resnet50, resnet101, "
                                        r"resnet18_vanilla, resnet34_vanilla"):
        get_segmentation_model('psp', 'resnet34', 19, True)
    with pytest.raises(UserError, match=r"'resnet18'.*deeplabv3_mobile.*mobile"):
        get_segmentation_model('deeplabv3_mobile', 'resnet18', 19, False)


# ---------------------------------------------------------------- whole-network checkpoints

def test_module_prefixed_round_trip_gives_identical_outputs(tmp_path, hwd_log):
    x = torch.randn(*SMALL_INPUT)
    for model, backbone in (('deeplabv3', 'resnet18'), ('psp_mobile', 'mobile')):
        src = get_segmentation_model(model, backbone, 19, aux=True)
        # non-trivial BN statistics, so that the running buffers are checked too
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        path = tmp_path / ('%s_%s.pth' % (model, backbone))
        torch.save({'module.' + k: v for k, v in src.state_dict().items()}, path)
        dst = get_segmentation_model(model, backbone, 19, aux=True, pretrained=str(path))
        for a, b in zip(run(src, x), run(dst, x), strict=True):
            assert torch.equal(a, b)
    assert str(path) in hwd_log.text


def test_read_state_dict_accepts_wrapped_state_dicts(tmp_path):
    state = {'a.weight': torch.ones(2), 'module.b.bias': torch.zeros(1)}
    for wrapper in ('state_dict', 'model'):
        path = tmp_path / (wrapper + '.pth')
        torch.save({wrapper: state, 'iteration': 7}, path)
        assert set(read_state_dict(path)) == {'a.weight', 'b.bias'}


def test_checkpoint_of_another_num_class_is_refused(tmp_path):
    path = tmp_path / 'ade_model.pth'
    torch.save(build_segmentation_model('deeplabv3', 'resnet18', 150, aux=True).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        get_segmentation_model('deeplabv3', 'resnet18', 19, aux=True, pretrained=str(path))
    message = str(info.value)
    for part in (str(path), 'model=deeplabv3', 'backbone=resnet18', 'num_class=19',
                 '4 wrongly shaped keys', 'head.block.4.weight [150, 128, 1, 1] vs [19, 128, 1, 1]',
                 'auxlayer.block.4.bias', 'this file is a deeplabv3/resnet18 network for 150 classes',
                 'pick the --dataset it was trained on'):
        assert part in message


def test_checkpoint_of_another_network_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / 'psp.pth'
    torch.save(build_segmentation_model('psp', 'resnet18', 19, aux=False).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        get_segmentation_model('deeplabv3', 'resnet18', 19, aux=True, pretrained=str(path))
    message = str(info.value)
    assert re.search(r'\d+ missing keys: head\.aspp\.b0\.0\.weight', message)
    assert re.search(r'\d+ unexpected keys: head\.psp\.conv1\.0\.weight', message)
    assert str(path) in message and 'model=deeplabv3' in message
    # What the file holds comes first, before the key lists.
    said = message.index('this file is a psp/resnet18 network for 19 classes; pass --model psp --backbone resnet18')
    assert said < message.index('missing keys')


@pytest.mark.parametrize('model,backbone,num_class,aux', [('psp_mobile', 'mobile', 19, False),
                                                          ('deeplabv3', 'resnet101', 150, True),
                                                          ('psp', 'resnet50', 21, False)])
def test_identify_network_names_the_file_network(model, backbone, num_class, aux):
    state = build_segmentation_model(model, backbone, num_class, aux=aux).state_dict()
    assert identify_network(state) == (model, backbone, num_class)
    # Files from old PyTorch versions lack the BN counters; the network is still recognised.
    state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    assert identify_network(state) == (model, backbone, num_class)
    del state[next(iter(state))]  # not a network of the zoo any more
    assert identify_network(state) is None


class WritesMarker:
    """Unpickling this would create the marker file, if the loader allowed it to run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'conv1.weight': torch.zeros(1), 'payload': WritesMarker(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match='could run code'):
        get_segmentation_model('deeplabv3', 'resnet18', 19, True, pretrained=str(path))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        get_segmentation_model('deeplabv3', 'resnet18', 19, True, pretrained_base=str(path))
    assert not marker.exists()


def test_non_checkpoints_are_refused(tmp_path):
    noise = tmp_path / 'noise.pth'
    noise.write_bytes(os.urandom(4096))
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint\n')
    for path in (noise, text):
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            read_state_dict(path)
    with pytest.raises(CheckpointError, match='does not exist'):
        get_segmentation_model('psp', 'resnet18', 19, True, pretrained=str(tmp_path / 'missing.pth'))
    with pytest.raises(CheckpointError, match='directory'):
        read_state_dict(tmp_path)
    numbers = tmp_path / 'numbers.pth'
    torch.save({'lr': 0.01, 'epoch': 3}, numbers)
    with pytest.raises(CheckpointError, match='not a state dict'):
        read_state_dict(numbers)


def test_none_means_no_file():
    net = get_segmentation_model('psp_mobile', 'mobile', 19, False, pretrained='None', pretrained_base=None)
    assert isinstance(net, nn.Module)


# ---------------------------------------------------------------- backbone checkpoints

def imagenet_file(tmp_path, backbone, drop=0.0, drop_counters=False):
    """A backbone file as released: backbone keys without prefix, plus the classifier's keys."""
    source = build_segmentation_model('deeplabv3' if backbone != 'mobile' else 'deeplabv3_mobile',
                                      backbone, 19, aux=False)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in source.pretrained.checkpoint_root.state_dict().items()}
    if drop_counters:
        state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    if drop:
        weights = [k for k in state if not k.endswith('num_batches_tracked')]
        for k in weights[:int(drop * len(weights)) + 1]:
            del state[k]
    if backbone == 'mobile':
        state.update({'features.18.0.weight': torch.zeros(1280, 320, 1, 1),
                      'classifier.1.weight': torch.zeros(1000, 1280), 'classifier.1.bias': torch.zeros(1000)})
    else:
        state.update({'fc.weight': torch.zeros(1000, 512), 'fc.bias': torch.zeros(1000)})
    path = tmp_path / ('%s-imagenet.pth' % backbone)
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize('backbone,model', [('resnet18', 'deeplabv3'), ('mobile', 'psp_mobile')])
def test_backbone_file_with_classifier_keys_loads_and_logs(tmp_path, hwd_log, backbone, model):
    path, state = imagenet_file(tmp_path, backbone, drop_counters=(backbone == 'mobile'))
    net = get_segmentation_model(model, backbone, 19, aux=True, pretrained_base=str(path))
    loaded = net.pretrained.checkpoint_root.state_dict()
    counted = [k for k in loaded if not k.endswith('num_batches_tracked')]
    for k in counted:
        assert torch.equal(loaded[k], state[k]), k
    assert 'loaded %d of %d backbone tensors from %s' % (len(counted), len(counted), path) in hwd_log.text
    assert 'ignored' not in hwd_log.text  # the classifier keys are skipped silently


def test_whole_network_file_serves_as_backbone_file(tmp_path, hwd_log):
    src = build_segmentation_model('psp_mobile', 'mobile', 19, aux=False)
    path = tmp_path / 'psp_mobile.pth'
    torch.save(src.state_dict(), path)
    net = get_segmentation_model('deeplabv3_mobile', 'mobile', 21, aux=False, pretrained_base=str(path))
    for k, v in net.pretrained.state_dict().items():
        assert torch.equal(v, src.pretrained.state_dict()[k]), k
    assert 'loaded' in hwd_log.text and str(path) in hwd_log.text


def test_backbone_file_missing_many_tensors_is_refused(tmp_path):
    path, _ = imagenet_file(tmp_path, 'resnet18', drop=0.15)
    with pytest.raises(CheckpointError, match=r'%s holds only \d+ of the \d+ tensors.*90%%'
                       % re.escape(str(path))):
        get_segmentation_model('deeplabv3', 'resnet18', 19, True, pretrained_base=str(path))


def test_backbone_file_of_another_backbone_is_refused(tmp_path):
    path, _ = imagenet_file(tmp_path, 'resnet18')
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        get_segmentation_model('deeplabv3', 'resnet50', 19, True, pretrained_base=str(path))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        get_segmentation_model('deeplabv3_mobile', 'mobile', 19, True, pretrained_base=str(path))


# ---------------------------------------------------------------- FLOPs and parameters

def test_flops_of_small_convolutions_by_hand():
    # 8 filters of 3x3x3 over a 16x16 output: 8*3*9 * 16*16 multiply-adds
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (1, 3, 16, 16)) == 8 * 27 * 256
    assert count_params(conv) == 8 * 27 + 8
    # stride 2 halves each side; a batch of 2 doubles the work
    assert count_flops(nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 16, 16)) == 2 * 8 * 27 * 64
    # dilation does not add work: the output stays 10x10
    assert count_flops(nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), (1, 4, 10, 10)) == 4 * 36 * 100
    # depthwise: each of the 6 channels sees only itself
    assert count_flops(nn.Conv2d(6, 6, 3, padding=1, groups=6), (1, 6, 8, 8)) == 6 * 9 * 64
    text = format_complexity(nn.Sequential(nn.Conv2d(3, 1000, 1), nn.ReLU()), (1, 3, 1000, 1000))
    assert text == 'Params: 0.00M FLOPs: 3.00G'


def test_flops_of_a_network_leave_it_unchanged():
    net = build_segmentation_model('psp_mobile', 'mobile', 19, aux=False).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert re.fullmatch(r'Params: \d+\.\d\dM FLOPs: \d+\.\d\dG', format_complexity(net, SMALL_INPUT))
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert v.device.type == 'cpu' and torch.equal(v, before[k])
    # published parameter count of DeepLabV3-MobileNetV2: 3.2M
    assert round(count_params(build_segmentation_model('deeplabv3_mobile', 'mobile', 19, False)) / 1e6, 1) == 3.2
