"""The trainable block CIRKDv2 puts on the student's feature before its feature terms (FitNet, the pixel and
channel contrasts): a non-local (self-attention) aggregation over all positions of each image, fused with
the input.

From winycg/CIRKD (losses/gcn.py, GCN; used by train_cirkdv2.py). The same computation and the same
parameter names; what differs: the h*w x h*w affinity of each image is never materialised. The original
formed it explicitly (softmax(q k^T / sqrt(c)), 8192^2 entries per image for a 64 x 128 feature: 0.27 GB in
float32, kept for the backward pass); here torch.nn.functional.scaled_dot_product_attention computes
softmax(q k^T * scale) v with a fused kernel (flash or memory-efficient attention where the device has one),
whose memory grows with h*w, not (h*w)^2 (on the CPU the queries are cut into one block per thread, see
`attention`). Under autocast the block computes in float32, its parameters' precision.
"""
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .channel import LossSettingError, autocast_disabled

__all__ = ['GCN']


def attention(query, key, value, scale):
    """softmax(query key^T * scale) value of N x 1 x rows x c tensors (one head), by
    scaled_dot_product_attention.

    On the CPU the fused kernel's backward pass gives each thread whole (image, head) pairs, so one image runs
    on one thread: with fewer images than threads, the queries are cut into blocks (zero rows padding the
    last), one per thread, each attending to all the keys (a view, not a copy). Every row's result is the
    same; the keys' and values' gradients are summed over the blocks."""
    n, _, rows, channels = query.shape
    blocks = torch.get_num_threads() // n if query.device.type == 'cpu' else 1
    if blocks <= 1 or rows < blocks:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    per_block = -(-rows // blocks)
    query = F.pad(query, (0, 0, 0, per_block * blocks - rows)).reshape(n, blocks, per_block, channels)
    attended = F.scaled_dot_product_attention(query, key.expand(n, blocks, rows, channels),
                                              value.expand(n, blocks, rows, channels), scale=scale)
    return attended.reshape(n, 1, blocks * per_block, channels)[:, :, :rows]


class GCN(nn.Module):
    """out = ReLU(norm(W_out [x, ReLU(norm(W_1 attend(x)))])), with attend(x) = softmax(q k^T / sqrt(c)) v per
    image over its h*w positions, q, k, v the 1x1 projections (no bias) of x to c = plane // 2 channels, W_1 a
    1x1 convolution c -> plane and W_out a 1x1 convolution 2 * plane -> plane (no biases). The output has the
    input's shape; it is non-negative.

    Keys: node_k, node_v, node_q (weights), conv1.0 (weight), conv1.1.* (norm), out_conv.0 (weight),
    out_conv.1.* (norm); PyTorch's default initialisation.

    Args:
        plane (int): the feature's channels, at least 2.
        norm_layer (type): the normalisation layer, built as norm_layer(plane). Defaults to nn.BatchNorm2d.
    """

    def __init__(self, plane, norm_layer=nn.BatchNorm2d):
        super().__init__()
        try:
            plane = operator.index(plane)
        except TypeError:
            raise LossSettingError(f'plane must be a whole number >= 2, got {plane!r}') from None
        if plane < 2:
            raise LossSettingError(f'plane must be a whole number >= 2 (the attention uses plane // 2 channels), '
                                   f'got {plane}')
        self.plane = plane
        inner = plane // 2
        self.node_k = nn.Conv2d(plane, inner, kernel_size=1, bias=False)
        self.node_v = nn.Conv2d(plane, inner, kernel_size=1, bias=False)
        self.node_q = nn.Conv2d(plane, inner, kernel_size=1, bias=False)
        self.conv1 = nn.Sequential(nn.Conv2d(inner, plane, kernel_size=1, bias=False), norm_layer(plane),
                                   nn.ReLU(inplace=True))
        self.out_conv = nn.Sequential(nn.Conv2d(2 * plane, plane, kernel_size=1, bias=False), norm_layer(plane),
                                      nn.ReLU(inplace=True))

    def extra_repr(self):
        return f'plane={self.plane}'

    def forward(self, feat):
        """feat: N x plane x h x w. Returns N x plane x h x w, in the parameters' precision."""
        if feat.dim() != 4 or feat.shape[1] != self.plane or feat.numel() == 0:
            raise ValueError(f'GCN built for {self.plane} channels needs a non-empty N x {self.plane} x h x w '
                             f'feature, got {tuple(feat.shape)}')
        with autocast_disabled(feat.device.type):
            feat = feat.to(self.node_k.weight.dtype)
            n, _, h, w = feat.shape
            inner = self.plane // 2
            # The three 1x1 projections as one product on the positions (N x hw x 3c): q, k and v come out
            # with contiguous rows, which the fused kernels need; one attention head, N x 1 x hw x c.
            projection = torch.cat([self.node_q.weight, self.node_k.weight, self.node_v.weight]).flatten(1)
            query, key, value = F.linear(feat.flatten(2).transpose(1, 2), projection).unsqueeze(1).split(inner, -1)
            attended = attention(query, key, value, inner ** -0.5)
            attended = attended.squeeze(1).transpose(1, 2).reshape(n, inner, h, w)
            return self.out_conv(torch.cat([feat, self.conv1(attended)], dim=1))
