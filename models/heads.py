"""Segmentation heads shared by the CNN networks: DeepLabV3 (ASPP), PSP, UPerNet, FCN aux.

A head's `forward(stages)` takes the backbone's stage outputs and returns `(logits, features)`; `features`
is the tensor the final 1x1 classifier sees (after the head's Dropout, as in the original code: identical
in eval mode). Each head states `feature_channels` and `output_stride`. Sequential indices follow the
released checkpoints (`block.0` conv, `.1` BN, `.2` ReLU, `.3` Dropout, `.4` classifier).
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
    """ASPP on the last stage, a 3x3 conv block (the features), a 1x1 classifier; `inner` channels wide."""

    def __init__(self, in_ch, num_class, inner, norm_layer=nn.BatchNorm2d, output_stride=8):
        super().__init__()
        self.aspp = ASPP(in_ch, inner, norm_layer)
        self.block = nn.Sequential(*conv_bn_relu(inner, inner, 3, norm_layer), nn.Dropout(0.1),
                                   nn.Conv2d(inner, num_class, 1))
        self.feature_channels = inner
        self.output_stride = output_stride

    def forward(self, stages):
        features = self.block[:4](self.aspp(stages[-1]))
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
    """Pyramid pooling on the last stage, a 3x3 conv block to `out_ch` channels (the features), a classifier."""

    def __init__(self, in_ch, num_class, out_ch, norm_layer=nn.BatchNorm2d, output_stride=8):
        super().__init__()
        self.psp = PyramidPooling(in_ch, norm_layer)
        self.block = nn.Sequential(*conv_bn_relu(2 * in_ch, out_ch, 3, norm_layer), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(out_ch, num_class, 1)
        self.feature_channels = out_ch
        self.output_stride = output_stride

    def forward(self, stages):
        features = self.block(self.psp(stages[-1]))
        return self.classifier(features), features


class UPerNetHead(nn.Module):
    """UPerNet (Xiao et al., ECCV 2018) as CIRKD builds it on a dilated backbone.

    A pyramid pooling module on the last stage (each bin upsampled to the stage's size first, then a 1x1 conv
    to 512 channels: 512 even for the lite head), `ppm_last_conv` to `fpn_dim` channels; a top-down pass adding
    each earlier stage's lateral 1x1 conv (`fpn_in`) and smoothing it with a 3x3 conv (`fpn_out`); the pyramid
    levels and the pooled map upsampled to the first stage's size and fused by a 3x3 conv of stride 2
    (`conv_last.0`), so that features and logits are at twice the first stage's stride (1/8 on the ResNets);
    `conv_last.1` the classifier. Every upsampling here is bilinear with align_corners=False, as in CIRKD.
    """
    pool_scales = (1, 2, 3, 6)
    ppm_width = 512

    def __init__(self, stage_channels, stage_strides, num_class, fpn_dim, norm_layer=nn.BatchNorm2d):
        super().__init__()
        top = stage_channels[-1]
        self.ppm_conv = nn.ModuleList(nn.Sequential(*conv_bn_relu(top, self.ppm_width, 1, norm_layer))
                                      for _ in self.pool_scales)
        self.ppm_last_conv = nn.Sequential(
            *conv_bn_relu(top + len(self.pool_scales) * self.ppm_width, fpn_dim, 3, norm_layer))
        self.fpn_in = nn.ModuleList(nn.Sequential(*conv_bn_relu(channels, fpn_dim, 1, norm_layer))
                                    for channels in stage_channels[:-1])
        self.fpn_out = nn.ModuleList(nn.Sequential(nn.Sequential(*conv_bn_relu(fpn_dim, fpn_dim, 3, norm_layer)))
                                     for _ in stage_channels[:-1])
        fuse = conv_bn_relu(len(stage_channels) * fpn_dim, fpn_dim, 3, norm_layer)
        fuse[0] = conv3x3(len(stage_channels) * fpn_dim, fpn_dim, stride=2)
        self.conv_last = nn.Sequential(nn.Sequential(*fuse), nn.Conv2d(fpn_dim, num_class, 1))
        self.feature_channels = fpn_dim
        self.output_stride = 2 * stage_strides[0]

    def forward(self, stages):
        top = stages[-1]
        size = top.shape[2:]
        pooled = [conv(_resize(F.adaptive_avg_pool2d(top, scale), size))
                  for scale, conv in zip(self.pool_scales, self.ppm_conv, strict=True)]
        f = self.ppm_last_conv(torch.cat([top] + pooled, dim=1))
        levels = [f]
        for i in reversed(range(len(stages) - 1)):
            lateral = self.fpn_in[i](stages[i])
            f = lateral + _resize(f, lateral.shape[2:])
            levels.append(self.fpn_out[i](f))
        levels.reverse()  # finest first; the last is the pooled map itself
        size = levels[0].shape[2:]
        fused = torch.cat([levels[0]] + [_resize(level, size) for level in levels[1:]], dim=1)
        features = self.conv_last[0](fused)
        return self.conv_last[1](features), features


def _resize(x, size):
    """Bilinear resize with align_corners=False (UPerNet's convention); nothing to do at the same size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class FCNHead(nn.Module):
    """Auxiliary head on c3: 3x3 conv to C/4 + BN + ReLU + Dropout(0.1) + 1x1 classifier."""

    def __init__(self, in_ch, num_class, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inner = in_ch // 4
        self.block = nn.Sequential(*conv_bn_relu(in_ch, inner, 3, norm_layer), nn.Dropout(0.1),
                                   nn.Conv2d(inner, num_class, 1))

    def forward(self, x):
        return self.block(x)
