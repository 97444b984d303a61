"""Pair-wise distillation (the structured term of SKD): the student's pixel-to-pixel similarities are pulled
towards the teacher's.

Paper: "Structured Knowledge Distillation for Semantic Segmentation", Liu et al., CVPR 2019,
https://arxiv.org/abs/1903.04197.

Differences from the original zju-SWJ/HWD code (CriterionPairWise in losses/loss.py): the same value; the
teacher's features are detached inside the loss, the shapes are checked, and half-precision inputs are
computed in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .channel import autocast_disabled, loss_precision

__all__ = ['CriterionPairWise', 'check_feature_pair', 'feature_pair']


def check_feature_pair(feat_S, feat_T):
    """Both N x C x h x w with the same N, h and w; the channel counts may differ."""
    if feat_S.dim() != 4 or feat_T.dim() != 4 or feat_S.shape[0] != feat_T.shape[0] \
            or feat_S.shape[2:] != feat_T.shape[2:]:
        raise ValueError('student and teacher features must be N x C x h x w with the same N, h and w (the '
                         f'channel counts may differ), got {tuple(feat_S.shape)} and {tuple(feat_T.shape)}')
    if feat_S.numel() == 0 or feat_T.numel() == 0:
        raise ValueError(f'empty features: {tuple(feat_S.shape)} and {tuple(feat_T.shape)}')


def feature_pair(feat_S, feat_T):
    """(student, teacher) features for a channel-agnostic term: the student resized to the teacher's h x w when
    they differ (losses/align.py), both checked (check_feature_pair), in the losses' precision (float32 for
    half precisions), the teacher detached."""
    feat_S = resize_like(feat_S, feat_T)
    check_feature_pair(feat_S, feat_T)
    dtype = loss_precision(feat_S)
    return feat_S.to(dtype), feat_T.detach().to(dtype)


def _node_similarities(feat):
    """N x M' x M' cosine similarities between the nodes of the 2x2-max-pooled map (M' = ceil(h/2) *
    ceil(w/2)); a node's channel vector x is normalised by max(||x||, 1e-12)."""
    pooled = F.max_pool2d(feat, kernel_size=2, stride=2, padding=0, ceil_mode=True)
    nodes = F.normalize(pooled.flatten(2), p=2, dim=1)
    return torch.bmm(nodes.transpose(1, 2), nodes)


class CriterionPairWise(nn.Module):
    """loss = sum_{n,i,j} (a_T[n,i,j] - a_S[n,i,j])^2 / (N * M'^2),

    a[n,i,j] = cosine similarity of the channel vectors of nodes i and j of image n, the nodes being the
    positions of the feature map max-pooled by 2x2 windows with stride 2 (ceil mode: h' = ceil(h/2),
    w' = ceil(w/2), M' = h' * w'). The student's and the teacher's channel counts may differ.
    """

    def forward(self, feat_S, feat_T):
        """feat_S: N x Cs x h x w, feat_T: N x Ct x h x w (feat_S resized to the teacher's h x w when they
        differ, see losses/align.py). Returns a scalar."""
        feat_S, feat_T = feature_pair(feat_S, feat_T)
        with autocast_disabled(feat_S.device.type):
            similarity_S = _node_similarities(feat_S)
            with torch.no_grad():
                similarity_T = _node_similarities(feat_T)
            # the mean over the N x M' x M' entries
            return F.mse_loss(similarity_S, similarity_T)
