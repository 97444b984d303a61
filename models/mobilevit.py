"""MobileViT backbones (xx_small, x_small, small) dilated to output stride 8, in CIRKDv2's key layout.

MobileViT is from S. Mehta and M. Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly
Vision Transformer", ICLR 2022, https://arxiv.org/abs/2110.02178. This is the variant of CIRKDv2
(winycg/CIRKD, models/base_models/mobilevit.py with models/base_models/irconv.py), itself written after
mmpretrain's (open-mmlab/mmpretrain, mmpretrain/models/backbones/mobilevit.py), whose ImageNet files it loads.
What CIRKDv2 changed from the classification network, kept here because its released segmentation
checkpoints were trained that way:

- stages 3 and 4 keep stride 1 (output stride 8 instead of 32); the depthwise 3x3 conv of each of these
  stages' inverted residual is dilated by 2 and 4 instead, nothing else is dilated;
- `conv_proj` (1x1 conv + BN) of the MobileViT block has no activation (mmpretrain's has a Swish).

The network: `stem` (3x3 conv, stride 2), `layers.0..4` (two MobileNetV2 stages, then three stages of one
inverted residual and one MobileViT block), `conv_1x1_exp` (1x1 conv to 4x the channels). No conv has a bias;
every one but the block's 1x1 conv to the transformer width is followed by a BN (the caller's `norm_layer`;
CIRKDv2 hard-codes SyncBatchNorm). Activations are Swish (SiLU). A MobileViT block unfolds its map into 2x2
patches, runs pre-norm transformer layers (4 heads) over the B*4 sequences of same-position pixels (one token
per patch), folds back and fuses with its input.
"""
from collections import OrderedDict, namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import plain_layout

# A MobileNetV2 stage: `blocks` inverted residuals, the first with `stride`.
MV2Stage = namedtuple('MV2Stage', 'out_channels stride blocks expand')
# A MobileViT stage: an inverted residual (`stride`, its depthwise conv dilated by `dilation`), then a MobileViT
# block with `layers` transformer layers of width `dim` and FFN width `ffn_dim`.
ViTStage = namedtuple('ViTStage', 'out_channels stride dim ffn_dim layers expand dilation')

# CIRKDv2's settings: mmpretrain's, with stages 3 and 4 at stride 1 and dilated 2 and 4.
ARCH_SETTINGS = {
    'xx_small': (MV2Stage(16, 1, 1, 2), MV2Stage(24, 2, 3, 2), ViTStage(48, 2, 64, 128, 2, 2, 1),
                 ViTStage(64, 1, 80, 160, 4, 2, 2), ViTStage(80, 1, 96, 192, 3, 2, 4)),
    'x_small': (MV2Stage(32, 1, 1, 4), MV2Stage(48, 2, 3, 4), ViTStage(64, 2, 96, 192, 2, 4, 1),
                ViTStage(80, 1, 120, 240, 4, 4, 2), ViTStage(96, 1, 144, 288, 3, 4, 4)),
    'small': (MV2Stage(32, 1, 1, 4), MV2Stage(64, 2, 3, 4), ViTStage(96, 2, 144, 288, 2, 4, 1),
              ViTStage(128, 1, 192, 384, 4, 4, 2), ViTStage(160, 1, 240, 480, 3, 4, 4)),
}
STEM_CHANNELS = 16
LAST_EXPANSION = 4
NUM_HEADS = 4
PATCH_SIZE = 2


def conv_norm_act(in_ch, out_ch, kernel_size, norm_layer, stride=1, dilation=1, groups=1, activation=True):
    """`conv` (no bias, padding keeping the size at stride 1), `bn` and, if asked, a Swish: the names of the
    released files."""
    parts = OrderedDict(conv=nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=dilation * (kernel_size // 2),
                                       dilation=dilation, groups=groups, bias=False))
    if norm_layer is not None:
        parts['bn'] = norm_layer(out_ch)
    if activation:
        parts['act'] = nn.SiLU()
    return nn.Sequential(parts)


class InvertedResidual(nn.Module):
    """MobileNetV2 block with Swish: `conv.0` 1x1 expand, `conv.1` 3x3 depthwise (stride, dilation), `conv.2` 1x1
    project without activation; the input is added back iff the stride is 1 and the channels do not change."""

    def __init__(self, in_ch, out_ch, stride, expand, norm_layer, dilation=1):
        super().__init__()
        hidden = int(round(in_ch * expand))
        parts = [conv_norm_act(in_ch, hidden, 1, norm_layer)] if expand != 1 else []
        parts += [conv_norm_act(hidden, hidden, 3, norm_layer, stride=stride, dilation=dilation, groups=hidden),
                  conv_norm_act(hidden, out_ch, 1, norm_layer, activation=False)]
        self.conv = nn.Sequential(*parts)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class SelfAttention(nn.Module):
    """nn.MultiheadAttention (with biases) over (batch, tokens, dim) as `attn`, so that the keys read
    `attn.attn.in_proj_weight` (rows q | k | v), `attn.attn.in_proj_bias`, `attn.attn.out_proj.*`."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=True, batch_first=True)

    def forward(self, x):
        # Without the averaged attention map (which nothing reads) PyTorch may use its fused attention kernels;
        # the result equals the original's explicit softmax(q k^T / sqrt(d)) v up to rounding.
        return self.attn(x, x, x, need_weights=False)[0]


class FeedForward(nn.Module):
    """Linear (`layers.0.0`), Swish, Linear (`layers.1`): mmcv's FFN names, without its (zero) dropouts."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU()), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.layers(x)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then + ffn(ln2(x)). LayerNorm eps 1e-5, no dropout."""

    def __init__(self, dim, ffn_dim, num_heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


def unfold_patches(x, patch):
    """(B, C, H, W) with H, W multiples of `patch` -> (B * patch^2, N, C): one sequence per image and position
    inside the patch (row-major), holding the N = H/patch * W/patch patches in row-major order."""
    b, c, h, w = x.shape
    nh, nw = h // patch, w // patch
    x = x.reshape(b, c, nh, patch, nw, patch).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(b * patch * patch, nh * nw, c)


def fold_patches(tokens, batch, height, width, patch):
    """The inverse of `unfold_patches`: (B * patch^2, N, C) -> (B, C, height, width)."""
    nh, nw = height // patch, width // patch
    x = tokens.reshape(batch, patch, patch, nh, nw, -1).permute(0, 5, 3, 1, 4, 2)
    return x.reshape(batch, -1, height, width)


class MobileViTBlock(nn.Module):
    """Local 3x3 conv + 1x1 conv to `dim`, transformer layers over 2x2-patch sequences and a final LayerNorm
    (`global_rep`), 1x1 conv back to C + BN (`conv_proj`), then 3x3 conv + BN + Swish on the concatenation
    [block input, conv_proj output] (`conv_fusion`; no residual add).

    A map with an odd side is resized bilinearly (align_corners=False) up to the next even size before
    unfolding and back after folding, as in the original."""

    def __init__(self, channels, dim, ffn_dim, num_layers, norm_layer, num_heads=NUM_HEADS, patch=PATCH_SIZE):
        super().__init__()
        self.patch = patch
        self.local_rep = nn.Sequential(conv_norm_act(channels, channels, 3, norm_layer),
                                       conv_norm_act(channels, dim, 1, None, activation=False))
        self.global_rep = nn.Sequential(*[TransformerLayer(dim, ffn_dim, num_heads) for _ in range(num_layers)],
                                        nn.LayerNorm(dim, eps=1e-5))
        self.conv_proj = conv_norm_act(dim, channels, 1, norm_layer, activation=False)
        self.conv_fusion = conv_norm_act(2 * channels, channels, 3, norm_layer)

    def forward(self, x):
        local = self.local_rep(x)
        batch, _, height, width = local.shape
        padded_h = -(-height // self.patch) * self.patch
        padded_w = -(-width // self.patch) * self.patch
        resized = (padded_h, padded_w) != (height, width)
        if resized:
            local = F.interpolate(local, size=(padded_h, padded_w), mode='bilinear', align_corners=False)
        tokens = self.global_rep(unfold_patches(local, self.patch))
        folded = fold_patches(tokens, batch, padded_h, padded_w, self.patch)
        if resized:
            folded = F.interpolate(folded, size=(height, width), mode='bilinear', align_corners=False)
        return self.conv_fusion(torch.cat([x, self.conv_proj(folded)], dim=1))


def _rename_mmpretrain(key):
    # mmpretrain's attention is a fused `qkv` Linear (rows q | k | v, heads contiguous, as in_proj_weight) and
    # a `proj` Linear: nn.MultiheadAttention's in_proj and out_proj.
    return key.replace('.attn.qkv.', '.attn.attn.in_proj_').replace('.attn.proj.', '.attn.attn.out_proj.')


def mmpretrain_layout(state, expected):
    """mmpretrain's MobileViT files (`{'state_dict': {'backbone.<key>': ...}}` plus a classification `head.*`):
    CIRKDv2's names except the attention, `attn.qkv.*` and `attn.proj.*`. None for a file without them."""
    best = None
    for prefix in ('backbone.', ''):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not any('.attn.qkv.' in k for k in stripped):
            continue
        renamed = {_rename_mmpretrain(k): v for k, v in stripped.items()}
        if best is None or sum(k in expected for k in renamed) > sum(k in expected for k in best):
            best = renamed
    return best


class MobileViT(nn.Module):
    """MobileViT `arch` ('xx_small', 'x_small', 'small') at output stride 8; `forward` returns
    [conv_1x1_exp output] (320 / 384 / 640 channels at /8). Weights keep PyTorch's default initialisation, as
    in CIRKDv2; they are meant to come from an ImageNet file."""

    # mmpretrain's ImageNet files (those CIRKDv2 names), and CIRKDv2's own names (a backbone saved by CIRKDv2,
    # or the `pretrained.` part of a whole network).
    imagenet_layouts = (('mmpretrain MobileViT', mmpretrain_layout),
                        ('CIRKD MobileViT', plain_layout(('', 'pretrained.', 'backbone.'))))

    def __init__(self, arch, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.arch = arch
        self.stem = conv_norm_act(3, STEM_CHANNELS, 3, norm_layer, stride=2)
        in_ch = STEM_CHANNELS
        stride = 2
        stages = []
        for stage in ARCH_SETTINGS[arch]:
            if isinstance(stage, MV2Stage):
                blocks = [InvertedResidual(in_ch if i == 0 else stage.out_channels, stage.out_channels,
                                           stage.stride if i == 0 else 1, stage.expand, norm_layer)
                          for i in range(stage.blocks)]
            else:
                blocks = [InvertedResidual(in_ch, stage.out_channels, stage.stride, stage.expand, norm_layer,
                                           dilation=stage.dilation),
                          MobileViTBlock(stage.out_channels, stage.dim, stage.ffn_dim, stage.layers, norm_layer)]
            stages.append(nn.Sequential(*blocks))
            in_ch = stage.out_channels
            stride *= stage.stride
        self.layers = nn.Sequential(*stages)
        self.conv_1x1_exp = conv_norm_act(in_ch, LAST_EXPANSION * in_ch, 1, norm_layer)
        self.out_channels = [LAST_EXPANSION * in_ch]
        self.out_strides = [stride]

    @property
    def checkpoint_root(self):
        return self

    def forward(self, x):
        return [self.conv_1x1_exp(self.layers(self.stem(x)))]

    def extra_repr(self):
        return f'arch={self.arch}, output_stride={self.out_strides[-1]}'


def mobilevit_xx_small(norm_layer=nn.BatchNorm2d):
    return MobileViT('xx_small', norm_layer)


def mobilevit_x_small(norm_layer=nn.BatchNorm2d):
    return MobileViT('x_small', norm_layer)


def mobilevit_small(norm_layer=nn.BatchNorm2d):
    return MobileViT('small', norm_layer)
