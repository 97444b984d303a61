"""`get_segmentation_model`: the networks of HWD, CIRKD and CIRKDv2 by their command-line names, with their
checkpoints loaded.

`MODEL_BACKBONES` is the one list of the (`--model`, `--backbone`) names. The networks keep the key layouts of
the released files, so those load strictly:

- `deeplabv3`, `psp`, `upernet`, `upernet_lite` on the dilated ResNets (`resnet18/50/101`: deep "v1s" stem;
  `resnet*_vanilla`: 7x7 stem), with an FCN aux head on c3;
- `deeplabv3_mobile`, `deeplab_mobile`, `psp_mobile`, `deeplabv3_mobilenet_ssseg` on the mobile backbones
  (MobileNetV2 as `mobile` (HWD's name) or `mobilenetv2` (CIRKDv2's), MobileNetV3, MobileViT); they have no
  aux head (`aux` is accepted and ignored);
- `segformer` on `MiT_B0` .. `MiT_B5` (no aux head either).

Head widths that the versions changed (DeepLabV3 on a ResNet: 128 / 256 in HWD and CIRKD v1, 512 in CIRKDv2;
PSPNet on ResNet-50/101: 512 in HWD, 256 in CIRKDv2) are a build argument, `head_width`, read from a
checkpoint's shapes whenever one is given; without one it defaults to HWD's width.
"""
import functools
import logging
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from utils.errors import UserError

from . import backbones, mit, mobilenet, mobilevit
from .checkpoint import classifier_rows, load_backbone_checkpoint, load_network_checkpoint, no_file, read_state_dict
from .heads import DeepLabV3Head, FCNHead, PSPHead, UPerNetHead
from .segmentation import SegmentationNetwork

logger = logging.getLogger(__name__)

RESNETS_V1S = ('resnet18', 'resnet50', 'resnet101')
RESNETS_VANILLA = ('resnet18_vanilla', 'resnet34_vanilla', 'resnet50_vanilla', 'resnet101_vanilla',
                   'resnet152_vanilla')
RESNETS = RESNETS_V1S + RESNETS_VANILLA
MOBILEVITS = ('mobilevit_xx_small', 'mobilevit_x_small', 'mobilevit_small')
MOBILENETV3S = ('mobilenetv3_small', 'mobilenetv3_large')
MIT_VARIANTS = ('MiT_B0', 'MiT_B1', 'MiT_B2', 'MiT_B3', 'MiT_B4', 'MiT_B5')

MODEL_BACKBONES = {
    'deeplabv3': RESNETS,
    'psp': RESNETS,
    'upernet': RESNETS,
    'upernet_lite': RESNETS,
    'deeplabv3_mobile': ('mobile', 'mobilenetv2'),
    'deeplabv3_mobilenet_ssseg': MOBILENETV3S + ('mobilenetv2_ssseg',),
    # CIRKDv2 builds it on MobileNetV2 and MobileViT; on MobileNetV3 it is deeplabv3_mobilenet_ssseg's network
    'deeplab_mobile': ('mobilenetv2', 'mobile') + MOBILEVITS + MOBILENETV3S,
    'psp_mobile': ('mobile', 'mobilenetv2') + MOBILEVITS + MOBILENETV3S,
    'segformer': MIT_VARIANTS,
}

_BACKBONE_BUILDERS = {
    'resnet18': backbones.resnet18_v1s,
    'resnet50': backbones.resnet50_v1s,
    'resnet101': backbones.resnet101_v1s,
    'resnet18_vanilla': backbones.resnet18_vanilla,
    'resnet34_vanilla': backbones.resnet34_vanilla,
    'resnet50_vanilla': backbones.resnet50_vanilla,
    'resnet101_vanilla': backbones.resnet101_vanilla,
    'resnet152_vanilla': backbones.resnet152_vanilla,
    'mobile': backbones.mobilenetv2_dilated,
    'mobilenetv2': backbones.mobilenetv2_dilated,
    'mobilenetv2_ssseg': mobilenet.mobilenetv2_ssseg,
    'mobilenetv3_small': mobilenet.mobilenetv3_small,
    'mobilenetv3_large': mobilenet.mobilenetv3_large,
    'mobilevit_xx_small': mobilevit.mobilevit_xx_small,
    'mobilevit_x_small': mobilevit.mobilevit_x_small,
    'mobilevit_small': mobilevit.mobilevit_small,
}

# The ImageNet file of each backbone under the name its publisher gives it (the README's table of ImageNet backbone
# files): the default of --pretrained-base is ./pretrained/<that name>, CIRKD's `<backbone>-imagenet.pth` otherwise.
IMAGENET_FILES = {
    'resnet18': 'resnet18-imagenet.pth', 'resnet50': 'resnet50-imagenet.pth', 'resnet101': 'resnet101-imagenet.pth',
    'resnet18_vanilla': 'resnet18-f37072fd.pth', 'resnet34_vanilla': 'resnet34-b627a593.pth',
    'resnet50_vanilla': 'resnet50-0676ba61.pth', 'resnet101_vanilla': 'resnet101-63fe2227.pth',
    'resnet152_vanilla': 'resnet152-394f9c45.pth',
    'mobile': 'mobilenetv2-imagenet.pth', 'mobilenetv2': 'mobilenetv2-imagenet.pth',
    'mobilenetv2_ssseg': 'mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth',
    'mobilenetv3_small': 'mobilenet_v3_small-47085aa1.pth', 'mobilenetv3_large': 'mobilenet_v3_large-bc2c3fd3.pth',
    'mobilevit_xx_small': 'mobilevit-xxsmall_3rdparty_in1k_20221018-77835605.pth',
    **{variant: f'mit_b{variant[-1]}.pth' for variant in MIT_VARIANTS},
}


def imagenet_file(backbone):
    """The file name of the ImageNet weights of `backbone` (see IMAGENET_FILES)."""
    return IMAGENET_FILES.get(backbone, f'{backbone}-imagenet.pth')


# The final classifier of each network's head (which networks a checkpoint can be is narrowed down by it).
CLASSIFIER_KEY = {'deeplabv3': 'head.block.4.weight', 'psp': 'head.classifier.weight',
                  'upernet': 'head.conv_last.1.weight', 'upernet_lite': 'head.conv_last.1.weight',
                  'deeplabv3_mobile': 'head.block.4.weight', 'deeplab_mobile': 'head.block.4.weight',
                  'psp_mobile': 'head.classifier.weight', 'deeplabv3_mobilenet_ssseg': 'head.block.4.weight',
                  'segformer': 'linear_pred.weight'}
# The mobile heads are 128 wide whatever the backbone.
MOBILE_HEAD_WIDTH = 128
UPERNET_FPN_DIM = {'upernet': 512, 'upernet_lite': 128}


def default_head_width(model, backbone):
    """The width of the head when no checkpoint says otherwise: HWD's (the paper's) where the versions differ."""
    if model in ('deeplabv3', 'psp'):
        wide = not backbone.startswith(('resnet18', 'resnet34'))
        if model == 'deeplabv3':
            return 256 if wide else 128
        return 512 if wide else 128
    if model in UPERNET_FPN_DIM:
        return UPERNET_FPN_DIM[model]
    if model == 'segformer':
        return None
    return MOBILE_HEAD_WIDTH


def has_variable_width(model):
    """Whether `head_width` may differ from the default (the heads whose width the released versions changed)."""
    return model in ('deeplabv3', 'psp')


def has_aux_head(model, backbone):
    """Whether the network can carry the FCN aux head (on a ResNet's c3)."""
    return backbone in RESNETS


def check_model_name(model, backbone, model_flag='--model', backbone_flag='--backbone'):
    """Raise UserError unless (model, backbone) is one of MODEL_BACKBONES, naming the flags and the
    valid names."""
    if model not in MODEL_BACKBONES:
        raise UserError(f'{model_flag} {model!r}: unknown network; choose one of {", ".join(MODEL_BACKBONES)}')
    if backbone not in MODEL_BACKBONES[model]:
        raise UserError(f'{backbone_flag} {backbone!r} does not fit {model_flag} {model}; choose one of '
                        f'{", ".join(MODEL_BACKBONES[model])}')


def _check_num_class(num_class):
    if isinstance(num_class, bool) or not isinstance(num_class, int) or num_class < 1:
        raise UserError('num_class must be a positive integer, got %r' % (num_class,))


def build_segmentation_model(model, backbone, num_class, aux, norm_layer=nn.BatchNorm2d, head_width=None,
                             variant=None):
    """The network with freshly initialised weights (no file read).

    `head_width`: the width of a head the versions changed (see the module docstring; None: HWD's);
    `variant`: a checkpoint layout's build options (the official SegFormer release: {'official': True})."""
    check_model_name(model, backbone)
    _check_num_class(num_class)
    variant = dict(variant or {})
    if head_width is not None and head_width != default_head_width(model, backbone) and not has_variable_width(model):
        raise UserError(f'a head width of {head_width} does not exist for --model {model} (its head is '
                        f'{default_head_width(model, backbone)} wide)')
    width = head_width or default_head_width(model, backbone)
    if model == 'segformer':
        net = mit.build_segformer(backbone, num_class, norm_layer=norm_layer, **variant)
        net.model_name, net.backbone_name = model, backbone
        return net
    net_backbone = _BACKBONE_BUILDERS[backbone](norm_layer=norm_layer)
    in_ch = net_backbone.out_channels[-1]
    strides = net_backbone.out_strides
    if model in UPERNET_FPN_DIM:
        head = UPerNetHead(net_backbone.out_channels, strides, num_class, width, norm_layer)
    elif model.startswith('deeplab'):
        head = DeepLabV3Head(in_ch, num_class, width, norm_layer, output_stride=strides[-1])
    else:
        head = PSPHead(in_ch, num_class, width, norm_layer, output_stride=strides[-1])
    auxlayer = None
    if aux and has_aux_head(model, backbone):
        auxlayer = FCNHead(net_backbone.out_channels[-2], num_class, norm_layer)
    return SegmentationNetwork(net_backbone, head, auxlayer, model=model, backbone_name=backbone,
                               num_class=num_class)


class NetworkFile(NamedTuple):
    """A whole-network checkpoint, read once: its state dict in this project's names and what it says about the
    network (the layout's build options, the head's width, whether it has an aux head)."""
    path: str
    state: dict
    variant: Optional[dict]
    head_width: Optional[int]
    has_aux: bool


def read_network_file(path, model, backbone):
    """The NetworkFile of a whole-network checkpoint for `model`/`backbone`: a layout of another code base is
    converted (the official SegFormer release), and the head width is read where the versions changed it."""
    state = read_state_dict(path)
    variant = None
    if model == 'segformer':
        official = mit.convert_official_segformer(state)
        if official is not None:
            logger.info('%s is in the layout of the official SegFormer release (mmsegmentation): its decoder has '
                        'no fuse bias and it takes RGB input scaled by the ImageNet mean and std', path)
            state, variant = official, {'official': True}
    has_aux = any(key.startswith('auxlayer.') for key in state)
    return NetworkFile(str(path), state, variant, head_width_of(model, state), has_aux)


def _is_encoder_file(path):
    """Whether a file holds a SegFormer encoder without its decoder (an ImageNet MiT file)."""
    state = read_state_dict(path)
    official = mit.convert_official_segformer(state)
    state = official if official is not None else state
    return classifier_rows(state) is None and any(key.startswith('block1.') or key.startswith('backbone.block1.')
                                                  for key in state)


def head_width_of(model, state):
    """The width of the head in a checkpoint, for the heads whose width the versions changed, else None."""
    key = {'deeplabv3': 'head.aspp.b0.0.weight', 'psp': 'head.block.0.weight'}.get(model)
    if key is None or key not in state or state[key].dim() != 4:
        return None
    return int(state[key].shape[0])


def build_network(model, backbone, num_class, aux, norm_layer=nn.BatchNorm2d, pretrained=None, pretrained_base=None,
                  head_width=None, network_file=None):
    """Build `model` on `backbone` for `num_class` classes and load its weights, if any, on the CPU.

    `pretrained_base`: an ImageNet backbone file, in any layout the backbone reads (the log names it);
    `pretrained` (a path) or `network_file` (a NetworkFile already read): a whole-network checkpoint, loaded
    strictly (it overrides the backbone file); the head width and the layout's build options come from it.
    `'None'` or None means no file."""
    if network_file is None and not no_file(pretrained):
        if model == 'segformer' and _is_encoder_file(pretrained):
            # CIRKDv2 passes the ImageNet MiT file (mit_b0.pth) as --pretrained: read it as the backbone file
            logger.info('%s holds a MiT encoder without a decoder: read as the ImageNet backbone file, as CIRKDv2 '
                        'does with --pretrained mit_b*.pth (the decoder keeps its initialisation)', pretrained)
            if not no_file(pretrained_base):
                logger.info('backbone file %s not read: %s replaces it', pretrained_base, pretrained)
            pretrained, pretrained_base = None, pretrained
        else:
            network_file = read_network_file(pretrained, model, backbone)
    variant = None
    if network_file is not None:
        width = network_file.head_width
        if head_width is not None and width is not None and width != head_width:
            raise UserError(f'{network_file.path} holds a {model} head {width} wide, not {head_width}: drop the '
                            'head-width flag (it is read from the checkpoint)')
        head_width = width if width is not None else head_width
        variant = network_file.variant
    net = build_segmentation_model(model, backbone, num_class, aux, norm_layer, head_width, variant)
    if not no_file(pretrained_base):
        if network_file is None:
            load_backbone_checkpoint(net, pretrained_base, backbone)
        else:
            logger.info('backbone file %s not read: the whole-network checkpoint %s replaces it',
                        pretrained_base, network_file.path)
    if network_file is not None:
        load_network_checkpoint(net, network_file.state, network_file.path, describe=(model, backbone, num_class),
                                identify=identify_network)
    return net


def get_segmentation_model(model, backbone, num_class, aux, norm_layer=nn.BatchNorm2d,
                           pretrained='None', pretrained_base='None', local_rank=None, head_width=None):
    """The original's call: `build_network` with its argument order. `local_rank` is accepted for the original's
    call signature; files are always read to the CPU and the caller moves the network to its device."""
    del local_rank
    return build_network(model, backbone, num_class, aux, norm_layer, pretrained, pretrained_base, head_width)


@functools.lru_cache(maxsize=None)
def _layout(model, backbone, aux, head_width):
    """{key: shape} of the network's state dict with one class, built on the meta device (no memory)."""
    with torch.device('meta'):
        net = build_segmentation_model(model, backbone, 1, aux, head_width=head_width)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


@functools.lru_cache(maxsize=None)
def describe_network(model, backbone, num_class, aux=False, head_width=None):
    """The NetworkSpec of a network (output stride, feature channels, ...), from a build on the meta device."""
    with torch.device('meta'):
        net = build_segmentation_model(model, backbone, num_class, aux, head_width=head_width)
    return net.spec()


@functools.lru_cache(maxsize=None)
def output_sizes(model, backbone, crop):
    """{'logits': (h, w), 'features': (h, w), 'stages': ((h, w), ...)}: the spatial sizes of the network's
    outputs for an input of `crop` = (height, width), from a forward on the meta device (no memory, no compute).
    What a method whose modules are sized by the maps' areas (CIRKDv2's channel queues) reads."""
    with torch.device('meta'):
        net = build_segmentation_model(model, backbone, 1, False).eval()
        outputs = net(torch.empty(1, 3, *crop), return_stages=True)
    return {'logits': tuple(outputs.logits.shape[2:]), 'features': tuple(outputs.features.shape[2:]),
            'stages': tuple(tuple(stage.shape[2:]) for stage in outputs.stages)}


def head_widths(model, backbone):
    """The head widths a file of this network may hold."""
    default = default_head_width(model, backbone)
    if not has_variable_width(model):
        return (default,)
    return (default, 512) if model == 'deeplabv3' else (default, 256)


def identify_network(state):
    """(model, backbone, num_class) of the model-zoo network whose keys and shapes `state` has, or None.

    The class count is read from the classifier; a missing `num_batches_tracked` counter is tolerated,
    as when loading."""
    num_class = classifier_rows(state)
    if num_class is None:
        return None
    aux = any(key.startswith('auxlayer.') for key in state)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    for model, names in MODEL_BACKBONES.items():
        if CLASSIFIER_KEY[model] not in state:  # another head: no need to build its layouts
            continue
        for backbone in names:
            if aux and not has_aux_head(model, backbone):
                continue
            for width in head_widths(model, backbone):
                layout = _layout(model, backbone, aux, width)
                expected = {key: (num_class,) + shape[1:] if _is_class_row(key, shape) else shape
                            for key, shape in layout.items()}
                present = {key: shape for key, shape in expected.items()
                           if key in shapes or not key.endswith('num_batches_tracked')}
                if shapes == present:
                    return model, backbone, num_class
    return None


def _is_class_row(key, shape):
    # The final 1x1 classifiers (heads and aux head) have one row (and one bias) per class.
    return key.endswith(('block.4.weight', 'block.4.bias', 'classifier.weight', 'classifier.bias',
                         'conv_last.1.weight', 'conv_last.1.bias', 'linear_pred.weight', 'linear_pred.bias'))


def load_trained_model(model, backbone, num_class, pretrained, flag='--pretrained', norm_layer=nn.BatchNorm2d):
    """A trained network for inference (and as a frozen teacher), in eval mode. The aux head plays no part in
    inference; it is built exactly when the file holds `auxlayer.` keys, so files saved with and without it
    both load strictly (any other mismatch is still an error). The head width and the layout variant (the
    official SegFormer release) come from the file too."""
    if no_file(pretrained):
        raise UserError(f'{flag}: the checkpoint file of the network is needed')
    network_file = read_network_file(pretrained, model, backbone)
    net = build_network(model, backbone, num_class, network_file.has_aux, norm_layer, network_file=network_file)
    return net.eval()
