"""SegFormer on MiT-B0 .. B5 (models/mit.py): key layouts and parameter counts, the forward against a functional
restatement (tests/reference/segformer.py), DropPath, the ImageNet file layouts and the official release."""
import copy
import functools
import logging
import math
import re

import pytest
import torch
import torch.nn as nn

from dataset.datasets import MEAN_BGR
from models import CheckpointError, get_segmentation_model
from models.mit import DropPath, SegFormer, build_segformer, convert_official_segformer
from models.model_zoo import build_segmentation_model, describe_network
from tests.reference.segformer import segformer_forward
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures('one_thread')

# CIRKDv2's SegFormers (winycg/CIRKD models/segformer.py): embed dims, depths, decoder width and parameter count
# with 19 classes.
VARIANTS = {
    'MiT_B0': ((32, 64, 160, 256), (2, 2, 2, 2), 256, 3_719_283),
    'MiT_B1': ((64, 128, 320, 512), (2, 2, 2, 2), 256, 13_682_387),
    'MiT_B2': ((64, 128, 320, 512), (3, 4, 6, 3), 768, 27_362_003),
    'MiT_B3': ((64, 128, 320, 512), (3, 4, 18, 3), 768, 47_237_843),
    'MiT_B4': ((64, 128, 320, 512), (3, 8, 27, 3), 768, 64_008_403),
    'MiT_B5': ((64, 128, 320, 512), (3, 6, 40, 3), 768, 84_608_723),
}
SR_RATIOS = (8, 4, 2, 1)
B0_DEPTHS = VARIANTS['MiT_B0'][1]
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


@pytest.fixture
def info_log(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def expected_layout(variant, num_class=19, official=False):
    """[(key, shape)] of CIRKD's SegFormer in registration order, written from the description of the network."""
    dims, depths, width, _ = VARIANTS[variant]
    layout = []

    def add(name, *shape):
        layout.append((name, tuple(shape)))

    for stage, (in_ch, dim) in enumerate(zip((3,) + dims[:-1], dims, strict=True), 1):
        kernel = 7 if stage == 1 else 3
        add(f'patch_embed{stage}.proj.weight', dim, in_ch, kernel, kernel)
        add(f'patch_embed{stage}.proj.bias', dim)
        add(f'patch_embed{stage}.norm.weight', dim)
        add(f'patch_embed{stage}.norm.bias', dim)
    for stage, (dim, depth, sr) in enumerate(zip(dims, depths, SR_RATIOS, strict=True), 1):
        for j in range(depth):
            block = f'block{stage}.{j}'
            add(f'{block}.norm1.weight', dim)
            add(f'{block}.norm1.bias', dim)
            add(f'{block}.attn.q.weight', dim, dim)
            add(f'{block}.attn.q.bias', dim)
            add(f'{block}.attn.kv.weight', 2 * dim, dim)
            add(f'{block}.attn.kv.bias', 2 * dim)
            add(f'{block}.attn.proj.weight', dim, dim)
            add(f'{block}.attn.proj.bias', dim)
            if sr > 1:
                add(f'{block}.attn.sr.weight', dim, dim, sr, sr)
                add(f'{block}.attn.sr.bias', dim)
                add(f'{block}.attn.norm.weight', dim)
                add(f'{block}.attn.norm.bias', dim)
            add(f'{block}.norm2.weight', dim)
            add(f'{block}.norm2.bias', dim)
            add(f'{block}.mlp.fc1.weight', 4 * dim, dim)
            add(f'{block}.mlp.fc1.bias', 4 * dim)
            add(f'{block}.mlp.dwconv.dwconv.weight', 4 * dim, 1, 3, 3)
            add(f'{block}.mlp.dwconv.dwconv.bias', 4 * dim)
            add(f'{block}.mlp.fc2.weight', dim, 4 * dim)
            add(f'{block}.mlp.fc2.bias', dim)
        add(f'norm{stage}.weight', dim)
        add(f'norm{stage}.bias', dim)
    for stage in (4, 3, 2, 1):
        add(f'linear_c{stage}.proj.weight', width, dims[stage - 1])
        add(f'linear_c{stage}.proj.bias', width)
    add('linear_fuse.0.weight', width, 4 * width, 1, 1)
    if not official:
        add('linear_fuse.0.bias', width)
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        add(f'linear_fuse.1.{name}', width)
    add('linear_fuse.1.num_batches_tracked')
    add('linear_pred.weight', num_class, width, 1, 1)
    add('linear_pred.bias', num_class)
    return layout


def meta_network(variant, num_class=19, **options):
    with torch.device('meta'):
        return build_segformer(variant, num_class, **options)


def randomize(net, seed=0):
    """Random weights everywhere, norm scales around 1 and BN running statistics far from (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if not value.is_floating_point():
            state[key] = value
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        if key.endswith('running_var'):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator, dtype=torch.float64)
        elif key.endswith('.weight') and value.dim() == 1:  # LayerNorm / BN scales
            state[key] = 1.0 + 0.2 * noise
        else:
            state[key] = 0.2 * noise
    net.load_state_dict(state)
    return net


@pytest.fixture(scope='module')
def random_b0():
    """A B0 network (through the model zoo, 19 classes) with random weights, in eval mode; copy it to change it."""
    return randomize(build_segmentation_model('segformer', 'MiT_B0', 19, False)).eval()


# ---------------------------------------------------------------- layouts, counts, spec

@pytest.mark.parametrize('variant', list(VARIANTS))
def test_keys_shapes_and_parameter_counts(variant):
    net = meta_network(variant)
    layout = [(key, tuple(value.shape)) for key, value in net.state_dict().items()]
    assert layout == expected_layout(variant)
    assert sum(p.numel() for p in net.parameters()) == VARIANTS[variant][3]
    assert len(net.encoder_keys()) == len(layout) - 17  # the decoder has 17 tensors
    if variant in ('MiT_B0', 'MiT_B4'):
        assert len(layout) == {'MiT_B0': 193, 'MiT_B4': 849}[variant]


def test_official_layout_lacks_only_the_fuse_bias():
    net = meta_network('MiT_B0', official=True)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == expected_layout('MiT_B0', official=True)
    assert sum(p.numel() for p in net.parameters()) == VARIANTS['MiT_B0'][3] - 256
    assert net.dropout.p == 0.1 and meta_network('MiT_B0').dropout.p == 0.0
    assert net.input_transform is not None and meta_network('MiT_B0').input_transform is None


@pytest.mark.parametrize('variant', ['MiT_B0', 'MiT_B2'])
def test_spec_states_stride_and_channels(variant):
    dims, _, width, _ = VARIANTS[variant]
    spec = describe_network('segformer', variant, 19)
    assert (spec.output_stride, spec.feature_channels, spec.stage_channels, spec.stage_strides, spec.has_aux) == (
        4, width, dims, (4, 8, 16, 32), False)
    assert spec.family == 'transformer'


def test_build_ignores_aux_and_names_bad_variants():
    with torch.device('meta'):
        net = build_segmentation_model('segformer', 'MiT_B0', 19, aux=True)
    assert isinstance(net, SegFormer) and not net.has_aux
    with pytest.raises(UserError, match='MiT_B9.*MiT_B0'):
        build_segformer('MiT_B9', 19)


def test_head_parameters_are_the_decoder():
    net = meta_network('MiT_B0')
    head = net.head_parameter_names()
    assert set(head) == {name for name, _ in net.named_parameters() if name.startswith('linear_')}
    assert len(head) == 14 and all(not name.startswith(('block', 'patch_embed', 'norm')) for name in head)


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize('size', [(64, 96), (65, 97)])
def test_output_and_stage_shapes(random_b0, size):
    net = random_b0
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size), return_stages=True)
        assert net(torch.randn(1, 3, 32, 32)).stages is None
    quarter = [-(-s // 4) for s in size]  # conv 7x7 stride 4 padding 3: ceil(s / 4)
    assert out.logits.shape == (2, 19, *quarter) and out.features.shape == (2, 256, *quarter)
    assert out.aux is None and len(out) == 2 and out[-1] is out.features
    expected = [quarter]
    for _ in range(3):  # 3x3 stride 2 padding 1: ceil(s / 2)
        expected.append([-(-s // 2) for s in expected[-1]])
    dims = VARIANTS['MiT_B0'][0]
    assert [tuple(s.shape) for s in out.stages] == [(2, c, *hw) for c, hw in zip(dims, expected, strict=True)]


@pytest.mark.parametrize('dtype,tolerance', [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize('size', [(64, 96), (65, 97)])
def test_forward_matches_functional_restatement(random_b0, dtype, tolerance, size):
    net = copy.deepcopy(random_b0).to(dtype)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        out = net(image, return_stages=True)
        logits, fused, stages = segformer_forward(net.state_dict(), image, B0_DEPTHS)
    for got, want in zip([out.logits, out.features] + out.stages, [logits, fused] + stages, strict=True):
        assert got.dtype == dtype
        scale = want.abs().max().item()
        assert scale > 0.1  # the comparison is not between near-zero maps
        assert (got - want).abs().max().item() <= tolerance * scale


def test_normalisations_activations_and_drop_path_rates():
    net = meta_network('MiT_B2')
    eps = {name: m.eps for name, m in net.named_modules() if isinstance(m, nn.LayerNorm)}
    assert all(value == 1e-5 for name, value in eps.items() if name.startswith('patch_embed') or '.attn.' in name)
    assert all(value == 1e-6 for name, value in eps.items() if not (name.startswith('patch_embed') or '.attn.' in name))
    assert sum(value == 1e-6 for value in eps.values()) == 2 * 16 + 4
    assert all(m.approximate == 'none' for m in net.modules() if isinstance(m, nn.GELU))
    rates = [block.drop_path.drop_prob for stage in range(1, 5) for block in getattr(net, f'block{stage}')]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 16).tolist(), abs=1e-12)
    assert all(not isinstance(m, nn.Dropout) for m in net.modules())


def test_initialisation_follows_nvlabs():
    torch.manual_seed(0)
    net = build_segformer('MiT_B0', 19)
    state = net.state_dict()
    def std_within_sampling_error(key, expected):
        # the standard deviation of n draws is off by about 1 / sqrt(2 n) of itself: allow four times that
        weights = state[key]
        assert weights.std().item() == pytest.approx(expected, rel=4 / math.sqrt(2 * weights.numel())), key

    fc1 = state['block1.0.mlp.fc1.weight']
    assert fc1.abs().max() <= 2.0
    std_within_sampling_error('block1.0.mlp.fc1.weight', 0.02)
    std_within_sampling_error('linear_c4.proj.weight', 0.02)
    for key, fan_out in [('patch_embed1.proj.weight', 49 * 32), ('block1.0.mlp.dwconv.dwconv.weight', 9),
                         ('linear_pred.weight', 19), ('linear_fuse.0.weight', 256)]:
        std_within_sampling_error(key, (2.0 / fan_out) ** 0.5)
    biases = [k for k in state if k.endswith('.bias') and not k.startswith('linear_fuse.1')]
    assert all(not state[k].any() for k in biases)
    norms = [k for k, m in net.named_modules() if isinstance(m, nn.LayerNorm)]
    assert all(bool((state[k + '.weight'] == 1).all()) for k in norms)


def test_drop_path_acts_only_in_training(random_b0):
    drop = DropPath(0.25).train()
    torch.manual_seed(0)
    out = drop(torch.ones(4000, 3, 2))
    per_sample = out[:, 0, 0]
    assert torch.equal(out, per_sample.view(-1, 1, 1).expand_as(out))  # one draw per sample
    assert per_sample.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert (per_sample == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    x = torch.randn(5, 7)
    assert drop.eval()(x) is x

    net = copy.deepcopy(random_b0)
    image = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, second = net(image).logits, net(image).logits
        assert torch.equal(first, second)
        net.train()
        torch.manual_seed(3)
        seeded = net(image).logits
        torch.manual_seed(3)
        again = net(image).logits
        torch.manual_seed(4)
        other = net(image).logits
    assert torch.equal(seeded, again)  # torch's global generator decides which samples drop
    assert not torch.allclose(seeded, other)


def test_norm_layer_comes_from_the_caller():
    eps3 = functools.partial(nn.BatchNorm2d, eps=1e-3)
    net = build_segmentation_model('segformer', 'MiT_B0', 19, False, norm_layer=eps3)
    batch_norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batch_norms == [net.linear_fuse[1]] and batch_norms[0].eps == 1e-3
    with torch.device('meta'):
        synced = build_segmentation_model('segformer', 'MiT_B2', 19, False, norm_layer=nn.SyncBatchNorm)
    batch_norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(batch_norms) == 1 and type(batch_norms[0]) is nn.SyncBatchNorm


# ---------------------------------------------------------------- ImageNet files

def nvlabs_imagenet_state(net, seed=5):
    """An NVlabs `mit_b0.pth`: the encoder's names with random values, plus the classifier `head.*`."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(net.state_dict()[k].shape, generator=generator) for k in net.encoder_keys()}
    state['head.weight'] = torch.randn(1000, 256, generator=generator)
    state['head.bias'] = torch.randn(1000, generator=generator)
    return state


@pytest.mark.parametrize('wrapped,layout', [(False, 'NVlabs MiT'), (True, 'mmsegmentation backbone.')])
def test_imagenet_file_loads_into_the_encoder(tmp_path, info_log, wrapped, layout):
    net = build_segformer('MiT_B0', 19)
    state = nvlabs_imagenet_state(net)
    path = tmp_path / 'mit_b0.pth'
    if wrapped:
        torch.save({'state_dict': {'backbone.' + k: v for k, v in state.items()}, 'meta': {'epoch': 1}}, path)
    else:
        torch.save(state, path)
    torch.manual_seed(0)
    loaded = get_segmentation_model('segformer', 'MiT_B0', 19, False, pretrained_base=str(path)).state_dict()
    torch.manual_seed(0)
    fresh = build_segformer('MiT_B0', 19).state_dict()
    for key in net.encoder_keys():
        assert torch.equal(loaded[key], state[key]), key
    for key in set(fresh) - set(net.encoder_keys()):
        assert torch.equal(loaded[key], fresh[key]), key  # the decoder keeps its initialisation
    assert re.search(r'loaded 176 of 176 backbone tensors from %s \(layout: %s' % (re.escape(str(path)), layout),
                     info_log.text)
    assert 'ignored' not in info_log.text  # the classifier head.* is skipped silently


def test_whole_segformer_file_gives_only_its_encoder(tmp_path, info_log, random_b0):
    source = random_b0
    path = tmp_path / 'segformer_MiT_B0_citys.pth'
    torch.save(source.state_dict(), path)
    net = get_segmentation_model('segformer', 'MiT_B0', 150, False, pretrained_base=str(path))
    for key in net.encoder_keys():
        assert torch.equal(net.state_dict()[key], source.state_dict()[key]), key
    assert not torch.equal(net.state_dict()['linear_c1.proj.weight'], source.state_dict()['linear_c1.proj.weight'])
    assert 'loaded 176 of 176 backbone tensors' in info_log.text


def test_backbone_file_of_another_network_is_refused(tmp_path):
    mobilenet_like = {f'features.{i}.conv.0.weight': torch.zeros(16, 16, 3, 3) for i in range(20)}
    mobilenet_like['classifier.1.weight'] = torch.zeros(1000, 1280)
    path = tmp_path / 'mobilenet_v2.pth'
    torch.save(mobilenet_like, path)
    with pytest.raises(CheckpointError, match=r'%s holds only 0 of the 176' % re.escape(str(path))):
        get_segmentation_model('segformer', 'MiT_B0', 19, False, pretrained_base=str(path))
    b0_path = tmp_path / 'mit_b0.pth'
    torch.save(nvlabs_imagenet_state(meta_network('MiT_B0')), b0_path)
    with pytest.raises(CheckpointError, match=r'%s does not fit.*wrongly shaped' % re.escape(str(b0_path))):
        get_segmentation_model('segformer', 'MiT_B1', 19, False, pretrained_base=str(b0_path))


# ---------------------------------------------------------------- the official release

def official_file(source, num_class=19):
    """`source`'s weights (CIRKD layout) as an official mmsegmentation SegFormer checkpoint. The fuse conv's bias
    is folded into the BN's running mean (BN(conv + b) with mean m equals BN(conv) with mean m - b)."""
    state = source.state_dict()
    decoder = {}
    for key, value in state.items():
        if key.startswith('linear_c') or key.startswith('linear_pred'):
            decoder['decode_head.' + key] = value
    decoder['decode_head.linear_fuse.conv.weight'] = state['linear_fuse.0.weight']
    for name in ('weight', 'bias', 'running_var', 'num_batches_tracked'):
        decoder['decode_head.linear_fuse.bn.' + name] = state['linear_fuse.1.' + name]
    decoder['decode_head.linear_fuse.bn.running_mean'] = state['linear_fuse.1.running_mean'] - state[
        'linear_fuse.0.bias']
    decoder['decode_head.conv_seg.weight'] = torch.randn(num_class, 128, 1, 1)
    decoder['decode_head.conv_seg.bias'] = torch.randn(num_class)
    backbone = {'backbone.' + key: state[key] for key in source.encoder_keys()}
    return {'state_dict': {**backbone, **decoder}, 'meta': {'CLASSES': ['c%d' % i for i in range(num_class)],
                                                          'mmseg_version': '0.11.0'}}


def test_official_checkpoint_loads_and_normalises_its_input(tmp_path, info_log, random_b0):
    source = random_b0
    path = tmp_path / 'segformer.b0.512x1024.city.160k.pth'
    torch.save(official_file(source), path)
    net = get_segmentation_model('segformer', 'MiT_B0', 19, False, pretrained=str(path)).eval()
    assert net.official and net.linear_fuse[0].bias is None
    assert 'layout of the official SegFormer release' in info_log.text
    assert 'loaded 192 tensors of model=segformer backbone=MiT_B0' in info_log.text

    rgb = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255
    bgr_input = rgb.flip(1) - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)  # the data pipeline's input
    imagenet_input = (rgb - torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD_RGB).view(1, 3, 1, 1)
    with torch.no_grad():
        got = net(bgr_input)
        want = source(imagenet_input)
    for a, b in ((got.logits, want.logits), (got.features, want.features)):
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_convert_official_segformer_recognises_only_its_layout(random_b0):
    source = meta_network('MiT_B0')
    state = {k: torch.zeros(v.shape) for k, v in source.state_dict().items()}
    assert convert_official_segformer(state) is None  # CIRKD's own layout
    assert convert_official_segformer({'features.0.weight': torch.zeros(1)}) is None
    converted = convert_official_segformer(official_file(random_b0)['state_dict'])
    assert [k for k in converted] != [] and set(converted) == {k for k, _ in expected_layout('MiT_B0', official=True)}
