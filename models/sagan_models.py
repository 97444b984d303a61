"""The discriminator of the adversarial term of SKD and IFVD: a SAGAN-style critic of segmentation logits.

Papers: "Self-Attention Generative Adversarial Networks", Zhang et al., ICML 2019,
https://arxiv.org/abs/1805.08318 (the architecture: spectrally normalised strided convolutions and
self-attention), "Spectral Normalization for Generative Adversarial Networks", Miyato et al., ICLR 2018,
https://arxiv.org/abs/1802.05957, used on logits by "Structured Knowledge Distillation for Semantic
Segmentation", Liu et al., CVPR 2019, https://arxiv.org/abs/1903.04197 and "Intra-class Feature Variation
Distillation for Semantic Segmentation", Wang et al., ECCV 2020, https://arxiv.org/abs/2010.00951.

Same layers, state-dict keys (in the same order), initialisation order and outputs as the original
zju-SWJ/HWD code (models/sagan_models.py, models/spectral.py). Differences: the gradient of each call's
spectral norm uses the power-iteration vectors of that call (the original overwrote them in place, so a
backward after two calls used the later call's vectors for both); settings that cannot work (conv_dim or
image_size other than 64, logits smaller than 64 x 64) are refused with a message instead of failing
inside a layer; the preprocessing of mode 3 is a module rather than a lambda.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses.channel import LossSettingError, autocast_disabled

__all__ = ['Discriminator', 'SelfAttention', 'SpectralNorm', 'MIN_LOGIT_SIZE']

# Four stride-2 convolutions then a 4 x 4 one: a side below 64 leaves less than 4 x 4 for the last layer.
MIN_LOGIT_SIZE = 64

SN_EPS = 1e-12


def _l2_normalised(vector):
    # x / (||x|| + eps), the original's rule (torch's F.normalize divides by max(||x||, eps) instead).
    return vector / (vector.norm() + SN_EPS)


class SpectralNorm(nn.Module):
    """Wraps a convolution so that it uses W / sigma(W), sigma estimated by one power iteration per call.

    The convolution's `weight` parameter is replaced by `weight_bar` (trainable, the initial weight),
    `weight_u` (out channels) and `weight_v` (in channels * kernel area), both random unit vectors without
    gradient. Every call, in training and in evaluation mode, runs with W = weight_bar reshaped to
    out x (in * k * k):

        v <- l2n(W^T u),  u <- l2n(W v)      (in place, no gradient; l2n(x) = x / (||x|| + 1e-12))
        sigma = u . (W v)                    (gradient through W only)
        output = conv(x, weight_bar / sigma)

    Written here rather than taken from torch.nn.utils.spectral_norm because that one normalises by
    max(||x||, eps) instead of ||x|| + eps, iterates only in training mode and stores the vectors under
    other names (`weight_orig`, `v` as a buffer): the original's state dicts would not load and its
    outputs would not be reproduced.

    Args:
        module (nn.Conv2d): the convolution to normalise; its `weight` parameter is removed.
    """

    def __init__(self, module):
        super().__init__()
        self.module = module
        weight = module.weight
        height = weight.shape[0]
        width = weight[0].numel()
        # Drawn in this order (u, then v) so that a seeded construction gives the original's vectors.
        u = _l2_normalised(weight.detach().new_empty(height).normal_(0, 1))
        v = _l2_normalised(weight.detach().new_empty(width).normal_(0, 1))
        del module._parameters['weight']
        # Registered after `bias`, in this order: the original's state-dict layout.
        module.register_parameter('weight_u', nn.Parameter(u, requires_grad=False))
        module.register_parameter('weight_v', nn.Parameter(v, requires_grad=False))
        module.register_parameter('weight_bar', nn.Parameter(weight.detach()))

    def normalised_weight(self):
        """weight_bar / sigma after one power iteration (which updates weight_u and weight_v in place)."""
        conv = self.module
        weight = conv.weight_bar
        matrix = weight.reshape(weight.shape[0], -1)
        # The power iteration and sigma in the weight's own precision, whatever autocast would do.
        with autocast_disabled(weight.device.type):
            with torch.no_grad():
                conv.weight_v.copy_(_l2_normalised(torch.mv(matrix.t(), conv.weight_u)))
                conv.weight_u.copy_(_l2_normalised(torch.mv(matrix, conv.weight_v)))
            # Copies: the next call overwrites weight_u and weight_v, and this call's backward must still
            # see the vectors this call used. Detached so that they never get a gradient.
            u = conv.weight_u.detach().clone()
            v = conv.weight_v.detach().clone()
            sigma = u.dot(matrix.mv(v))
            return weight / sigma

    def forward(self, x):
        conv = self.module
        if conv.padding_mode != 'zeros':
            raise ValueError(f'SpectralNorm supports zero padding only, got {conv.padding_mode!r}')
        return F.conv2d(x, self.normalised_weight(), conv.bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups)


class SelfAttention(nn.Module):
    """SAGAN self-attention over the positions of a C x H x W map (P = H*W positions):

        q = Wq x (C/8 channels), k = Wk x (C/8), v = Wv x (C), all 1x1 convolutions with bias
        A = softmax over the keys of q^T k (P x P)
        output = gamma * v A^T + x,  gamma a scalar initialised to 0

    The attention map is not returned (the original computed and discarded it).

    Args:
        in_channels (int): C, a multiple of 8.
    """

    def __init__(self, in_channels):
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, c, h, w = x.shape
        query = self.query_conv(x).reshape(n, -1, h * w).permute(0, 2, 1)
        key = self.key_conv(x).reshape(n, -1, h * w)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)
        value = self.value_conv(x).reshape(n, -1, h * w)
        out = torch.bmm(value, attention.permute(0, 2, 1)).reshape(n, c, h, w)
        return self.gamma * out + x


class ScaleFromPixelRange(nn.Module):
    """x -> 2 * (x / 255 - 0.5): maps 0..255 to -1..1 (preprocessing mode 3)."""

    def forward(self, x):
        return 2 * (x / 255 - 0.5)


def _sn_block(in_channels, out_channels):
    return nn.Sequential(SpectralNorm(nn.Conv2d(in_channels, out_channels, 4, 2, 1)), nn.LeakyReLU(0.1))


class Discriminator(nn.Module):
    """Scores segmentation logits (N x C x h x w, not softmaxed) with an N x 1 x (h/16 - 3) x (w/16 - 3)
    map (floors taken at every stride-2 layer: 1 x 1 for 64 x 64 logits, 1 x 5 for 64 x 128):

        preprocess -> l1: SN-conv(C -> 64) -> l2: SN-conv(64 -> 128) -> l3: SN-conv(128 -> 256)
        -> attn1 -> l4: SN-conv(256 -> 512) -> attn2 -> last: conv(512 -> 1, 4x4, stride 1, no padding)

    SN-conv: 4x4, stride 2, padding 1, with bias, spectrally normalised (SpectralNorm), then
    LeakyReLU(0.1); attn1, attn2: SelfAttention(256), SelfAttention(512).

    Args:
        preprocess_GAN_mode (int): what is done to the logits first: 1 = norm_layer(C) (batch
            normalisation, the default), 2 = tanh, 3 = 2 * (x / 255 - 0.5).
        input_channel (int): C, the number of classes.
        conv_dim (int): width of the first layer; only 64 works (the attention widths are fixed).
        norm_layer (type): the normalisation of mode 1, e.g. nn.BatchNorm2d or nn.SyncBatchNorm.
        image_size (int): the original's constructor argument; only 64 works.
    """

    def __init__(self, preprocess_GAN_mode=1, input_channel=19, *, conv_dim=64, norm_layer=nn.BatchNorm2d,
                 image_size=64):
        super().__init__()
        if isinstance(preprocess_GAN_mode, bool) or preprocess_GAN_mode not in (1, 2, 3):
            raise LossSettingError('preprocess_GAN_mode (--preprocess-GAN-mode) must be 1 (batch norm), 2 (tanh) '
                                   f'or 3 (2 * (x / 255 - 0.5)), got {preprocess_GAN_mode!r}')
        if isinstance(input_channel, bool) or not isinstance(input_channel, int) or input_channel < 1:
            raise LossSettingError(f'input_channel (the number of classes) must be a positive integer, '
                                   f'got {input_channel!r}')
        if conv_dim != 64:
            raise LossSettingError(f'conv_dim (--adv-conv-dim) must be 64, got {conv_dim!r}: the attention '
                                   'layers have 256 and 512 channels, the widths of conv_dim 64')
        if image_size != 64:
            raise LossSettingError(f'image_size must be 64 (the layout with four strided layers), got {image_size!r}')
        self.preprocess_GAN_mode = preprocess_GAN_mode
        self.input_channel = input_channel
        # Built in the original's order (the random initialisation follows it) but l4 is registered first,
        # as in the original, so that the state-dict keys come in the original's order.
        layer1 = _sn_block(input_channel, conv_dim)
        layer2 = _sn_block(conv_dim, conv_dim * 2)
        layer3 = _sn_block(conv_dim * 2, conv_dim * 4)
        layer4 = _sn_block(conv_dim * 4, conv_dim * 8)
        self.l4 = layer4
        self.l1 = layer1
        self.l2 = layer2
        self.l3 = layer3
        self.last = nn.Sequential(nn.Conv2d(conv_dim * 8, 1, 4))
        self.attn1 = SelfAttention(256)
        self.attn2 = SelfAttention(512)
        if preprocess_GAN_mode == 1:
            self.preprocess_additional = norm_layer(input_channel)
        elif preprocess_GAN_mode == 2:
            self.preprocess_additional = nn.Tanh()
        else:
            self.preprocess_additional = ScaleFromPixelRange()

    def extra_repr(self):
        return f'preprocess_GAN_mode={self.preprocess_GAN_mode}, input_channel={self.input_channel}'

    def forward(self, logits):
        if logits.dim() != 4 or logits.shape[1] != self.input_channel:
            raise ValueError(f'the discriminator expects logits N x {self.input_channel} x h x w, '
                             f'got {tuple(logits.shape)}')
        h, w = logits.shape[-2:]
        if min(h, w) < MIN_LOGIT_SIZE:
            raise ValueError(f'the discriminator needs logits of at least {MIN_LOGIT_SIZE} x {MIN_LOGIT_SIZE} '
                             f'(a --crop-size of at least {MIN_LOGIT_SIZE} x the output stride on each side); '
                             f'got {h} x {w} logits')
        out = self.preprocess_additional(logits)
        out = self.l1(out)
        out = self.l2(out)
        out = self.l3(out)
        out = self.attn1(out)
        out = self.l4(out)
        out = self.attn2(out)
        return self.last(out)
