"""MobileNetV3 (small, large) and sssegmentation's MobileNetV2 in CIRKDv2's layout (models/mobilenet.py):
keys, shapes and parameter counts, the forward against the restatement of tests/reference/mobilenet.py, the
"same" padding and the dilation placement, the ImageNet layouts, the normalisation layer."""
import functools
import logging
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import CheckpointError, get_segmentation_model
from models import mobilenet as mbn
from models.backbones import resnet18_v1s
from models.model_zoo import build_segmentation_model
from tests.reference import mobilenet as ref

pytestmark = pytest.mark.usefixtures('one_thread')

NUM_CLASS = 19
BACKBONE_CHANNELS = {'mobilenetv3_small': 576, 'mobilenetv3_large': 960, 'mobilenetv2_ssseg': 320}
# The parameter counts of CIRKDv2's networks (winycg/CIRKD), 19 classes.
PARAMETER_COUNTS = {
    ('deeplabv3_mobilenet_ssseg', 'mobilenetv3_small'): 3_298_739,
    ('deeplabv3_mobilenet_ssseg', 'mobilenetv3_large'): 6_769_091,
    ('deeplabv3_mobilenet_ssseg', 'mobilenetv2_ssseg'): 3_233_171,
    ('psp_mobile', 'mobilenetv3_small'): 2_589_747,
    ('psp_mobile', 'mobilenetv3_large'): 6_110_019,
}


def backbone_shapes(backbone):
    if backbone == 'mobilenetv2_ssseg':
        return ref.ssseg_mobilenetv2_shapes()
    return ref.mobilenetv3_shapes(backbone.rsplit('_', 1)[1])


def _conv_bn_relu_shapes(prefix, out_ch, in_ch, kernel):
    return [(prefix + '.0.weight', (out_ch, in_ch, kernel, kernel))] + ref._bn_shapes(prefix + '.1', out_ch)


def head_shapes(model, in_ch, num_class, width=128):
    """CIRKD's mobile heads (its models/deeplabv3_mobilenetv3.py and psp_mobile.py): keys and shapes in order."""
    if model == 'psp_mobile':
        shapes = []
        for i in range(1, 5):
            shapes += _conv_bn_relu_shapes('head.psp.conv%d' % i, in_ch // 4, in_ch, 1)
        shapes += _conv_bn_relu_shapes('head.block', width, 2 * in_ch, 3)
        return shapes + [('head.classifier.weight', (num_class, width, 1, 1)), ('head.classifier.bias', (num_class,))]
    shapes = _conv_bn_relu_shapes('head.aspp.b0', width, in_ch, 1)
    for i in range(1, 4):
        shapes += _conv_bn_relu_shapes('head.aspp.b%d.block' % i, width, in_ch, 3)
    shapes += [('head.aspp.b4.gap.1.weight', (width, in_ch, 1, 1))] + ref._bn_shapes('head.aspp.b4.gap.2', width)
    shapes += _conv_bn_relu_shapes('head.aspp.project', width, 5 * width, 1)
    shapes += _conv_bn_relu_shapes('head.block', width, width, 3)
    return shapes + [('head.block.4.weight', (num_class, width, 1, 1)), ('head.block.4.bias', (num_class,))]


def meta_network(model, backbone, norm_layer=nn.BatchNorm2d):
    with torch.device('meta'):
        return build_segmentation_model(model, backbone, NUM_CLASS, False, norm_layer)


def randomize(module, seed=0):
    """Random weights of a sane scale, BN with non-trivial running statistics; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    current = module.state_dict()
    state = {}
    for key, value in current.items():
        if key.endswith('num_batches_tracked'):
            state[key] = value
            continue
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
        if key.endswith('running_var'):
            state[key] = 0.5 + torch.rand(value.shape, generator=gen, dtype=torch.float64)
        elif key.endswith('running_mean'):
            state[key] = 0.2 * noise
        elif value.dim() == 4:
            state[key] = noise / value[0].numel() ** 0.5
        elif key.endswith('bn.weight') or re.search(r'\.1\.weight$', key):
            state[key] = 1 + 0.2 * noise
        else:
            state[key] = 0.1 * noise
    module.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()})
    return module.eval()


def local_state(net, prefix='pretrained.'):
    return {k[len(prefix):]: v for k, v in net.state_dict().items() if k.startswith(prefix)}


# ---------------------------------------------------------------- layout, parameter counts, spec

@pytest.mark.parametrize('model,backbone', sorted(PARAMETER_COUNTS))
def test_keys_shapes_parameter_counts_and_spec(model, backbone):
    net = meta_network(model, backbone)
    built = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    expected = [('pretrained.' + k, shape) for k, shape in backbone_shapes(backbone).items()]
    expected += head_shapes(model, BACKBONE_CHANNELS[backbone], NUM_CLASS)
    assert built == expected
    assert sum(p.numel() for p in net.parameters()) == PARAMETER_COUNTS[model, backbone]
    spec = net.spec()
    assert (spec.output_stride, spec.feature_channels, spec.stage_channels, spec.stage_strides, spec.has_aux) == (
        8, 128, (BACKBONE_CHANNELS[backbone],), (8,), False)


def test_backbone_key_counts():
    assert len(mbn.mobilenetv3_small().state_dict()) == 240
    with torch.device('meta'):
        assert len(mbn.mobilenetv3_large().state_dict()) == 308
        assert len(mbn.mobilenetv2_ssseg().state_dict()) == len(ref.ssseg_mobilenetv2_shapes()) == 306


def test_se_width_rule():
    # 72 / 4 = 18 rounds to 16, which loses more than 10%: 24 (large layer4); the others round plainly.
    assert [mbn.make_divisible(c // 4, 8) for c in (16, 72, 96, 120, 144, 240, 288, 576, 960)] == [
        8, 24, 24, 32, 40, 64, 72, 144, 240]


# ---------------------------------------------------------------- padding and dilation placement

@pytest.mark.parametrize('size,kernel,stride,dilation,pads', [
    (64, 3, 2, 1, (0, 1)), (65, 3, 2, 1, (1, 1)), (99, 3, 2, 1, (1, 1)), (16, 5, 2, 1, (1, 2)),
    (17, 5, 2, 1, (2, 2)), (9, 5, 1, 2, (4, 4)), (9, 3, 1, 4, (4, 4)),
])
def test_same_padding_by_hand(size, kernel, stride, dilation, pads):
    assert mbn.same_padding(size, kernel, stride, dilation) == pads


@pytest.mark.parametrize('height,width,pads', [(64, 64, (0, 1, 0, 1)), (65, 99, (1, 1, 1, 1)), (64, 99, (1, 1, 0, 1))])
def test_stride2_conv_pads_same_from_the_input_size(height, width, pads):
    torch.manual_seed(0)
    stem = mbn.mobilenetv3_small().layer0.conv
    assert stem.padding == (0, 0) and stem.stride == (2, 2)
    x = torch.randn(1, 3, height, width)
    out = stem(x)
    by_hand = F.conv2d(F.pad(x, pads), stem.weight, stride=2)  # (left, right, top, bottom)
    assert out.shape[2:] == (-(-height // 2), -(-width // 2))
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    if height % 2 == 0:  # the extra pixel is at the bottom: PyTorch's symmetric padding 1 differs
        assert not torch.allclose(out, F.conv2d(x, stem.weight, stride=2, padding=1))


@pytest.mark.parametrize('arch', ['small', 'large'])
def test_mobilenetv3_dilation_placement(arch):
    with torch.device('meta'):
        net = mbn.MobileNetV3(arch)
    blocks, _ = ref.MOBILENETV3[arch]
    for index, (kernel, *_, stride, dilation, residual, same) in enumerate(blocks, start=1):
        block = getattr(net, 'layer%d' % index)
        dw = block.depthwise_conv.conv
        assert (dw.kernel_size, dw.stride, dw.dilation) == ((kernel,) * 2, (stride,) * 2, (dilation,) * 2), index
        assert isinstance(dw, mbn.SamePaddingConv2d) == same, index
        assert dw.padding == ((0, 0) if same else ((kernel - 1) // 2 * dilation,) * 2), index
        assert block.residual == residual, index


def test_ssseg_mobilenetv2_dilates_only_the_first_block_of_a_stage():
    with torch.device('meta'):
        net = mbn.mobilenetv2_ssseg()
    assert net.conv1.conv.stride == (2, 2) and net.conv1.conv.padding == (1, 1)
    for layer, block, in_ch, expansion, out, stride, dilation in ref.SSSEG_MOBILENETV2:
        module = getattr(net, 'layer%d' % layer)[block]
        dw = module.conv[0 if expansion == 1 else 1].conv
        assert (dw.stride, dw.dilation, dw.padding) == ((stride,) * 2, (dilation,) * 2, (dilation,) * 2), (layer, block)
        assert dw.groups == in_ch * expansion
        assert module.residual == (stride == 1 and in_ch == out), (layer, block)
    # the first block of layer4 and layer6 is dilated, the second is not
    assert net.layer4[0].conv[1].conv.dilation == (2, 2) and net.layer4[1].conv[1].conv.dilation == (1, 1)
    assert net.layer6[0].conv[1].conv.dilation == (4, 4) and net.layer6[1].conv[1].conv.dilation == (1, 1)


# ---------------------------------------------------------------- forward against the restatement

@pytest.mark.parametrize('backbone', ['mobilenetv3_small', 'mobilenetv3_large', 'mobilenetv2_ssseg'])
@pytest.mark.parametrize('size', [(64, 64), (65, 99)])
def test_backbone_forward_matches_reference(backbone, size):
    net = randomize(getattr(mbn, backbone)(), seed=1)
    forward = (ref.ssseg_mobilenetv2_forward if backbone == 'mobilenetv2_ssseg'
               else functools.partial(ref.mobilenetv3_forward, arch=backbone.rsplit('_', 1)[1]))
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = forward({k: v.double() for k, v in net.state_dict().items()}, x)
    assert expected.shape == (1, BACKBONE_CHANNELS[backbone], -(-size[0] // 8), -(-size[1] // 8))
    assert expected.abs().max() > 0.1 and expected.std() > 0.01  # not a degenerate (all-zero) comparison
    with torch.no_grad():
        out32 = net(x.float())
        out64 = net.double()(x)
    assert len(out32) == 1
    torch.testing.assert_close(out64[0], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(out32[0].double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_whole_psp_network_matches_reference_on_an_odd_size():
    net = randomize(build_segmentation_model('psp_mobile', 'mobilenetv3_small', NUM_CLASS, False), seed=3).double()
    x = torch.randn(1, 3, 65, 99, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    state = net.state_dict()
    stage = ref.mobilenetv3_forward(local_state(net), x, 'small')
    logits, features = ref.psp_head_forward(state, stage)
    with torch.no_grad():
        out = net(x, return_stages=True)
    assert out.logits.shape == (1, NUM_CLASS, 9, 13) and out.features.shape == (1, 128, 9, 13)
    torch.testing.assert_close(out.stages[0], stage, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.features, features, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- ImageNet layouts

@pytest.fixture
def info_log(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def random_tensors(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(shape, generator=gen) if shape else torch.tensor(7))
                       for k, shape in shapes.items())


def assert_loaded(net, state, names, path, layout, log):
    """Every backbone tensor holds the file tensor `names` maps to it, and the log names the layout."""
    loaded = net.pretrained.state_dict()
    counted = [k for k in loaded if not k.endswith('num_batches_tracked')]
    assert sorted(names.values()) == sorted(k for k in loaded if k in names.values())
    assert set(counted) <= set(names.values())
    for file_key, key in names.items():
        assert torch.equal(loaded[key], state[file_key]), (file_key, key)
    assert 'loaded %d of %d backbone tensors from %s (layout: %s' % (len(counted), len(counted), path, layout) in log
    assert 'ignored' not in log and 'lacks' not in log


@pytest.mark.parametrize('wrapped', [False, True])
def test_openmmlab_mobilenetv3_file(tmp_path, info_log, wrapped):
    shapes = ref.mobilenetv3_shapes('small')
    local = random_tensors(shapes, seed=5)
    if wrapped:  # an OpenMMLab training checkpoint: keys under `backbone.`, the classifier under `head.`
        state = {'backbone.' + k: v for k, v in local.items() if not k.endswith('num_batches_tracked')}
        state.update({'head.layers.0.fc.weight': torch.randn(1024, 576),
                      'head.layers.1.fc.weight': torch.randn(1000, 1024)})
        names = {'backbone.' + k: k for k in local if not k.endswith('num_batches_tracked')}
        saved = {'state_dict': state, 'meta': {'epoch': 1}}
    else:
        state = dict(local, **{'classifier.0.weight': torch.randn(1024, 576), 'classifier.3.bias': torch.randn(1000)})
        names = {k: k for k in local}
        saved = state
    path = tmp_path / 'mobilenet_v3_small-47085aa1.pth'
    torch.save(saved, path)
    net = get_segmentation_model('deeplabv3_mobilenet_ssseg', 'mobilenetv3_small', NUM_CLASS, False,
                                 pretrained_base=str(path))
    assert_loaded(net, state, names, path, 'OpenMMLab MobileNetV3', info_log.text)


def torchvision_mobilenetv3_name(key, arch):
    """The CIRKD name of a key of torchvision's mobilenet_v3_{arch}, from the structure of both networks."""
    blocks, _ = ref.MOBILENETV3[arch]
    parts = key.split('.')
    index, leaf = int(parts[1]), parts[-1]
    if index == 0 or index == len(blocks) + 1:  # features.i.{0: conv, 1: bn}
        return 'layer%d.%s.%s' % (index, {'0': 'conv', '1': 'bn'}[parts[2]], leaf)
    in_ch = 16 if index == 1 else blocks[index - 2][2]
    _, mid, _, se, *_ = blocks[index - 1]
    stages = ['expand_conv'] * (mid != in_ch) + ['depthwise_conv'] + ['se'] * se + ['linear_conv']
    stage = stages[int(parts[3])]  # features.i.block.j....
    inner = {'fc1': 'conv1.conv', 'fc2': 'conv2.conv'} if stage == 'se' else {'0': 'conv', '1': 'bn'}
    return 'layer%d.%s.%s.%s' % (index, stage, inner[parts[4]], leaf)


@pytest.mark.parametrize('arch', ['small', 'large'])
def test_torchvision_mobilenetv3_file(tmp_path, info_log, arch):
    torchvision = pytest.importorskip('torchvision')
    with torch.device('meta'):
        layout = getattr(torchvision.models, 'mobilenet_v3_%s' % arch)(weights=None).state_dict()
    state = random_tensors(OrderedDict((k, tuple(v.shape)) for k, v in layout.items()), seed=6)
    assert any(k.startswith('classifier.') for k in state)
    path = tmp_path / ('mobilenet_v3_%s-torchvision.pth' % arch)
    torch.save(state, path)
    net = get_segmentation_model('psp_mobile', 'mobilenetv3_' + arch, NUM_CLASS, False, pretrained_base=str(path))
    names = {k: torchvision_mobilenetv3_name(k, arch) for k in state if k.startswith('features.')}
    assert_loaded(net, state, names, path, 'torchvision MobileNetV3', info_log.text)


def torchvision_mobilenetv2_name(key):
    """The sssegmentation name of a key of torchvision's mobilenet_v2 (features.0..17)."""
    parts = key.split('.')
    index, leaf = int(parts[1]), parts[-1]
    if index == 0:
        return 'conv1.%s.%s' % ({'0': 'conv', '1': 'bn'}[parts[2]], leaf)
    layer, block, _, expansion, *_ = ref.SSSEG_MOBILENETV2[index - 1]
    # torchvision: conv-bn-relu6 Sequentials first, then the bare projection conv and its BN
    position = int(parts[3])
    last = 1 if expansion == 1 else 2
    if position < last:
        inner = '%d.%s' % (position, {'0': 'conv', '1': 'bn'}[parts[4]])
    else:
        inner = '%d.%s' % (last, 'conv' if position == last else 'bn')
    return 'layer%d.%d.conv.%s.%s' % (layer, block, inner, leaf)


def test_torchvision_mobilenetv2_file_for_ssseg(tmp_path, info_log):
    torchvision = pytest.importorskip('torchvision')
    with torch.device('meta'):
        layout = torchvision.models.mobilenet_v2(weights=None).state_dict()
    state = random_tensors(OrderedDict((k, tuple(v.shape)) for k, v in layout.items()), seed=7)
    assert 'features.18.0.weight' in state and 'classifier.1.weight' in state
    path = tmp_path / 'mobilenet_v2-b0353104.pth'
    torch.save(state, path)
    net = get_segmentation_model('deeplabv3_mobilenet_ssseg', 'mobilenetv2_ssseg', NUM_CLASS, False,
                                 pretrained_base=str(path))
    names = {k: torchvision_mobilenetv2_name(k) for k in state
             if k.startswith('features.') and not k.startswith('features.18.')}
    assert_loaded(net, state, names, path, 'torchvision MobileNetV2', info_log.text)


def test_openmmlab_mobilenetv2_file_for_ssseg(tmp_path, info_log):
    local = random_tensors(ref.ssseg_mobilenetv2_shapes(), seed=8)
    state = {'backbone.' + k: v for k, v in local.items()}
    state.update({'backbone.conv2.conv.weight': torch.randn(1280, 320, 1, 1), 'backbone.conv2.bn.weight':
                  torch.randn(1280), 'head.fc.weight': torch.randn(1000, 1280), 'head.fc.bias': torch.randn(1000)})
    path = tmp_path / 'mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth'
    torch.save({'state_dict': state}, path)
    net = get_segmentation_model('deeplabv3_mobilenet_ssseg', 'mobilenetv2_ssseg', NUM_CLASS, False,
                                 pretrained_base=str(path))
    assert_loaded(net, state, {'backbone.' + k: k for k in local}, path, 'OpenMMLab MobileNetV2', info_log.text)


def test_files_of_other_backbones_are_refused(tmp_path):
    with torch.device('meta'):
        resnet_shapes = {k: tuple(v.shape) for k, v in resnet18_v1s().state_dict().items()}
    resnet = {k: torch.zeros(shape) for k, shape in resnet_shapes.items()}
    resnet.update({'fc.weight': torch.zeros(1000, 512), 'fc.bias': torch.zeros(1000)})
    resnet_path = tmp_path / 'resnet18-imagenet.pth'
    torch.save(resnet, resnet_path)
    large_path = tmp_path / 'mobilenet_v3_large-bc2c3fd3.pth'
    torch.save(random_tensors(ref.mobilenetv3_shapes('large'), seed=9), large_path)
    cases = [(resnet_path, backbone) for backbone in BACKBONE_CHANNELS] + [(large_path, 'mobilenetv3_small')]
    for path, backbone in cases:
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            get_segmentation_model('deeplabv3_mobilenet_ssseg', backbone, NUM_CLASS, False, pretrained_base=str(path))


# ---------------------------------------------------------------- normalisation layer from the caller

@pytest.mark.parametrize('backbone', sorted(BACKBONE_CHANNELS))
def test_norm_layer_comes_from_the_caller(backbone):
    model = 'deeplabv3_mobilenet_ssseg'
    default = meta_network(model, backbone)
    bn_names = [n for n, m in default.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_names) == len([k for k in default.state_dict() if k.endswith('running_var')])
    eps_net = meta_network(model, backbone, functools.partial(nn.BatchNorm2d, eps=1e-3))
    assert [(n, m.eps) for n, m in eps_net.named_modules() if isinstance(m, nn.BatchNorm2d)] == [
        (n, 1e-3) for n in bn_names]
    sync_net = meta_network(model, backbone, nn.SyncBatchNorm)
    norms = [(n, type(m)) for n, m in sync_net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms == [(n, nn.SyncBatchNorm) for n in bn_names]
    assert all(m.eps == 1e-5 for m in default.modules() if isinstance(m, nn.BatchNorm2d))
