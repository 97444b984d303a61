"""SegFormer on the Mix Transformer encoders MiT-B0 .. MiT-B5, in CIRKDv2's layout and in the official release's.

Paper: E. Xie, W. Wang, Z. Yu, A. Anandkumar, J. M. Alvarez, P. Luo, "SegFormer: Simple and Efficient Design for
Semantic Segmentation with Transformers", NeurIPS 2021, https://arxiv.org/abs/2105.15203.
Stochastic depth (DropPath): G. Huang, Y. Sun, Z. Liu, D. Sedra, K. Q. Weinberger, "Deep Networks with Stochastic
Depth", ECCV 2016, https://arxiv.org/abs/1603.09382.

The network is CIRKD's (winycg/CIRKD, models/segformer.py), whose encoder is NVlabs' (NVlabs/SegFormer,
mmseg/models/backbones/mix_transformer.py) and whose decoder follows NVlabs' all-MLP head
(mmseg/models/decode_heads/segformer_head.py). The state dict has no prefix, so that CIRKDv2's released files
and NVlabs' ImageNet files (`mit_b0.pth` .. `mit_b5.pth`) load unchanged:

- encoder: `patch_embed{1..4}.proj/.norm`, then per stage `block{i}.{j}.norm1`, `.attn.q`, `.attn.kv`,
  `.attn.sr` / `.attn.norm` (spatial reduction, stages 1-3), `.attn.proj`, `.norm2`, `.mlp.fc1`,
  `.mlp.dwconv.dwconv`, `.mlp.fc2`, and the stage's `norm{i}` (176 tensors for B0);
- decoder: `linear_c4/c3/c2/c1.proj`, `linear_fuse.0` (1x1 conv), `linear_fuse.1` (BN), `linear_pred`.

Numerics (those the released weights were trained with): LayerNorm eps 1e-6 in the blocks and at the stage ends,
1e-5 in the patch embeddings and after the spatial reduction; GELU in its exact erf form; no dropout in the
encoder; DropPath rates rising linearly from 0 to 0.1 over all blocks; bilinear upsampling with
align_corners=False; the decoder concatenates [c4, c3, c2, c1].

The logits and the fused decoder feature are at 1/4 of the input size (never upsampled).

Two decoders:

- CIRKDv2's (`official=False`): the fuse conv has a bias and the dropout before `linear_pred` is 0;
- the official NVlabs release (`official=True`), whose mmsegmentation checkpoints `convert_official_segformer`
  renames: no fuse bias, Dropout2d(0.1) before `linear_pred`, and RGB input scaled by the ImageNet mean and std,
  which the network computes itself from the project's BGR mean-subtracted input (`input_transform`).

What differs from CIRKD: the decoder's BN class comes from the caller (CIRKD takes it as `batchnorm_layer`
too), there is no timm dependency (DropPath and the initialisation are written here), and ImageNet files are
read through `imagenet_layouts` (models/checkpoint.py), which refuses a file that covers too little of the
encoder instead of loading nothing.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset.datasets import MEAN_BGR
from utils.errors import UserError

from .segmentation import InputTransform, SegmentationModel, SegmentationOutput


class MiTConfig(NamedTuple):
    embed_dims: tuple
    depths: tuple
    decoder_dim: int


# Shared by every variant (NVlabs' mit_b0 .. mit_b5).
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
DROP_PATH_RATE = 0.1
STAGE_STRIDES = (4, 8, 16, 32)
# (kernel, stride, padding) of the overlapping patch embedding of each stage.
PATCH_EMBEDS = ((7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1))
BLOCK_NORM_EPS = 1e-6   # norm1, norm2 and the stage-end norm{i}
EMBED_NORM_EPS = 1e-5   # patch_embed{i}.norm and attn.norm (plain nn.LayerNorm in NVlabs' code)
OFFICIAL_DROPOUT = 0.1
# The input the official release was trained on (mmsegmentation's img_norm_cfg, to_rgb=True).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)

MIT_CONFIGS = {
    'MiT_B0': MiTConfig((32, 64, 160, 256), (2, 2, 2, 2), 256),
    'MiT_B1': MiTConfig((64, 128, 320, 512), (2, 2, 2, 2), 256),
    'MiT_B2': MiTConfig((64, 128, 320, 512), (3, 4, 6, 3), 768),
    'MiT_B3': MiTConfig((64, 128, 320, 512), (3, 4, 18, 3), 768),
    'MiT_B4': MiTConfig((64, 128, 320, 512), (3, 8, 27, 3), 768),
    'MiT_B5': MiTConfig((64, 128, 320, 512), (3, 6, 40, 3), 768),
}

# The decoder's sub-modules (their parameters are the "head" of the network).
DECODER_MODULES = ('linear_c1', 'linear_c2', 'linear_c3', 'linear_c4', 'linear_fuse', 'linear_pred')


def init_mit_weights(module):
    """NVlabs' initialisation: Linear weights truncated-normal std 0.02 (cut at +-2), biases 0; LayerNorm 1 / 0;
    convolutions normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out_channels/groups, biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is zeroed with probability `drop_prob` and
    the survivors are scaled by 1 / (1 - drop_prob); the identity in eval mode. The draws come from torch's
    default generator of the tensor's device, so seeding torch makes them reproducible."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        per_sample = (x.shape[0],) + (1,) * (x.dim() - 1)
        survivors = x.new_empty(per_sample).bernoulli_(keep_prob).div_(keep_prob)
        return x * survivors

    def extra_repr(self):
        return f'drop_prob={self.drop_prob:.4f}'


class OverlapPatchEmbed(nn.Module):
    """A strided convolution whose windows overlap (`proj`), then LayerNorm over channels (`norm`); returns the
    tokens (B, H*W, C) in row-major order and the map's (H, W)."""

    def __init__(self, in_ch, embed_dim, kernel_size, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, embed_dim, kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, eps=EMBED_NORM_EPS)

    def forward(self, x):
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a map shrunk `sr_ratio` times per side (a
    strided conv `sr` and a LayerNorm `norm`), the "efficient self-attention" of the paper.

    `kv` gives the keys of all heads, then their values; head h owns channels h*d .. (h+1)*d of each half."""

    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'{dim} channels do not split into {num_heads} heads')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def forward(self, x, height, width):
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).reshape(batch, tokens, self.num_heads, head_dim).permute(0, 2, 1, 3)
        context = x
        if self.sr_ratio > 1:
            grid = x.permute(0, 2, 1).reshape(batch, dim, height, width)
            context = self.norm(self.sr(grid).reshape(batch, dim, -1).permute(0, 2, 1))
        # (B, M, 2C) -> (2, B, heads, M, d): index 0 the keys, 1 the values
        k, v = self.kv(context).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class DepthwiseConv(nn.Module):
    """A 3x3 depthwise conv (`dwconv`) applied to the tokens laid out as their (H, W) map."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, height, width):
        batch, _, dim = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(batch, dim, height, width))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 (C -> 4C), the depthwise 3x3 conv on the map (the encoder's only positional cue), exact GELU, fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, height, width):
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + DropPath(attn(norm1(x))), then x + DropPath(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, sr_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)

    def forward(self, x, height, width):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class TokenProjection(nn.Module):
    """The decoder's per-stage Linear (`proj`, C_i -> D) applied to every position of a (B, C_i, h, w) map."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.proj = nn.Linear(in_ch, out_ch)

    def forward(self, x):
        batch, _, height, width = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return tokens.permute(0, 2, 1).reshape(batch, -1, height, width)


class SegFormer(SegmentationModel):
    """SegFormer: the MiT encoder and the all-MLP decoder with flat (unprefixed) state-dict names; see the module
    docstring. `forward(x, return_stages=False)` returns `SegmentationOutput(logits (/4), features (the fused
    decoder map `_c`, D channels, /4), aux=None, stages=[c1, c2, c3, c4] when asked)`."""

    def __init__(self, variant, num_class, norm_layer=nn.BatchNorm2d, official=False):
        super().__init__()
        if variant not in MIT_CONFIGS:
            raise UserError(f'--backbone {variant!r} is not a MiT encoder; choose one of {", ".join(MIT_CONFIGS)}')
        config = MIT_CONFIGS[variant]
        dims, depths, decoder_dim = config.embed_dims, config.depths, config.decoder_dim
        self.model_name, self.backbone_name = 'segformer', variant
        self.num_class = num_class
        self.official = bool(official)
        self.output_stride = STAGE_STRIDES[0]
        self.feature_channels = decoder_dim
        self.stage_channels = tuple(dims)
        self.stage_strides = STAGE_STRIDES
        self.has_aux = False

        # Registration order gives CIRKD's key order: all patch embeddings, then each stage's blocks and norm,
        # then the decoder (c4 first).
        in_chs = (3,) + tuple(dims[:-1])
        for stage, (in_ch, dim, embed) in enumerate(zip(in_chs, dims, PATCH_EMBEDS, strict=True), 1):
            setattr(self, f'patch_embed{stage}', OverlapPatchEmbed(in_ch, dim, *embed))
        drop_rates = torch.linspace(0, DROP_PATH_RATE, sum(depths), device='cpu').tolist()
        first = 0
        stage_settings = zip(dims, depths, NUM_HEADS, SR_RATIOS, strict=True)
        for stage, (dim, depth, heads, sr_ratio) in enumerate(stage_settings, 1):
            blocks = [TransformerBlock(dim, heads, sr_ratio, drop_rates[first + j]) for j in range(depth)]
            setattr(self, f'block{stage}', nn.ModuleList(blocks))
            setattr(self, f'norm{stage}', nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            first += depth

        for stage in (4, 3, 2, 1):
            setattr(self, f'linear_c{stage}', TokenProjection(dims[stage - 1], decoder_dim))
        # BN follows the fuse conv, so the official head drops the conv's bias; CIRKD kept it.
        self.linear_fuse = nn.Sequential(nn.Conv2d(4 * decoder_dim, decoder_dim, 1, bias=not self.official),
                                         norm_layer(decoder_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(OFFICIAL_DROPOUT if self.official else 0.0)
        self.linear_pred = nn.Conv2d(decoder_dim, num_class, 1)
        self.apply(init_mit_weights)

        if self.official:
            self.input_transform = InputTransform(MEAN_BGR, 'rgb', IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)

    def encode(self, x):
        """The stage outputs [c1, c2, c3, c4] (B, C_i, H/s_i, W/s_i) of the MiT encoder."""
        stages = []
        for stage in range(1, 5):
            tokens, height, width = getattr(self, f'patch_embed{stage}')(x)
            for block in getattr(self, f'block{stage}'):
                tokens = block(tokens, height, width)
            tokens = getattr(self, f'norm{stage}')(tokens)
            x = tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
            stages.append(x)
        return stages

    def decode(self, stages):
        """(logits, fused feature `_c`) of the all-MLP decoder, both at c1's size."""
        c1, c2, c3, c4 = stages
        size = c1.shape[2:]
        projected = [self.linear_c4(c4), self.linear_c3(c3), self.linear_c2(c2)]
        upsampled = [F.interpolate(p, size=size, mode='bilinear', align_corners=False) for p in projected]
        fused = self.linear_fuse(torch.cat(upsampled + [self.linear_c1(c1)], dim=1))
        return self.linear_pred(self.dropout(fused)), fused

    def forward(self, x, return_stages=False):
        stages = self.encode(self.prepare_input(x))
        logits, features = self.decode(stages)
        return SegmentationOutput(logits, features, None, stages if return_stages else None)

    def encoder_keys(self):
        """The state-dict names of the encoder (what an ImageNet MiT file holds)."""
        return [key for key in self.state_dict() if key.split('.', 1)[0] not in DECODER_MODULES]

    def head_parameter_names(self):
        return [name for name, _ in self.named_parameters() if name.split('.', 1)[0] in DECODER_MODULES]

    def imagenet_target(self):
        return self, self.encoder_keys()

    def imagenet_layouts(self):
        """NVlabs' ImageNet files `mit_b*.pth` (flat encoder names plus the classifier `head.*`, which is
        skipped) and the same names under mmsegmentation's `backbone.` (a whole mmseg segmentor's file). A whole
        network's decoder keys are never taken from a backbone file: only its encoder is."""
        encoder = set(self.encoder_keys())
        decoder = set(self.state_dict()) - encoder

        def under(prefix):
            def convert(state, expected):
                del expected  # the encoder's names are known here
                renamed = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
                if not any(key in encoder for key in renamed):
                    return None
                return {key: value for key, value in renamed.items() if key not in decoder}
            return convert

        return (('NVlabs MiT (mit_b*.pth)', under('')), ('mmsegmentation backbone.', under('backbone.')))

    def extra_repr(self):
        return (f'backbone={self.backbone_name}, num_class={self.num_class}, official={self.official}, '
                f'output_stride={self.output_stride}, feature_channels={self.feature_channels}')


def build_segformer(variant, num_class, norm_layer=nn.BatchNorm2d, official=False):
    """The SegFormer network `variant` ('MiT_B0' .. 'MiT_B5') for `num_class` classes, freshly initialised.

    `norm_layer`: the decoder's BN class (nn.BatchNorm2d, nn.SyncBatchNorm, or a partial of one);
    `official`: the decoder and input of NVlabs' release (no fuse bias, Dropout2d(0.1), RGB ImageNet-normalised
    input computed from the project's BGR mean-subtracted images) instead of CIRKDv2's."""
    return SegFormer(variant, num_class, norm_layer=norm_layer, official=official)


# mmsegmentation's decode-head names of the official release -> this project's (official=True) names.
_OFFICIAL_DECODER_NAMES = (
    ('decode_head.linear_fuse.conv.', 'linear_fuse.0.'),
    ('decode_head.linear_fuse.bn.', 'linear_fuse.1.'),
    ('decode_head.linear_pred.', 'linear_pred.'),
) + tuple((f'decode_head.linear_c{i}.', f'linear_c{i}.') for i in (1, 2, 3, 4))
# mmsegmentation's BaseDecodeHead builds a classifier the SegFormer head never calls.
_OFFICIAL_UNUSED_PREFIX = 'decode_head.conv_seg.'


def convert_official_segformer(state):
    """An official SegFormer checkpoint's state dict (mmsegmentation: `backbone.<MiT key>`,
    `decode_head.linear_c{i}.proj.*`, `decode_head.linear_fuse.conv.weight`, `decode_head.linear_fuse.bn.*`,
    `decode_head.linear_pred.*`, and the unused `decode_head.conv_seg.*`) in the names of the `official=True`
    network, or None when `state` is not in that layout. Keys it does not know keep their names, so that a
    strict load lists them."""
    has_backbone = any(key.startswith('backbone.') for key in state)
    has_head = any(key.startswith('decode_head.linear_') for key in state)
    if not (has_backbone and has_head):
        return None
    converted = {}
    for key, value in state.items():
        if key.startswith(_OFFICIAL_UNUSED_PREFIX):
            continue
        new_key = key[len('backbone.'):] if key.startswith('backbone.') else key
        for old, new in _OFFICIAL_DECODER_NAMES:
            if key.startswith(old):
                new_key = new + key[len(old):]
                break
        converted[new_key] = value
    return converted
