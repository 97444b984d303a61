"""Dilated backbones with output stride 8: ResNet "v1s" (deep stem), ResNet "vanilla" (7x7 stem) and MobileNetV2.

Module names follow the released CIRKD checkpoints: the ResNet's state dict keys are
`conv1.weight`, `layer1.0.conv1.weight`, ...; MobileNetV2's are `net.features.<i>....`. Every backbone of the
model zoo states:

- `out_channels` / `out_strides`: channels and stride of each stage output that `forward` returns (a list; the
  segmentation heads use the last one, the auxiliary head the one before it);
- `checkpoint_root`: the sub-module whose keys an ImageNet backbone file holds;
- `imagenet_layouts`: the layouts of ImageNet files it reads, tried in order (see models/checkpoint.py).
"""
import torch.nn as nn

from .checkpoint import plain_layout


def conv3x3(in_ch, out_ch, stride=1, dilation=1, groups=1):
    """3x3 convolution without bias whose padding equals its dilation (keeps the size at stride 1)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=False)


def conv1x1(in_ch, out_ch, stride=1):
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def init_backbone_weights(module):
    # He init on the fan-out, BN to identity: the ImageNet recipe the released backbones came from.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv1 3x3 (carries the stride, dilation `first_dilation`) -> conv2 3x3 (dilation `dilation`)."""
    expansion = 1

    def __init__(self, in_ch, planes, stride, first_dilation, dilation, downsample, norm_layer):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride, first_dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """conv1 1x1 -> conv2 3x3 (carries the stride, dilation `first_dilation`) -> conv3 1x1 (x4)."""
    expansion = 4

    def __init__(self, in_ch, planes, stride, first_dilation, dilation, downsample, norm_layer):
        super().__init__()
        del dilation  # a bottleneck has a single 3x3, dilated by `first_dilation`
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNetV1s(nn.Module):
    """ResNet with layer3/layer4 dilated 2/4 instead of strided (stride 8), on the 3-conv deep stem ("v1s",
    `deep_stem=True`) or on the 7x7 stem of the original ResNet ("vanilla", also torchvision's key names)."""

    # The released files of CIRKD, and torchvision's (the vanilla ResNets have its names); a whole segmentation
    # network's `pretrained.` keys are read too.
    imagenet_layouts = (('CIRKD / torchvision ResNet', plain_layout(('', 'pretrained.', 'backbone.'))),)

    def __init__(self, block, depths, norm_layer=nn.BatchNorm2d, deep_stem=True):
        super().__init__()
        self.deep_stem = deep_stem
        if deep_stem:
            self.conv1 = conv3x3(3, 64, stride=2)
            self.bn1 = norm_layer(64)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(64, 64)
            self.bn2 = norm_layer(64)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv3 = conv3x3(64, 128)
            self.bn3 = norm_layer(128)
            self.relu3 = nn.ReLU(inplace=True)
            self._in_ch = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(64)
            self.relu1 = nn.ReLU(inplace=True)
            self._in_ch = 64
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, depths[0], 1, 1, norm_layer)
        self.layer2 = self._make_stage(block, 128, depths[1], 2, 1, norm_layer)
        self.layer3 = self._make_stage(block, 256, depths[2], 1, 2, norm_layer)
        self.layer4 = self._make_stage(block, 512, depths[3], 1, 4, norm_layer)
        del self._in_ch
        self.out_channels = [64 * block.expansion, 128 * block.expansion,
                             256 * block.expansion, 512 * block.expansion]
        self.out_strides = [4, 8, 8, 8]
        init_backbone_weights(self)

    @property
    def checkpoint_root(self):
        return self

    def _make_stage(self, block, planes, depth, stride, dilation, norm_layer):
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(conv1x1(self._in_ch, out_ch, stride), norm_layer(out_ch))
        # The released weights were trained with this rule: the first block of a stage dilated by 2
        # keeps dilation 1 in its strided 3x3, a stage dilated by 4 starts with 2.
        first_dilation = 2 if dilation == 4 else 1
        blocks = [block(self._in_ch, planes, stride, first_dilation, dilation, downsample, norm_layer)]
        self._in_ch = out_ch
        blocks += [block(out_ch, planes, 1, dilation, dilation, None, norm_layer) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu2(self.bn2(self.conv2(x)))
            x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def resnet18_v1s(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(BasicBlock, (2, 2, 2, 2), norm_layer)


def resnet50_v1s(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(Bottleneck, (3, 4, 6, 3), norm_layer)


def resnet101_v1s(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(Bottleneck, (3, 4, 23, 3), norm_layer)


def resnet18_vanilla(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(BasicBlock, (2, 2, 2, 2), norm_layer, deep_stem=False)


def resnet34_vanilla(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(BasicBlock, (3, 4, 6, 3), norm_layer, deep_stem=False)


def resnet50_vanilla(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(Bottleneck, (3, 4, 6, 3), norm_layer, deep_stem=False)


def resnet101_vanilla(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(Bottleneck, (3, 4, 23, 3), norm_layer, deep_stem=False)


def resnet152_vanilla(norm_layer=nn.BatchNorm2d):
    return ResNetV1s(Bottleneck, (3, 8, 36, 3), norm_layer, deep_stem=False)


class InvertedResidual(nn.Module):
    """MobileNetV2 block; `conv` indices match the released weights (no activation after project)."""

    def __init__(self, in_ch, out_ch, stride, dilation, expand_ratio, norm_layer):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        layers = []
        if expand_ratio != 1:
            layers += [conv1x1(in_ch, hidden), norm_layer(hidden), nn.ReLU6(inplace=True)]
        layers += [conv3x3(hidden, hidden, stride, dilation, groups=hidden), norm_layer(hidden),
                   nn.ReLU6(inplace=True),
                   conv1x1(hidden, out_ch), norm_layer(out_ch)]
        self.conv = nn.Sequential(*layers)
        # Decided on the undilated network's stride; the blocks whose stride is removed below change
        # their channel count anyway, so this equals "stride 1 and in == out" after dilation too.
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


# (expansion t, channels c, repeats n, first stride s) of MobileNetV2, without the final 1280 conv.
MOBILENETV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _mobilenet_dilation(index, stride):
    """(stride, dilation) of the 3x3 conv of `features.<index>` in the stride-8 network."""
    if 7 <= index <= 13:
        return (1, 1) if stride == 2 else (stride, 2)
    if index >= 14:
        return (1, 2) if stride == 2 else (stride, 4)
    return stride, 1


class _MobileNetV2Features(nn.Module):
    """Holds `features` so that the state dict keys read `net.features.<i>...` as released."""

    def __init__(self, norm_layer):
        super().__init__()
        layers = [nn.Sequential(conv3x3(3, 32, stride=2), norm_layer(32), nn.ReLU6(inplace=True))]
        in_ch = 32
        for t, c, n, s in MOBILENETV2_SETTING:
            for i in range(n):
                stride, dilation = _mobilenet_dilation(len(layers), s if i == 0 else 1)
                layers.append(InvertedResidual(in_ch, c, stride, dilation, t, norm_layer))
                in_ch = c
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class MobileNetV2Dilated(nn.Module):
    """MobileNetV2 features 0..17 with features.7.. and features.14.. dilated: 320 channels at stride 8."""

    imagenet_layouts = (('CIRKD MobileNetV2', plain_layout(('', 'pretrained.net.', 'net.', 'backbone.'))),)

    def __init__(self, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.net = _MobileNetV2Features(norm_layer)
        self.out_channels = [320]
        self.out_strides = [8]
        init_backbone_weights(self)

    @property
    def checkpoint_root(self):
        return self.net

    def forward(self, x):
        return [self.net(x)]


def mobilenetv2_dilated(norm_layer=nn.BatchNorm2d):
    return MobileNetV2Dilated(norm_layer)
