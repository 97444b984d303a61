"""CIRKDv2's MobileNetV3 (small, large), sssegmentation's MobileNetV2 and the PSP head, restated as plain
functions of a state dict (torch.nn.functional only; the modules of models/ are never called).

The facts are those of CIRKD's models/base_models/mobilenetv3.py and irconv.py (winycg/CIRKD) for

- A. Howard et al., "Searching for MobileNetV3", ICCV 2019, https://arxiv.org/abs/1905.02244;
- M. Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
  https://arxiv.org/abs/1801.04381;
- H. Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, https://arxiv.org/abs/1612.01105 (the head of
  CIRKD's models/psp_mobile.py).

Every layer is written out in a table with its effective stride, dilation and padding rule, so that a wrong
placement in the code under test shows as a different output. A yardstick for the tests, not for training.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F

BN_EPS = 1e-5

# Per block: (kernel, mid, out, SE, activation, effective stride, dilation, residual, "same" padding).
# The residual is decided on the stride of the classification network; the "same" padding belongs to the
# depthwise convs that had stride 2 there (at stride 1 it is the symmetric (k-1)·d/2 anyway).
MOBILENETV3_SMALL = (
    (3, 16, 16, True, 'relu', 2, 1, False, True),
    (3, 72, 24, False, 'relu', 2, 1, False, True),
    (3, 88, 24, False, 'relu', 1, 1, True, False),
    (5, 96, 40, True, 'hswish', 1, 2, False, True),
    (5, 240, 40, True, 'hswish', 1, 2, True, False),
    (5, 240, 40, True, 'hswish', 1, 2, True, False),
    (5, 120, 48, True, 'hswish', 1, 2, False, False),
    (5, 144, 48, True, 'hswish', 1, 2, True, False),
    (5, 288, 96, True, 'hswish', 1, 4, False, True),
    (5, 576, 96, True, 'hswish', 1, 4, True, False),
    (5, 576, 96, True, 'hswish', 1, 4, True, False),
)
MOBILENETV3_LARGE = (
    (3, 16, 16, False, 'relu', 1, 1, True, False),
    (3, 64, 24, False, 'relu', 2, 1, False, True),
    (3, 72, 24, False, 'relu', 1, 1, True, False),
    (5, 72, 40, True, 'relu', 2, 1, False, True),
    (5, 120, 40, True, 'relu', 1, 1, True, False),
    (5, 120, 40, True, 'relu', 1, 1, True, False),
    (3, 240, 80, False, 'hswish', 1, 2, False, True),
    (3, 200, 80, False, 'hswish', 1, 2, True, False),
    (3, 184, 80, False, 'hswish', 1, 2, True, False),
    (3, 184, 80, False, 'hswish', 1, 2, True, False),
    (3, 480, 112, True, 'hswish', 1, 2, False, False),
    (3, 672, 112, True, 'hswish', 1, 2, True, False),
    (5, 672, 160, True, 'hswish', 1, 4, False, True),
    (5, 960, 160, True, 'hswish', 1, 4, True, False),
    (5, 960, 160, True, 'hswish', 1, 4, True, False),
)
MOBILENETV3 = {'small': (MOBILENETV3_SMALL, 576), 'large': (MOBILENETV3_LARGE, 960)}

# sssegmentation's MobileNetV2 at output stride 8, block by block: (layer, index in layer, in, expansion, out,
# stride, dilation). Only the first block of a stage carries the stage's stride and dilation.
SSSEG_MOBILENETV2 = (
    (1, 0, 32, 1, 16, 1, 1),
    (2, 0, 16, 6, 24, 2, 1), (2, 1, 24, 6, 24, 1, 1),
    (3, 0, 24, 6, 32, 2, 1), (3, 1, 32, 6, 32, 1, 1), (3, 2, 32, 6, 32, 1, 1),
    (4, 0, 32, 6, 64, 1, 2), (4, 1, 64, 6, 64, 1, 1), (4, 2, 64, 6, 64, 1, 1), (4, 3, 64, 6, 64, 1, 1),
    (5, 0, 64, 6, 96, 1, 2), (5, 1, 96, 6, 96, 1, 1), (5, 2, 96, 6, 96, 1, 1),
    (6, 0, 96, 6, 160, 1, 4), (6, 1, 160, 6, 160, 1, 1), (6, 2, 160, 6, 160, 1, 1),
    (7, 0, 160, 6, 320, 1, 4),
)


def se_width(channels):
    """make_divisible(channels / 4, 8): nearest multiple of 8, at least 8, plus 8 when that loses over 10%."""
    quarter = channels // 4
    width = max(8, (quarter + 4) // 8 * 8)
    return width + 8 if 10 * width < 9 * quarter else width


def hard_swish(x):
    return x * (x + 3).clamp(0, 6) / 6


def activate(x, kind):
    if kind == 'relu':
        return x.clamp_min(0)
    if kind == 'relu6':
        return x.clamp(0, 6)
    return hard_swish(x)


def batch_norm(state, prefix, x):
    """Inference BN from the running statistics: (x - mean) / sqrt(var + eps) * weight + bias."""
    shape = (1, -1, 1, 1)
    scale = state[prefix + '.weight'].view(shape) / (state[prefix + '.running_var'].view(shape) + BN_EPS).sqrt()
    return (x - state[prefix + '.running_mean'].view(shape)) * scale + state[prefix + '.bias'].view(shape)


def tf_same_pads(size, kernel, stride, dilation):
    """(before, after) of TensorFlow's "same" padding: total (k-1)·d - (size-1) mod stride, the odd pixel after."""
    total = max((kernel - 1) * dilation - (size - 1) % stride, 0)
    return total // 2, total - total // 2


def conv(state, prefix, x, stride=1, dilation=1, groups=1, same=False):
    """The conv `prefix.weight` (and `prefix.bias` if present); `same`: TensorFlow's "same" padding for this
    input size, else the symmetric (k-1)·d/2."""
    weight = state[prefix + '.weight']
    kernel = weight.shape[-1]
    if same:
        top, bottom = tf_same_pads(x.shape[2], kernel, stride, dilation)
        left, right = tf_same_pads(x.shape[3], kernel, stride, dilation)
        x = F.pad(x, (left, right, top, bottom))
        padding = 0
    else:
        padding = (kernel - 1) // 2 * dilation
    return F.conv2d(x, weight, state.get(prefix + '.bias'), stride, padding, dilation, groups)


def mobilenetv3_forward(state, x, arch):
    """CIRKDv2's MobileNetV3 at output stride 8 from its backbone-local state dict: the last layer's output."""
    blocks, _ = MOBILENETV3[arch]
    x = hard_swish(batch_norm(state, 'layer0.bn', conv(state, 'layer0.conv', x, stride=2, same=True)))
    for index, (_, mid, _, se, act, stride, dilation, residual, same) in enumerate(blocks, start=1):
        name = 'layer%d' % index
        out = x
        if name + '.expand_conv.conv.weight' in state:
            out = activate(batch_norm(state, name + '.expand_conv.bn', conv(state, name + '.expand_conv.conv', out)),
                           act)
        out = conv(state, name + '.depthwise_conv.conv', out, stride, dilation, groups=mid, same=same)
        out = activate(batch_norm(state, name + '.depthwise_conv.bn', out), act)
        if se:
            gate = out.mean(dim=(2, 3), keepdim=True)
            gate = conv(state, name + '.se.conv1.conv', gate).clamp_min(0)
            gate = ((conv(state, name + '.se.conv2.conv', gate) + 3) / 6).clamp(0, 1)
            out = out * gate
        out = batch_norm(state, name + '.linear_conv.bn', conv(state, name + '.linear_conv.conv', out))
        x = x + out if residual else out
    last = 'layer%d' % (len(blocks) + 1)
    return hard_swish(batch_norm(state, last + '.bn', conv(state, last + '.conv', x)))


def ssseg_mobilenetv2_forward(state, x):
    """sssegmentation's MobileNetV2 at output stride 8 from its backbone-local state dict."""
    x = batch_norm(state, 'conv1.bn', conv(state, 'conv1.conv', x, stride=2)).clamp(0, 6)
    for layer, block, in_ch, expansion, _, stride, dilation in SSSEG_MOBILENETV2:
        name = 'layer%d.%d.conv' % (layer, block)
        out, position = x, 0
        if expansion != 1:
            out = batch_norm(state, '%s.0.bn' % name, conv(state, '%s.0.conv' % name, out)).clamp(0, 6)
            position = 1
        out = conv(state, '%s.%d.conv' % (name, position), out, stride, dilation, groups=in_ch * expansion)
        out = batch_norm(state, '%s.%d.bn' % (name, position), out).clamp(0, 6)
        project = '%s.%d' % (name, position + 1)
        out = batch_norm(state, project + '.bn', conv(state, project + '.conv', out))
        x = x + out if x.shape == out.shape and stride == 1 else out
    return x


def psp_head_forward(state, x):
    """CIRKD's mobile PSP head (keys `head.psp.conv1..4`, `head.block`, `head.classifier`): (logits, features)."""
    def conv_bn_relu(prefix, t):
        return batch_norm(state, prefix + '.1', conv(state, prefix + '.0', t)).clamp_min(0)
    size = x.shape[2:]
    branches = [x]
    for i, bins in enumerate((1, 2, 3, 6), start=1):
        pooled = conv_bn_relu('head.psp.conv%d' % i, F.adaptive_avg_pool2d(x, bins))
        branches.append(F.interpolate(pooled, size, mode='bilinear', align_corners=True))
    features = conv_bn_relu('head.block', torch.cat(branches, dim=1))
    return conv(state, 'head.classifier', features), features


def _bn_shapes(prefix, channels):
    return [(prefix + '.weight', (channels,)), (prefix + '.bias', (channels,)),
            (prefix + '.running_mean', (channels,)), (prefix + '.running_var', (channels,)),
            (prefix + '.num_batches_tracked', ())]


def mobilenetv3_shapes(arch):
    """Every state-dict key of CIRKDv2's MobileNetV3 with its shape, in order."""
    blocks, last_ch = MOBILENETV3[arch]
    shapes = [('layer0.conv.weight', (16, 3, 3, 3))] + _bn_shapes('layer0.bn', 16)
    in_ch = 16
    for index, (kernel, mid, out, se, *_) in enumerate(blocks, start=1):
        name = 'layer%d' % index
        if mid != in_ch:
            shapes += [(name + '.expand_conv.conv.weight', (mid, in_ch, 1, 1))]
            shapes += _bn_shapes(name + '.expand_conv.bn', mid)
        shapes += [(name + '.depthwise_conv.conv.weight', (mid, 1, kernel, kernel))]
        shapes += _bn_shapes(name + '.depthwise_conv.bn', mid)
        if se:
            squeezed = se_width(mid)
            shapes += [(name + '.se.conv1.conv.weight', (squeezed, mid, 1, 1)),
                       (name + '.se.conv1.conv.bias', (squeezed,)),
                       (name + '.se.conv2.conv.weight', (mid, squeezed, 1, 1)),
                       (name + '.se.conv2.conv.bias', (mid,))]
        shapes += [(name + '.linear_conv.conv.weight', (out, mid, 1, 1))] + _bn_shapes(name + '.linear_conv.bn', out)
        in_ch = out
    last = 'layer%d' % (len(blocks) + 1)
    shapes += [(last + '.conv.weight', (last_ch, in_ch, 1, 1))] + _bn_shapes(last + '.bn', last_ch)
    return OrderedDict(shapes)


def ssseg_mobilenetv2_shapes():
    """Every state-dict key of sssegmentation's MobileNetV2 with its shape, in order."""
    shapes = [('conv1.conv.weight', (32, 3, 3, 3))] + _bn_shapes('conv1.bn', 32)
    for layer, block, in_ch, expansion, out, _, _ in SSSEG_MOBILENETV2:
        name = 'layer%d.%d.conv' % (layer, block)
        hidden = in_ch * expansion
        convs = [(hidden, 1, 3)] if expansion == 1 else [(hidden, in_ch, 1), (hidden, 1, 3)]
        convs.append((out, hidden, 1))
        for position, (rows, cols, kernel) in enumerate(convs):
            shapes += [('%s.%d.conv.weight' % (name, position), (rows, cols, kernel, kernel))]
            shapes += _bn_shapes('%s.%d.bn' % (name, position), rows)
    return OrderedDict(shapes)
