"""Intra-class feature variation distillation (IFVD): the student is taught how far each pixel's feature
is from the centre of its class, as the teacher sees it.

Paper: "Intra-class Feature Variation Distillation for Semantic Segmentation", Wang et al., ECCV 2020,
https://arxiv.org/abs/2010.00951.

Differences from the original zju-SWJ/HWD code (CriterionIFV in losses/loss.py): the same value,
including its centre = sum / (count + 1e-6); the class centres of the whole batch come from one scatter
instead of a Python loop over the classes, the teacher's features are detached inside the loss (the
original's `detach()` discarded its result), the inputs are checked, and half-precision inputs are computed
in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .channel import LossSettingError, autocast_disabled, loss_precision
from .hwd_loss import resize_labels_nearest
from .pairwise import check_feature_pair

__all__ = ['CriterionIFV', 'class_centres']

# The original divides a class's feature sum by (pixel count + 1e-6), not by the count.
COUNT_EPS = 1e-6
# torch's cosine similarity: each vector is divided by max(||x||, eps).
COSINE_EPS = 1e-8


def _class_bins(labels, size, classes):
    """labels (N x H x W) resized to size by nearest, flattened to N x 1 x M, with every value outside
    0..classes-1 sent to the extra bin `classes`; and the N x 1 x M mask of the pixels with a class."""
    small = resize_labels_nearest(labels, size).reshape(labels.shape[0], 1, -1).long()
    labelled = (small >= 0) & (small < classes)
    return torch.where(labelled, small, classes), labelled


def _centres(flat, index, divisor):
    """N x C x (classes + 1): per image and class, the sum of the features / (count + 1e-6), from one
    scatter over every (image, class) of the batch; the last bin gathers the pixels without a class."""
    n, c = flat.shape[:2]
    sums = flat.new_zeros(n, c, divisor.shape[-1]).scatter_add(2, index, flat)
    return sums / divisor


def _count_divisor(bins, classes, dtype):
    counts = torch.zeros(bins.shape[0], 1, classes + 1, dtype=dtype, device=bins.device)
    counts.scatter_add_(2, bins, torch.ones(1, 1, 1, dtype=dtype, device=bins.device).expand_as(bins))
    return counts + COUNT_EPS


def class_centres(feat, labels, classes):
    """The N x C x classes centres IFV compares pixels with: for image n and class k, the sum of the
    features of the pixels of class k / (their count + 1e-6), labels resized to the features by nearest
    (0 for a class absent from the image)."""
    n, c = feat.shape[:2]
    bins, _ = _class_bins(labels.to(feat.device), feat.shape[-2:], classes)
    flat = feat.reshape(n, c, -1)
    return _centres(flat, bins.expand_as(flat), _count_divisor(bins, classes, feat.dtype))[..., :classes]


def _similarity_to_centres(feat, bins, labelled, divisor):
    """N x M cosine similarities between every pixel's feature and the centre of its class in its image
    (a pixel without a class is compared with itself). feat: N x C x h x w; bins, labelled: N x 1 x M;
    divisor: N x 1 x (classes + 1)."""
    n, c = feat.shape[:2]
    flat = feat.reshape(n, c, -1)
    index = bins.expand_as(flat)
    centre_map = torch.where(labelled, _centres(flat, index, divisor).gather(2, index), flat)
    return F.cosine_similarity(flat, centre_map, dim=1, eps=COSINE_EPS)


class CriterionIFV(nn.Module):
    """loss = sum_{n,p} (cos_S[n,p] - cos_T[n,p])^2 / (N * h * w),

    cos[n,p] = cosine similarity (torch's, eps 1e-8) between the feature of pixel p of image n and the
    centre of its class k in that image, centre = (sum of the features of the pixels of class k in the
    image) / (their count + 1e-6), for the student and the teacher separately. The labels are resized to
    the features' h x w by nearest (as nn.Upsample(mode='nearest')); a pixel labelled outside
    0..classes-1 (ignore -1 included) is compared with itself (cos ~ 1 for both) and still counts in the
    mean. The student's gradient flows through its centres too. The channel counts may differ.

    Args:
        classes (int): the number of classes, a positive integer.
    """

    def __init__(self, classes):
        super().__init__()
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise LossSettingError(f'classes must be a positive integer, got {classes!r}')
        self.num_classes = classes

    def extra_repr(self):
        return f'classes={self.num_classes}'

    def forward(self, feat_S, feat_T, labels):
        """feat_S: N x Cs x h x w, feat_T: N x Ct x h x w, labels: integer N x H x W at any resolution (the
        crop's). feat_S is resized to the teacher's h x w when they differ (losses/align.py). Returns a scalar."""
        feat_S = resize_like(feat_S, feat_T)
        check_feature_pair(feat_S, feat_T)
        n, _, h, w = feat_S.shape
        if labels.dim() != 3 or labels.shape[0] != n or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f'labels must be an integer N x H x W tensor with N = {n}, got '
                             f'{labels.dtype} {tuple(labels.shape)}')
        dtype = loss_precision(feat_S)
        with autocast_disabled(feat_S.device.type):
            bins, labelled = _class_bins(labels.to(feat_S.device), (h, w), self.num_classes)
            divisor = _count_divisor(bins, self.num_classes, dtype)
            cos_S = _similarity_to_centres(feat_S.to(dtype), bins, labelled, divisor)
            with torch.no_grad():
                cos_T = _similarity_to_centres(feat_T.detach().to(dtype), bins, labelled, divisor)
            return F.mse_loss(cos_S, cos_T)
