"""Pixel-wise knowledge distillation (KD): every pixel of the student's logits is pulled towards the
teacher's class distribution at that pixel.

Paper: "Distilling the Knowledge in a Neural Network", Hinton, Vinyals and Dean, NIPS 2014 Deep Learning
Workshop, https://arxiv.org/abs/1503.02531, applied per pixel as in "Structured Knowledge Distillation for
Semantic Segmentation", Liu et al., CVPR 2019, https://arxiv.org/abs/1903.04197. The SKD, IFVD and CIRKD
scripts of the original zju-SWJ/HWD code use it with their other terms.

Differences from the original zju-SWJ/HWD code: the same value; the teacher's logits are detached inside
the loss, the temperature is checked, and half-precision inputs are computed in float32.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .channel import LossSettingError, autocast_disabled, check_pair, loss_precision

__all__ = ['CriterionKD']


class CriterionKD(nn.Module):
    """loss = tau^2 * sum_{n,i,j} KL(p_T[n,:,i,j] || p_S[n,:,i,j]) / (N * h * w),
    p = softmax over the C classes of X / tau: the batchmean KL over the N*h*w pixels.

    Every pixel counts, whatever its label (the loss takes no labels).

    Args:
        temperature (float): tau, a positive number. Defaults to 1.0.
    """

    def __init__(self, temperature=1.0):
        super().__init__()
        temperature = float(temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise LossSettingError(f'temperature must be a positive number, got {temperature}')
        self.temperature = temperature

    def extra_repr(self):
        return f'temperature={self.temperature}'

    def forward(self, preds_S, preds_T):
        """preds_S, preds_T: student and teacher logits, N x C x h x w (the student's resized to the
        teacher's size when they differ, see losses/align.py). Returns a scalar."""
        preds_S = resize_like(preds_S, preds_T)
        check_pair(preds_S, preds_T)
        if preds_S.numel() == 0:
            raise ValueError(f'KD needs at least one pixel and one class, got {tuple(preds_S.shape)}')
        n, _, h, w = preds_S.shape
        dtype = loss_precision(preds_S)
        tau = self.temperature
        with autocast_disabled(preds_S.device.type):
            # Softmax over the class axis in place of the original's channel-last flattening: the same
            # numbers without the permuted copies.
            log_p_s = F.log_softmax(preds_S.to(dtype) / tau, dim=1)
            log_p_t = F.log_softmax(preds_T.detach().to(dtype) / tau, dim=1)
            # p_T (log p_T - log p_S) from the log-probabilities: 0 where p_T underflows, as kl_div's.
            kl = F.kl_div(log_p_s, log_p_t, reduction='sum', log_target=True)
            return kl * (tau ** 2 / (n * h * w))
