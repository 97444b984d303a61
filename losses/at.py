"""Attention transfer (AT): the student's spatial attention map is pulled towards the teacher's.

Paper: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017, https://arxiv.org/abs/1612.03928, as
winycg/CIRKD (losses/at.py) applies it to segmentation: one layer, the head's feature, p = 2.

Differences from the original: the same value; the teacher's feature is detached inside the loss, a student
feature of another spatial size is resized to the teacher's (losses/align.py), the shapes are checked, and
half-precision inputs are computed in float32.
"""
import torch.nn as nn
import torch.nn.functional as F

from .channel import autocast_disabled
from .pairwise import feature_pair

__all__ = ['CriterionAT', 'attention_map']


def attention_map(feat):
    """N x C x h x w -> N x (h*w): the channel mean of the squared feature, each image's row divided by
    max(L2 norm, 1e-12). The channel count does not matter; an all-zero feature gives a zero row."""
    return F.normalize(feat.square().mean(1).flatten(1), p=2, dim=1)


class CriterionAT(nn.Module):
    """loss = sum_{n,i} (a_S[n,i] - a_T[n,i])^2 / (N * h * w), a = attention_map(feature): the L2-normalised
    channel mean of the squared feature, one row of h*w values per image.

    No trainable parameters; the student's and the teacher's channel counts may differ.
    """

    def forward(self, feat_S, feat_T):
        """feat_S: N x Cs x h x w, feat_T: N x Ct x h x w (feat_S resized to the teacher's h x w when they
        differ, see losses/align.py). Returns a scalar."""
        feat_S, feat_T = feature_pair(feat_S, feat_T)
        with autocast_disabled(feat_S.device.type):
            return F.mse_loss(attention_map(feat_S), attention_map(feat_T))
