"""DIST: distillation by Pearson correlation of the student's and the teacher's logits, between the classes
of every pixel (inter-class relation) and between the pixels of every class (intra-class relation).

Paper: "Knowledge Distillation from A Stronger Teacher", Huang et al., NeurIPS 2022,
https://arxiv.org/abs/2205.10536. As in the original zju-SWJ/HWD code (train_dist.py), the correlations
are taken on the raw logits, without the paper's softmax and temperature, and the intra-class relation
of a class spans every pixel of the batch.

Differences from the original zju-SWJ/HWD code: the same value; beta and gamma are checked (a weight of
0 skips its relation), the teacher's logits are detached inside the loss, and half-precision inputs are
computed in float32.
"""

import torch
import torch.nn as nn

from .align import resize_like
from .channel import autocast_disabled, check_pair, loss_precision
from .checks import check_weight

__all__ = ['CriterionDIST']

# Added to the product of the two norms (not to each norm, unlike torch's cosine_similarity), as the
# original does: a constant vector then correlates 0 with anything.
PEARSON_EPS = 1e-8


def pearson_correlation(a, b, dims):
    """Pearson correlation of a and b along the axes `dims` (reduced): the cosine of the centred
    vectors, u . v / (||u|| * ||v|| + 1e-8)."""
    a = a - a.mean(dims, keepdim=True)
    b = b - b.mean(dims, keepdim=True)
    norms = torch.linalg.vector_norm(a, dim=dims) * torch.linalg.vector_norm(b, dim=dims)
    return (a * b).sum(dims) / (norms + PEARSON_EPS)


class CriterionDIST(nn.Module):
    """loss = beta * inter + gamma * intra on the logits S, T (N x C x h x w), with

    inter = 1 - mean over the N*h*w pixels p of pearson(S[p, :], T[p, :])   (across the C classes)
    intra = 1 - mean over the C classes c of pearson(S[:, c], T[:, c])     (across all N*h*w pixels)
    pearson(a, b) = (a - mean a) . (b - mean b) / (||a - mean a|| * ||b - mean b|| + 1e-8).

    Args:
        beta (float): weight of the inter-class relation, >= 0 (0 leaves it out). Defaults to 1.0.
        gamma (float): weight of the intra-class relation, >= 0 (0 leaves it out). Defaults to 1.0.
    """

    def __init__(self, beta=1.0, gamma=1.0):
        super().__init__()
        self.beta = check_weight('beta', beta)
        self.gamma = check_weight('gamma', gamma)

    def extra_repr(self):
        return f'beta={self.beta}, gamma={self.gamma}'

    def forward(self, preds_S, preds_T):
        """preds_S, preds_T: student and teacher logits, N x C x h x w. Returns a scalar (a constant 0
        when beta and gamma are both 0). The student's logits are resized to the teacher's size when they
        differ (losses/align.py)."""
        preds_S = resize_like(preds_S, preds_T)
        check_pair(preds_S, preds_T)
        if preds_S.numel() == 0:
            raise ValueError(f'DIST needs at least one pixel and one class, got {tuple(preds_S.shape)}')
        dtype = loss_precision(preds_S)
        with autocast_disabled(preds_S.device.type):
            student = preds_S.to(dtype)
            teacher = preds_T.detach().to(dtype)
            loss = student.new_zeros(())
            if self.beta > 0:
                loss = loss + self.beta * (1 - pearson_correlation(student, teacher, (1,)).mean())
            if self.gamma > 0:
                loss = loss + self.gamma * (1 - pearson_correlation(student, teacher, (0, 2, 3)).mean())
            return loss
