"""What every network of the model zoo states and returns, checked on the meta device (shapes only, nothing
computed): named outputs at the stated output stride with the stated channels, the original's list indexing, the
FLOPs counter, the head widths of both released versions, and checkpoints recognised by their layout."""
import pytest
import torch
import torch.nn as nn

from models.model_zoo import (
    MODEL_BACKBONES,
    build_segmentation_model,
    default_head_width,
    describe_network,
    get_segmentation_model,
    has_aux_head,
    identify_network,
)
from models.segmentation import SegmentationOutput
from utils.errors import UserError
from utils.flops import count_flops

pytestmark = pytest.mark.usefixtures('one_thread')

# Every network with every kind of backbone: the backbones left out differ from one that is here only in their
# depth or widths (ResNet-34..152, MobileViT-XS/S, MiT-B1/B3..B5; `mobile` is `mobilenetv2`); their keys and
# parameter counts are checked in the families' own test files and by bench/bench_zoo.py.
SAME_KIND = ('resnet101', 'resnet34_vanilla', 'resnet50_vanilla', 'resnet101_vanilla', 'resnet152_vanilla',
             'mobilevit_x_small', 'mobilevit_small', 'MiT_B1', 'MiT_B3', 'MiT_B4', 'MiT_B5', 'mobile')
CONFIGS = [(model, backbone) for model, backbones in MODEL_BACKBONES.items() for backbone in backbones
           if backbone not in SAME_KIND]


def ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize('model,backbone', CONFIGS, ids=[f'{m}-{b}' for m, b in CONFIGS])
def test_named_outputs_match_what_the_network_states(model, backbone):
    with torch.device('meta'):
        net = build_segmentation_model(model, backbone, 19, aux=True).eval()
        out = net(torch.empty(2, 3, 64, 96), return_stages=True)
    spec = net.spec()
    assert isinstance(out, SegmentationOutput) and isinstance(out, tuple)
    size = (ceil_div(64, spec.output_stride), ceil_div(96, spec.output_stride))
    assert tuple(out.logits.shape) == (2, 19) + size
    assert tuple(out.features.shape) == (2, spec.feature_channels) + size
    # the original's indexing: [0] logits, [-1] features, [1] aux logits when there is an aux head
    assert out[0] is out.logits and out[-1] is out.features
    assert spec.has_aux == has_aux_head(model, backbone) == (out.aux is not None) == (len(out) == 3)
    if spec.has_aux:
        assert out[1] is out.aux and tuple(out.aux.shape) == (2, 19) + size
    assert [s.shape[1] for s in out.stages] == list(spec.stage_channels)
    assert [ceil_div(64, s) for s in spec.stage_strides] == [s.shape[2] for s in out.stages]
    # the FLOPs counter reaches every operation of the network
    assert count_flops(net, (1, 3, 64, 64)) > 0


def test_stages_only_when_asked_for():
    net = build_segmentation_model('psp_mobile', 'mobilenetv3_small', 19, False).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).stages is None
        assert len(net(torch.zeros(1, 3, 64, 64), return_stages=True).stages) == len(net.stage_channels)


def test_describe_network_states_without_building_weights():
    assert describe_network('segformer', 'MiT_B5', 19).output_stride == 4
    assert describe_network('upernet_lite', 'resnet18', 150, True) == \
        build_segmentation_model('upernet_lite', 'resnet18', 150, True).spec()


def test_outputs_detach_and_map_keep_the_fields():
    out = SegmentationOutput(torch.ones(1, 2, 2, 2, requires_grad=True), torch.zeros(1, 3, 2, 2), None,
                             [torch.ones(1)])
    detached = out.detach()
    assert not detached.logits.requires_grad and detached.aux is None and len(detached) == 2
    assert torch.equal(detached.stages[0], torch.ones(1))


@pytest.mark.parametrize('model,backbone,hwd,cirkdv2', [('deeplabv3', 'resnet18', 128, 512),
                                                          ('deeplabv3', 'resnet101', 256, 512),
                                                          ('psp', 'resnet101', 512, 256)])
def test_both_head_widths_and_the_width_read_from_a_file(tmp_path, model, backbone, hwd, cirkdv2):
    assert default_head_width(model, backbone) == hwd
    with torch.device('meta'):
        wide = build_segmentation_model(model, backbone, 19, aux=True, head_width=cirkdv2)
    assert wide.feature_channels == cirkdv2
    if backbone == 'resnet18':  # a real file: the width is read from it, a flag that says otherwise is refused
        path = tmp_path / 'cirkdv2.pth'
        state = build_segmentation_model(model, backbone, 19, aux=True, head_width=cirkdv2).state_dict()
        torch.save(state, path)
        net = get_segmentation_model(model, backbone, 19, True, pretrained=str(path))
        assert net.feature_channels == cirkdv2 and identify_network(state) == (model, backbone, 19)
        with pytest.raises(UserError, match='head 512 wide, not 128'):
            get_segmentation_model(model, backbone, 19, True, pretrained=str(path), head_width=128)
    with pytest.raises(UserError, match='head width'):
        build_segmentation_model('psp_mobile', 'mobile', 19, False, head_width=256)


@pytest.mark.parametrize('model,backbone', [('segformer', 'MiT_B0'), ('psp_mobile', 'mobilenetv3_small'),
                                            ('deeplab_mobile', 'mobilevit_xx_small'), ('upernet_lite', 'resnet18'),
                                            ('deeplabv3_mobilenet_ssseg', 'mobilenetv2_ssseg')])
def test_files_of_each_family_are_recognised(tmp_path, model, backbone):
    """A file of one family given for another network says which network it holds."""
    state = build_segmentation_model(model, backbone, 19, aux=True).state_dict()
    assert identify_network(state) == (model, backbone, 19)
    path = tmp_path / 'file.pth'
    torch.save(state, path)
    other = ('psp', 'resnet18') if model != 'psp' else ('deeplabv3', 'resnet18')
    with pytest.raises(UserError, match=f'this file is a {model}/{backbone} network for 19 classes'):
        get_segmentation_model(*other, 19, True, pretrained=str(path))


def test_norm_layer_comes_from_the_caller_everywhere():
    """Every network normalises with the caller's BatchNorm class (CIRKDv2 hard-codes SyncBatchNorm in the mobile
    backbones and plain BatchNorm in UPerNet's head)."""
    for model, backbone in (('psp_mobile', 'mobilenetv3_large'), ('deeplab_mobile', 'mobilevit_small'),
                            ('upernet', 'resnet50'), ('segformer', 'MiT_B1'),
                            ('deeplabv3_mobilenet_ssseg', 'mobilenetv2_ssseg')):
        with torch.device('meta'):
            net = build_segmentation_model(model, backbone, 19, True, norm_layer=nn.SyncBatchNorm)
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms), (model, backbone)
