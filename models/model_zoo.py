"""`get_segmentation_model`: the networks of the CIRKD/HWD releases by name, with their checkpoints loaded."""
import functools
import logging

import torch
import torch.nn as nn

from utils.errors import UserError

from . import backbones
from .checkpoint import classifier_rows, load_backbone_checkpoint, load_network_checkpoint, no_file, read_state_dict
from .heads import DeepLabV3Head, FCNHead, PSPHead
from .segmentation import SegmentationNetwork

logger = logging.getLogger(__name__)

MODEL_BACKBONES = {
    'deeplabv3': ('resnet18', 'resnet50', 'resnet101'),
    'psp': ('resnet18', 'resnet50', 'resnet101'),
    'deeplabv3_mobile': ('mobile',),
    'psp_mobile': ('mobile',),
}

_BACKBONE_BUILDERS = {
    'resnet18': backbones.resnet18_v1s,
    'resnet50': backbones.resnet50_v1s,
    'resnet101': backbones.resnet101_v1s,
    'mobile': backbones.mobilenetv2_dilated,
}

# Head widths of the released networks: the small backbones get narrow heads.
_DEEPLAB_INNER = {'resnet18': 128, 'resnet50': 256, 'resnet101': 256, 'mobile': 128}
_PSP_OUT = {'resnet18': 128, 'resnet50': 512, 'resnet101': 512, 'mobile': 128}


def check_model_name(model, backbone, model_flag='--model', backbone_flag='--backbone'):
    """Raise UserError unless (model, backbone) is one of MODEL_BACKBONES, naming the flags and the
    valid names."""
    if model not in MODEL_BACKBONES:
        raise UserError(f'{model_flag} {model!r}: unknown network; choose one of {", ".join(MODEL_BACKBONES)}')
    if backbone not in MODEL_BACKBONES[model]:
        raise UserError(f'{backbone_flag} {backbone!r} does not fit {model_flag} {model}; choose one of '
                        f'{", ".join(MODEL_BACKBONES[model])}')


def build_segmentation_model(model, backbone, num_class, aux, norm_layer=nn.BatchNorm2d):
    """The network with freshly initialised weights (no file read)."""
    check_model_name(model, backbone)
    if isinstance(num_class, bool) or not isinstance(num_class, int) or num_class < 1:
        raise UserError('num_class must be a positive integer, got %r' % (num_class,))
    net_backbone = _BACKBONE_BUILDERS[backbone](norm_layer=norm_layer)
    in_ch = net_backbone.out_channels[-1]
    if model.startswith('deeplabv3'):
        head = DeepLabV3Head(in_ch, num_class, _DEEPLAB_INNER[backbone], norm_layer)
    else:
        head = PSPHead(in_ch, num_class, _PSP_OUT[backbone], norm_layer)
    auxlayer = None
    # The mobile networks have no aux head: `aux` is accepted and ignored, as in the original.
    if aux and backbone != 'mobile':
        auxlayer = FCNHead(net_backbone.out_channels[-2], num_class, norm_layer)
    name = 'model=%s, backbone=%s, num_class=%d, aux=%s' % (model, backbone, num_class, auxlayer is not None)
    return SegmentationNetwork(net_backbone, head, auxlayer, name=name)


def get_segmentation_model(model, backbone, num_class, aux, norm_layer=nn.BatchNorm2d,
                           pretrained='None', pretrained_base='None', local_rank=None):
    """Build `model` on `backbone` for `num_class` classes and load its weights, if any, on the CPU.

    `pretrained_base`: an ImageNet backbone file (keys without the `pretrained.` prefix);
    `pretrained`: a whole-network state dict, loaded strictly (it overrides the backbone file).
    `'None'` or None means no file. `local_rank` is accepted for the original's call signature;
    files are always read to the CPU and the caller moves the network to its device.
    """
    del local_rank
    net = build_segmentation_model(model, backbone, num_class, aux, norm_layer)
    if not no_file(pretrained_base):
        if no_file(pretrained):
            load_backbone_checkpoint(net.pretrained.checkpoint_root, pretrained_base, backbone)
        else:
            logger.info('backbone file %s not read: the whole-network checkpoint %s replaces it',
                        pretrained_base, pretrained)
    if not no_file(pretrained):
        load_network_checkpoint(net, pretrained, describe=(model, backbone, num_class), identify=identify_network)
    return net


@functools.lru_cache(maxsize=None)
def _layout(model, backbone, aux):
    """{key: shape} of the network's state dict with one class, built on the meta device (no memory)."""
    with torch.device('meta'):
        net = build_segmentation_model(model, backbone, 1, aux)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


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
        for backbone in names:
            layout = _layout(model, backbone, aux and backbone != 'mobile')
            expected = {key: (num_class,) + shape[1:] if _is_class_row(key, shape) else shape
                        for key, shape in layout.items()}
            present = {key: shape for key, shape in expected.items()
                       if key in shapes or not key.endswith('num_batches_tracked')}
            if shapes == present:
                return model, backbone, num_class
    return None


def _is_class_row(key, shape):
    # The final 1x1 classifiers (head and aux head) have one row (and one bias) per class.
    return key.endswith(('block.4.weight', 'block.4.bias', 'classifier.weight', 'classifier.bias'))


def load_trained_model(model, backbone, num_class, pretrained, flag='--pretrained'):
    """A trained network for inference, in eval mode. The aux head plays no part in inference; it is
    built exactly when the file holds `auxlayer.` keys, so files saved with and without it both load
    strictly (any other mismatch is still an error)."""
    if no_file(pretrained):
        raise UserError(f'{flag}: the checkpoint file of the network to evaluate is needed')
    has_aux = any(key.startswith('auxlayer.') for key in read_state_dict(pretrained))
    net = get_segmentation_model(model, backbone, num_class, aux=has_aux, pretrained=pretrained)
    return net.eval()
