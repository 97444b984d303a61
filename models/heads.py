"""Segmentation heads shared by the ResNet and MobileNetV2 networks: DeepLabV3 (ASPP), PSP, FCN aux.

Every head's `forward` returns `(logits, features)`; `features` is the tensor the final 1x1
classifier sees (after the head's Dropout, as in the original code: identical in eval mode).
Sequential indices follow the released checkpoints (`block.0` conv, `.1` BN, `.2` ReLU,
`.3` Dropout, `.4` classifier).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import conv1x1, conv3x3


def upsample_to(x, size):
    """Bilinear resize with align_corners=True, the convention of the original networks."""
    return F.interpolate(x, size=size, mode='bilinear', align_corners=True)


def conv_bn_relu(in_ch, out_ch, kernel_size, norm_layer, dilation=1):
    conv = conv1x1(in_ch, out_ch) if kernel_size == 1 else conv3x3(in_ch, out_ch, dilation=dilation)
    return [conv, norm_layer(out_ch), nn.ReLU(inplace=True)]


class ASPPConv(nn.Module):
    def __init__(self, in_ch, out_ch, rate, norm_layer):
        super().__init__()
        self.block = nn.Sequential(*conv_bn_relu(in_ch, out_ch, 3, norm_layer, dilation=rate))

    def forward(self, x):
        return self.block(x)


class ASPPPooling(nn.Module):
    """Image-level branch: global average -> 1x1 conv + BN + ReLU -> spread back over the map."""

    def __init__(self, in_ch, out_ch, norm_layer):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_ch, out_ch, 1, norm_layer))

    def forward(self, x):
        return upsample_to(self.gap(x), x.shape[2:])


class ASPP(nn.Module):
    def __init__(self, in_ch, inner, norm_layer, rates=(12, 24, 36)):
        super().__init__()
        self.b0 = nn.Sequential(*conv_bn_relu(in_ch, inner, 1, norm_layer))
        self.b1 = ASPPConv(in_ch, inner, rates[0], norm_layer)
        self.b2 = ASPPConv(in_ch, inner, rates[1], norm_layer)
        self.b3 = ASPPConv(in_ch, inner, rates[2], norm_layer)
        self.b4 = ASPPPooling(in_ch, inner, norm_layer)
        self.project = nn.Sequential(*conv_bn_relu(5 * inner, inner, 1, norm_layer), nn.Dropout(0.5))

    def forward(self, x):
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3Head(nn.Module):
    def __init__(self, in_ch, num_class, inner, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.aspp = ASPP(in_ch, inner, norm_layer)
        self.block = nn.Sequential(*conv_bn_relu(inner, inner, 3, norm_layer), nn.Dropout(0.1),
                                   nn.Conv2d(inner, num_class, 1))

    def forward(self, x):
        features = self.block[:4](self.aspp(x))
        return self.block[4](features), features


class PyramidPooling(nn.Module):
    """Average to 1, 2, 3 and 6 bins, reduce to C/4 channels each, upsample, concat with the input."""
    bins = (1, 2, 3, 6)

    def __init__(self, in_ch, norm_layer):
        super().__init__()
        out_ch = in_ch // 4
        # conv1..conv4 are the released names, one per bin size.
        for i, _ in enumerate(self.bins, start=1):
            self.add_module('conv%d' % i, nn.Sequential(*conv_bn_relu(in_ch, out_ch, 1, norm_layer)))

    def forward(self, x):
        size = x.shape[2:]
        pooled = [upsample_to(getattr(self, 'conv%d' % i)(F.adaptive_avg_pool2d(x, bins)), size)
                  for i, bins in enumerate(self.bins, start=1)]
        return torch.cat([x] + pooled, dim=1)


class PSPHead(nn.Module):
    def __init__(self, in_ch, num_class, out_ch, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.psp = PyramidPooling(in_ch, norm_layer)
        self.block = nn.Sequential(*conv_bn_relu(2 * in_ch, out_ch, 3, norm_layer), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(out_ch, num_class, 1)

    def forward(self, x):
        features = self.block(self.psp(x))
        return self.classifier(features), features


class FCNHead(nn.Module):
    """Auxiliary head on c3: 3x3 conv to C/4 + BN + ReLU + Dropout(0.1) + 1x1 classifier."""

    def __init__(self, in_ch, num_class, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inner = in_ch // 4
        self.block = nn.Sequential(*conv_bn_relu(in_ch, inner, 3, norm_layer), nn.Dropout(0.1),
                                   nn.Conv2d(inner, num_class, 1))

    def forward(self, x):
        return self.block(x)
