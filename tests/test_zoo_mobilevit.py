"""MobileViT backbones (models/mobilevit.py): CIRKDv2's key layout and parameter counts, the forward against a
functional restatement (tests/reference/mobilevit.py), the ImageNet file layouts, the caller's norm layer."""
import functools
import logging

import pytest
import torch
import torch.nn as nn

from models.checkpoint import CheckpointError
from models.model_zoo import build_segmentation_model, get_segmentation_model
from tests.reference import mobilevit as ref

pytestmark = pytest.mark.usefixtures('one_thread')

ARCHS = ('xx_small', 'x_small', 'small')
# Parameter counts of the whole networks for 19 classes (CIRKDv2's).
PARAMS = {
    ('psp_mobile', 'xx_small'): 1_794_051, ('psp_mobile', 'x_small'): 2_968_515, ('psp_mobile', 'small'): 6_825_779,
    ('deeplab_mobile', 'xx_small'): 2_372_483, ('deeplab_mobile', 'x_small'): 3_591_875,
    ('deeplab_mobile', 'small'): 7_546_931,
}
OUT_CHANNELS = {'xx_small': 320, 'x_small': 384, 'small': 640}


def meta_network(model, arch, norm_layer=nn.BatchNorm2d):
    with torch.device('meta'):
        return build_segmentation_model(model, 'mobilevit_' + arch, 19, False, norm_layer)


@pytest.mark.parametrize('model,arch', sorted(PARAMS))
def test_keys_shapes_parameter_counts_and_spec(model, arch):
    net = meta_network(model, arch)
    assert sum(p.numel() for p in net.parameters()) == PARAMS[model, arch]
    backbone = [(k[len('pretrained.'):], tuple(v.shape)) for k, v in net.state_dict().items()
                if k.startswith('pretrained.')]
    assert backbone == ref.expected_backbone_layout(arch)
    assert all(k.startswith(('pretrained.', 'head.')) for k in net.state_dict())
    spec = net.spec()
    assert (spec.output_stride, spec.feature_channels) == (8, 128)
    assert (spec.stage_channels, spec.stage_strides, spec.has_aux) == ((OUT_CHANNELS[arch],), (8,), False)


def test_dilation_only_on_the_depthwise_conv_of_stages_3_and_4():
    net = meta_network('psp_mobile', 'small')
    dilated = {name: m.dilation for name, m in net.pretrained.named_modules()
               if isinstance(m, nn.Conv2d) and m.dilation != (1, 1)}
    assert dilated == {'layers.3.0.conv.1.conv': (2, 2), 'layers.4.0.conv.1.conv': (4, 4)}
    strided = {name for name, m in net.pretrained.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)}
    assert strided == {'stem.conv', 'layers.1.0.conv.1.conv', 'layers.2.0.conv.1.conv'}
    for name, m in net.pretrained.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.padding == tuple(d * (k // 2) for d, k in zip(m.dilation, m.kernel_size, strict=True)), name


def randomize(net, seed=0):
    """Random weights, BN running statistics and attention biases, at scales that keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith('num_batches_tracked'):
            state[key] = value
        elif key.endswith(('running_var', 'weight')) and value.dim() == 1:
            state[key] = torch.rand(value.shape, generator=gen, dtype=torch.float64) + 0.5
        elif value.dim() == 1:
            state[key] = torch.randn(value.shape, generator=gen, dtype=torch.float64) * 0.2
        else:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen, dtype=torch.float64) / fan_in ** 0.5
    net.load_state_dict(state)
    return state


@pytest.fixture(scope='module')
def xx_small_psp():
    torch.manual_seed(0)
    net = build_segmentation_model('psp_mobile', 'mobilevit_xx_small', 19, False)
    state = randomize(net.double())
    return net.eval(), state


@pytest.mark.parametrize('size', [(64, 64), (66, 90)])
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_forward_matches_reference(xx_small_psp, size, dtype, tol):
    net, state = xx_small_psp
    net = net.to(dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype) * 2
    expected_stage = ref.mobilevit_backbone(state, x, 'xx_small', prefix='pretrained.')
    expected_logits, expected_feature = ref.psp_head(state, expected_stage)
    # At /8 the 66x90 input is 9x12: every MobileViT block resizes its odd height to 10 and back.
    assert expected_stage.shape == (1, 320, -(-size[0] // 8), -(-size[1] // 8))
    with torch.no_grad():
        out = net(x, return_stages=True)
    # With autograd recording, nn.MultiheadAttention takes its general path instead of the inference one.
    graded = net(x.requires_grad_(), return_stages=True)
    for got in (out, graded):
        for name, value, expected in (('stage', got.stages[0], expected_stage), ('logits', got.logits, expected_logits),
                                      ('feature', got.features, expected_feature)):
            scale = expected.abs().max()
            assert scale > 1e-3, name
            error = (value.detach() - expected).abs().max() / scale
            assert error < tol, (name, float(error))
    assert out.logits.shape == (1, 19) + expected_stage.shape[2:]


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    net = build_segmentation_model('deeplab_mobile', 'mobilevit_xx_small', 19, False).train()
    out = net(torch.randn(2, 3, 34, 42))
    assert out.logits.shape == (2, 19, 5, 6)
    (out.logits.square().mean() + out.features.mean()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(p.grad.abs().sum() > 0 for name, p in net.named_parameters() if name.startswith('pretrained.'))


def mmpretrain_name(key):
    return key.replace('attn.attn.in_proj_', 'attn.qkv.').replace('attn.attn.out_proj.', 'attn.proj.')


def fabricated_backbone(arch, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in ref.expected_backbone_layout(arch):
        if key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(seed + 7)
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


def write_mmpretrain_file(path, arch, seed=3):
    """mmpretrain's layout: {'meta', 'state_dict': backbone.<key> with qkv/proj attention, head.fc.*}."""
    backbone = fabricated_backbone(arch, seed)
    state = {'backbone.' + mmpretrain_name(k): v for k, v in backbone.items()}
    state['head.fc.weight'] = torch.randn(1000, OUT_CHANNELS[arch])
    state['head.fc.bias'] = torch.randn(1000)
    torch.save({'meta': {'mmcls_version': '1.0.0rc2', 'epoch': 300}, 'state_dict': state}, path)
    return backbone


def assert_loaded(net, backbone):
    loaded = net.pretrained.state_dict()
    assert list(loaded) == list(backbone)
    for key, value in backbone.items():
        assert torch.equal(loaded[key], value), key


def test_mmpretrain_imagenet_file_loads_every_tensor(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / 'mobilevit-xxsmall_3rdparty_in1k_20221018-77835605.pth'
    backbone = write_mmpretrain_file(path, 'xx_small')
    assert sum('.attn.qkv.' in mmpretrain_name(k) for k in backbone) == 2 * (2 + 4 + 3)
    net = get_segmentation_model('psp_mobile', 'mobilevit_xx_small', 19, False, pretrained_base=str(path))
    assert_loaded(net, backbone)
    counted = sum(not k.endswith('num_batches_tracked') for k in backbone)
    assert f'loaded {counted} of {counted} backbone tensors from {path} (layout: mmpretrain MobileViT)' in caplog.text
    assert 'ignored' not in caplog.text and 'lacks' not in caplog.text


def test_cirkd_names_load_too(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    backbone = fabricated_backbone('xx_small', seed=5)
    # The backbone part of a CIRKDv2 whole-network file, with its head keys around it.
    state = {'pretrained.' + k: v for k, v in backbone.items()}
    state['head.classifier.weight'] = torch.randn(19, 128, 1, 1)
    path = tmp_path / 'cirkd_backbone.pth'
    torch.save(state, path)
    net = get_segmentation_model('deeplab_mobile', 'mobilevit_xx_small', 19, False, pretrained_base=str(path))
    assert_loaded(net, backbone)
    assert '(layout: CIRKD MobileViT)' in caplog.text


def test_file_of_another_backbone_is_refused(tmp_path):
    other_arch = tmp_path / 'mobilevit-xsmall.pth'
    write_mmpretrain_file(other_arch, 'x_small')
    with pytest.raises(CheckpointError, match='wrongly shaped'):
        get_segmentation_model('psp_mobile', 'mobilevit_xx_small', 19, False, pretrained_base=str(other_arch))
    resnet = tmp_path / 'resnet18-imagenet.pth'
    torch.save({'conv1.weight': torch.randn(64, 3, 3, 3), 'bn1.weight': torch.ones(64),
                'layer1.0.conv1.weight': torch.randn(64, 64, 3, 3), 'fc.weight': torch.randn(1000, 512)}, resnet)
    with pytest.raises(CheckpointError, match='holds only 0 of the'):
        get_segmentation_model('psp_mobile', 'mobilevit_xx_small', 19, False, pretrained_base=str(resnet))


@pytest.mark.parametrize('norm_layer', [functools.partial(nn.BatchNorm2d, eps=1e-3), nn.SyncBatchNorm])
def test_norm_layer_comes_from_the_caller(norm_layer):
    net = meta_network('psp_mobile', 'x_small', norm_layer)
    expected_class = norm_layer.func if isinstance(norm_layer, functools.partial) else norm_layer
    expected_eps = 1e-3 if isinstance(norm_layer, functools.partial) else 1e-5
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == sum(k.endswith('running_mean') for k in net.state_dict())
    assert all(type(m) is expected_class and m.eps == expected_eps for m in norms)
    backbone_norms = [m for m in net.pretrained.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(backbone_norms) == sum(k.endswith('running_mean') for k, _ in ref.expected_backbone_layout('x_small'))
    layer_norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    assert len(layer_norms) == 2 * (2 + 4 + 3) + 3 and all(m.eps == 1e-5 for m in layer_norms)
