"""MobileNetV3 (small, large) and sssegmentation's MobileNetV2, dilated to output stride 8, in CIRKDv2's layout.

Papers:

- A. Howard, M. Sandler, G. Chu, L.-C. Chen, B. Chen, M. Tan, W. Wang, Y. Zhu, R. Pang, V. Vasudevan, Q. V. Le,
  H. Adam, "Searching for MobileNetV3", ICCV 2019, https://arxiv.org/abs/1905.02244.
- M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen, "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", CVPR 2018, https://arxiv.org/abs/1801.04381.

The networks are those of CIRKD (winycg/CIRKD, models/base_models/mobilenetv3.py with irconv.py and
activation.py, after sssegmentation's and mmsegmentation's design), used by `deeplabv3_mobilenet_ssseg`
(models/deeplabv3_mobilenetv3.py) and `psp_mobile`. The state-dict keys are CIRKD's, so its released
checkpoints load strictly:

- MobileNetV3: `layer0.{conv,bn}`, `layer{i}.expand_conv.{conv,bn}`, `.depthwise_conv.{conv,bn}`,
  `.se.conv1.conv`, `.se.conv2.conv`, `.linear_conv.{conv,bn}`, and the last 1x1 conv `layer12` (small) /
  `layer16` (large) `.{conv,bn}`: 240 / 308 tensors. 576 / 960 channels at stride 8.
- MobileNetV2 (sssegmentation's, OpenMMLab's names): `conv1.{conv,bn}`, `layer1..7.<block>.conv.<i>.{conv,bn}`:
  320 channels at stride 8.

The numerics the released weights were trained with are kept:

- the stride-2 convolutions of MobileNetV3 pad "same" as TensorFlow does, computed from the input size in
  `forward`: the output is ceil(in / stride) and an odd total padding puts the extra pixel at the bottom /
  right (`same_padding`);
- output stride 8: the blocks that had stride 2 at /16 and /32 (small layer4 and layer9, large layer7 and
  layer13) lose it and take the new dilation (2, then 4) themselves, every later depthwise conv keeps it;
  the residual is decided on the block's original stride (stride 1 and in == out);
- HardSwish x·ReLU6(x+3)/6, the SE gate clamp((x+3)/6, 0, 1), SE width make_divisible(mid/4, 8);
- sssegmentation's MobileNetV2 dilates only the first block of each dilated stage.

What differs from CIRKD: the normalisation layer comes from the caller (CIRKD hard-codes SyncBatchNorm, eps
1e-5: the default nn.BatchNorm2d has that eps), and ImageNet files are read in two layouts each, never
loading nothing silently (see `imagenet_layouts` and models/checkpoint.py).
"""
import re
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F

from .backbones import conv1x1, conv3x3
from .checkpoint import plain_layout


def make_divisible(value, divisor=8, min_ratio=0.9):
    """`value` rounded to the nearest multiple of `divisor` (at least `divisor`), one `divisor` more if the
    rounding lost more than 10%: the channel rule of the MobileNets (the SE width of MobileNetV3)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < min_ratio * value else rounded


class HardSwish(nn.Module):
    """x·ReLU6(x+3)/6, in the order of operations CIRKD computes it."""

    def forward(self, x):
        return x * F.relu6(x + 3) / 6


class HardSigmoid(nn.Module):
    """clamp((x+3)/6, 0, 1): the gate of MobileNetV3's squeeze-and-excitation."""

    def forward(self, x):
        return ((x + 3) / 6).clamp(0, 1)


def same_padding(size, kernel_size, stride, dilation):
    """(before, after) padding of one spatial axis that gives ceil(size / stride) outputs, TensorFlow's "same":
    an odd total puts the extra pixel after (bottom / right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePaddingConv2d(nn.Conv2d):
    """nn.Conv2d padded "same" for the size of each input (`same_padding`); the module's own `padding` is 0."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, dilation=1, groups=1, bias=False):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0, dilation=dilation, groups=groups,
                         bias=bias)

    def extra_repr(self):
        return super().extra_repr() + ', padding=same (computed per input, odd pixel bottom/right)'

    def forward(self, x):
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def conv_bn(conv, norm_layer, activation=None):
    """`conv`, BN, optional activation, under the names `conv`, `bn` (and `act`, which holds no tensors)."""
    layers = OrderedDict(conv=conv, bn=norm_layer(conv.out_channels))
    if activation is not None:
        layers['act'] = activation
    return nn.Sequential(layers)


def depthwise_conv(channels, kernel_size, stride, dilation, pad_same):
    """k x k depthwise conv without bias; `pad_same`: the input-dependent "same" padding (MobileNetV3's convs
    built with stride 2, kept by CIRKD where the conversion to output stride 8 made them stride 1: there "same"
    is the symmetric (k-1)·dilation/2), else that static padding."""
    if pad_same:
        return SamePaddingConv2d(channels, channels, kernel_size, stride, dilation, groups=channels)
    return nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2 * dilation,
                     dilation=dilation, groups=channels, bias=False)


class SqueezeExcitation(nn.Module):
    """Global average -> 1x1 conv (bias) + ReLU -> 1x1 conv (bias) + hard-sigmoid -> scale the input's channels.
    Squeeze width make_divisible(channels / 4, 8); keys `conv1.conv`, `conv2.conv` as in CIRKD."""

    def __init__(self, channels):
        super().__init__()
        squeezed = make_divisible(channels // 4, 8)
        self.conv1 = nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, squeezed, 1), act=nn.ReLU(inplace=True)))
        self.conv2 = nn.Sequential(OrderedDict(conv=nn.Conv2d(squeezed, channels, 1), act=HardSigmoid()))

    def forward(self, x):
        return x * self.conv2(self.conv1(F.adaptive_avg_pool2d(x, 1)))


class InvertedResidual(nn.Sequential):
    """An inverted residual: its stages (1x1 expand, depthwise, optional SE, 1x1 linear projection) in order,
    plus the input when `residual`. The stages are children under the names of the checkpoint layout (see
    `inverted_residual`)."""

    def __init__(self, stages, residual):
        super().__init__(stages)
        self.residual = residual

    def extra_repr(self):
        return f'residual={self.residual}'

    def forward(self, x):
        out = super().forward(x)
        return x + out if self.residual else out


def inverted_residual(in_ch, mid_ch, out_ch, kernel_size, stride, dilation, activation, norm_layer, se=False,
                      pad_same=False, residual=None, layout='mobilenetv3'):
    """One inverted residual of either network.

    The expand conv exists iff `mid_ch` != `in_ch`; `activation` builds the activation module (ReLU, HardSwish,
    ReLU6); `se` adds squeeze-and-excitation after the depthwise conv; `pad_same` gives the depthwise conv the
    input-dependent "same" padding; `residual` defaults to stride 1 and in == out (MobileNetV3 passes the
    decision of its undilated stride). `layout`: 'mobilenetv3' names the stages `expand_conv`,
    `depthwise_conv`, `se`, `linear_conv`; 'mobilenetv2' puts them in a Sequential `conv` (`conv.0`, `conv.1`,
    ...), OpenMMLab's MobileNetV2 names that sssegmentation keeps.
    """
    stages = []
    if mid_ch != in_ch:
        stages.append(('expand_conv', conv_bn(conv1x1(in_ch, mid_ch), norm_layer, activation())))
    stages.append(('depthwise_conv', conv_bn(depthwise_conv(mid_ch, kernel_size, stride, dilation, pad_same),
                                             norm_layer, activation())))
    if se:
        stages.append(('se', SqueezeExcitation(mid_ch)))
    stages.append(('linear_conv', conv_bn(conv1x1(mid_ch, out_ch), norm_layer)))
    if residual is None:
        residual = stride == 1 and in_ch == out_ch
    if layout == 'mobilenetv2':
        return InvertedResidual(OrderedDict(conv=nn.Sequential(*(stage for _, stage in stages))), residual)
    if layout != 'mobilenetv3':
        raise ValueError(f'unknown inverted-residual layout {layout!r}')
    return InvertedResidual(OrderedDict(stages), residual)


# ------------------------------------------------------------------------------------------- ImageNet layouts

def _natural_key(module_name):
    # 'features.10.block.2' after 'features.2.block.0': digits compare as numbers
    return [(0, int(part), '') if part.isdigit() else (1, 0, part) for part in module_name.split('.')]


def _modules_of(keys):
    """OrderedDict module name -> [tensor names] of state-dict keys, in the order the modules first appear."""
    modules = OrderedDict()
    for key in keys:
        module, _, leaf = key.rpartition('.')
        modules.setdefault(module, []).append(leaf)
    return modules


def positional_layout(prefix, skip=()):
    """A layout read by position: the file's modules under `prefix` (less those under `skip`, the
    classification layers of the features), in the numeric order of their names, are paired one to one with
    the backbone's modules in its order; each pair must hold the same tensor names (weight, bias,
    running_mean, ...) with the same shapes, else the file is not in this layout (None). `num_batches_tracked`
    may be absent from the file. torchvision's MobileNets hold their layers in this order."""
    def convert(state, expected):
        source = {k: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(skip)}
        source_modules = sorted(_modules_of(source).items(), key=lambda item: _natural_key(item[0]))
        target_modules = list(_modules_of(expected).items())
        if not source or len(source_modules) != len(target_modules):
            return None
        converted = {}
        for (source_module, source_leaves), (target_module, target_leaves) in zip(
                source_modules, target_modules, strict=True):
            if set(source_leaves) - set(target_leaves):
                return None
            for leaf in target_leaves:
                source_key, target_key = f'{source_module}.{leaf}', f'{target_module}.{leaf}'
                if source_key not in source:
                    if leaf == 'num_batches_tracked':
                        continue
                    return None
                if source[source_key].shape != expected[target_key].shape:
                    return None
                converted[target_key] = source[source_key]
        return converted
    return convert


def _without(convert, extra):
    """`convert`, less the keys matching the regular expression `extra` (layers the file has and the dilated
    backbone has not, such as the final 1x1 conv of OpenMMLab's MobileNetV2 classifier)."""
    pattern = re.compile(extra)

    def without_extra(state, expected):
        converted = convert(state, expected)
        return None if converted is None else {k: v for k, v in converted.items() if not pattern.match(k)}
    return without_extra


# ------------------------------------------------------------------------------------------------ MobileNetV3

# (kernel, mid channels, out channels, SE, activation, stride of the classification network) per block.
MOBILENETV3_SETTINGS = {
    'small': (
        (3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2), (3, 88, 24, False, nn.ReLU, 1),
        (5, 96, 40, True, HardSwish, 2), (5, 240, 40, True, HardSwish, 1), (5, 240, 40, True, HardSwish, 1),
        (5, 120, 48, True, HardSwish, 1), (5, 144, 48, True, HardSwish, 1), (5, 288, 96, True, HardSwish, 2),
        (5, 576, 96, True, HardSwish, 1), (5, 576, 96, True, HardSwish, 1),
    ),
    'large': (
        (3, 16, 16, False, nn.ReLU, 1), (3, 64, 24, False, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 1),
        (5, 72, 40, True, nn.ReLU, 2), (5, 120, 40, True, nn.ReLU, 1), (5, 120, 40, True, nn.ReLU, 1),
        (3, 240, 80, False, HardSwish, 2), (3, 200, 80, False, HardSwish, 1), (3, 184, 80, False, HardSwish, 1),
        (3, 184, 80, False, HardSwish, 1), (3, 480, 112, True, HardSwish, 1), (3, 672, 112, True, HardSwish, 1),
        (5, 672, 160, True, HardSwish, 2), (5, 960, 160, True, HardSwish, 1), (5, 960, 160, True, HardSwish, 1),
    ),
}
# The blocks (1-based `layer` numbers) whose stride 2 is turned into a dilation for output stride 8.
MOBILENETV3_DILATED_BLOCKS = {'small': (4, 9), 'large': (7, 13)}
MOBILENETV3_LAST_CHANNELS = {'small': 576, 'large': 960}
STEM_CHANNELS = 16


class _LayerSequence(nn.Module):
    """A backbone whose children run one after the other and whose own names are the ImageNet files' keys."""

    @property
    def checkpoint_root(self):
        return self

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return [x]


class MobileNetV3(_LayerSequence):
    """MobileNetV3 at output stride 8 (see the module docstring): `layer0` (3x3 conv stride 2, "same" padding,
    BN, HardSwish), the inverted residuals `layer1..N`, the last 1x1 conv + BN + HardSwish `layerN+1`.
    `forward` returns [the last layer's output]."""

    def __init__(self, arch, norm_layer=nn.BatchNorm2d):
        super().__init__()
        if arch not in MOBILENETV3_SETTINGS:
            raise ValueError(f'MobileNetV3 arch must be one of {sorted(MOBILENETV3_SETTINGS)}, got {arch!r}')
        self.arch = arch
        self.layer0 = conv_bn(SamePaddingConv2d(3, STEM_CHANNELS, 3, stride=2), norm_layer, HardSwish())
        in_ch, dilation = STEM_CHANNELS, 1
        settings = MOBILENETV3_SETTINGS[arch]
        for index, (kernel_size, mid_ch, out_ch, se, activation, stride) in enumerate(settings, start=1):
            effective_stride = stride
            if index in MOBILENETV3_DILATED_BLOCKS[arch]:
                # the block that loses its stride takes the doubled dilation itself
                effective_stride, dilation = 1, dilation * 2
            block = inverted_residual(in_ch, mid_ch, out_ch, kernel_size, effective_stride, dilation, activation,
                                      norm_layer, se=se, pad_same=stride > 1,
                                      residual=stride == 1 and in_ch == out_ch)
            self.add_module(f'layer{index}', block)
            in_ch = out_ch
        last_ch = MOBILENETV3_LAST_CHANNELS[arch]
        # CIRKD gives this 1x1 conv dilation 4, which changes nothing for a 1x1 kernel.
        self.add_module(f'layer{len(settings) + 1}', conv_bn(conv1x1(in_ch, last_ch), norm_layer, HardSwish()))
        self.out_channels = [last_ch]
        self.out_strides = [8]

    # OpenMMLab's "third_party" files (mobilenet_v3_{small,large}-*.pth), the ones CIRKD names, hold the
    # backbone's own names; torchvision's (mobilenet_v3_*-047dcff4 / -8738ca79) hold `features.*` in the same
    # order and shapes. Both were trained with BN eps 1e-3, CIRKD fine-tunes them with eps 1e-5.
    imagenet_layouts = (
        ('OpenMMLab MobileNetV3', plain_layout(('', 'backbone.', 'pretrained.'))),
        ('torchvision MobileNetV3 (features.*, by position)', positional_layout('features.')),
    )



def mobilenetv3_small(norm_layer=nn.BatchNorm2d):
    return MobileNetV3('small', norm_layer)


def mobilenetv3_large(norm_layer=nn.BatchNorm2d):
    return MobileNetV3('large', norm_layer)


# --------------------------------------------------------------------------- MobileNetV2 of sssegmentation

# (expansion, out channels, blocks, stride, dilation) of `layer1..7` at output stride 8.
SSSEG_MOBILENETV2_STAGES = ((1, 16, 1, 1, 1), (6, 24, 2, 2, 1), (6, 32, 3, 2, 1), (6, 64, 4, 1, 2),
                            (6, 96, 3, 1, 2), (6, 160, 3, 1, 4), (6, 320, 1, 1, 4))


class MobileNetV2SSSeg(_LayerSequence):
    """sssegmentation's MobileNetV2 at output stride 8: `conv1` (3x3 conv stride 2, BN, ReLU6) and seven stages
    of inverted residuals (ReLU6). Only the FIRST block of a stage gets the stage's stride and dilation; the
    others have dilation 1, as in CIRKD (so the receptive field of the dilated stages is smaller than a fully
    dilated network's). `forward` returns [320 channels at stride 8]."""

    # OpenMMLab's (mmcls) MobileNetV2 file, which CIRKD's sssegmentation code names: the same keys under
    # `backbone.`, plus the final 1x1 conv `conv2` and `head.fc` this backbone lacks; torchvision's
    # mobilenet_v2 file (`features.0..17` in the same order, `features.18` the final 1x1 conv).
    imagenet_layouts = (
        ('OpenMMLab MobileNetV2', _without(plain_layout(('', 'backbone.', 'pretrained.')), r'conv2\.')),
        ('torchvision MobileNetV2 (features.*, by position)', positional_layout('features.', skip='features.18.')),
    )

    def __init__(self, norm_layer=nn.BatchNorm2d):
        super().__init__()
        in_ch = 32
        self.conv1 = conv_bn(conv3x3(3, in_ch, stride=2), norm_layer, nn.ReLU6(inplace=True))
        for index, (expansion, out_ch, blocks, stride, dilation) in enumerate(SSSEG_MOBILENETV2_STAGES, start=1):
            stage = []
            for block in range(blocks):
                first = block == 0
                stage.append(inverted_residual(in_ch, in_ch * expansion, out_ch, 3, stride if first else 1,
                                               dilation if first else 1, nn.ReLU6, norm_layer,
                                               layout='mobilenetv2'))
                in_ch = out_ch
            self.add_module(f'layer{index}', nn.Sequential(*stage))
        self.out_channels = [in_ch]
        self.out_strides = [8]



def mobilenetv2_ssseg(norm_layer=nn.BatchNorm2d):
    return MobileNetV2SSSeg(norm_layer)
