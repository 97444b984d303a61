"""Holistic Weighted Distillation (HWD): channel-wise distillation with one weight per (image, channel).

The loss of the original zju-SWJ/HWD code (losses/hwd.py), after CWD (Shu et al., "Channel-wise Knowledge
Distillation for Dense Prediction", ICCV 2021, https://arxiv.org/abs/2011.13256).

The weight grows with how far the student's channel is from the teacher's, so the channels the student
gets most wrong are distilled hardest. Weights carry no gradient; the teacher never gets one.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .channel import (
    DISTANCES,
    LossSettingError,
    autocast_disabled,
    channel_kl,
    check_pair,
    check_temperature,
    loss_precision,
)

__all__ = ['CriterionHWD', 'nearest_indices', 'resize_labels_nearest', 'class_pixel_counts']

PROCESSES = ('E', 'T')
PIXEL_DIVISORS = ('None', 'N', 'SqrtN', 'N2')

# A spread of the channel distances below this fraction of their mean is floating-point noise (e.g. the
# student equals the teacher); normalising it would blow the noise up into arbitrary weights.
DEGENERATE_SPREAD = 1e-4


def nearest_indices(in_size, out_size, device=None):
    """The source index F.interpolate(mode='nearest') reads for every output position along one axis.
    Obtained from F.interpolate itself so that every rounding rule of PyTorch is followed exactly."""
    positions = torch.arange(in_size, dtype=torch.float32, device=device).reshape(1, 1, in_size)
    return F.interpolate(positions, size=out_size, mode='nearest').reshape(out_size).long()


@functools.lru_cache(maxsize=64)
def _nearest_rows(in_size, out_size):
    """nearest_indices as a slice when they step evenly (512 -> 64 reads every 8th row), so that
    resizing is a strided view of the label map; otherwise as an index tensor."""
    indices = nearest_indices(in_size, out_size)
    steps = indices.diff()
    if out_size == 1 or (steps[0] > 0 and bool((steps == steps[0]).all())):
        start, step = int(indices[0]), int(steps[0]) if out_size > 1 else 1
        return slice(start, start + step * (out_size - 1) + 1, step)
    return indices


def resize_labels_nearest(labels, size):
    """labels (N x H' x W', integer) resized to size = (H, W) exactly as F.interpolate(mode='nearest') on
    the float labels would, but by pure index selection (no float copy of the big label map)."""
    rows = _nearest_rows(labels.shape[-2], size[0])
    cols = _nearest_rows(labels.shape[-1], size[1])
    if isinstance(rows, slice) and isinstance(cols, slice):
        return labels[..., rows, cols]
    as_index = lambda sel, length: torch.arange(length)[sel] if isinstance(sel, slice) else sel  # noqa: E731
    rows = as_index(rows, labels.shape[-2]).to(labels.device)
    cols = as_index(cols, labels.shape[-1]).to(labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


def class_pixel_counts(labels, num_class, dtype=torch.float32):
    """1 + the number of positions of class c in image n, as an N x C tensor of `dtype` (the count
    of the original's --DivPixel). Positions labelled outside 0..C-1 (ignore -1, or any other value) count for no class.
    One scatter-add over the whole batch, no loop over images or classes."""
    n = labels.shape[0]
    # Bin 0 takes every label below 0, bin C + 1 every label above C - 1; both are dropped.
    bins = labels.long().clamp(-1, num_class).add_(1).reshape(n, -1)  # any integer dtype
    counts = torch.ones(n, num_class + 2, dtype=dtype, device=labels.device)
    counts.scatter_add_(1, bins, torch.ones(1, 1, dtype=dtype, device=labels.device).expand_as(bins))
    return counts[:, 1:num_class + 1]


class CriterionHWD(nn.Module):
    """loss = tau^2 * sum_{n,c} weight[n,c] * KL(P_T[n,c] || P_S[n,c]) / (N * C), with

    d[n,c]   distance between student and teacher channel (raw logits, or P = softmax(X / tau) with
             activation): MSE, L1, SMOOTHL1 (beta 1) or KL, summed over positions;
    count    1 + pixels of class c in the label map resized to H x W by nearest;
    w        d, d / count, d / sqrt(count) or d / count^2 (DivPixel None, N, SqrtN, N2);
    norm     w = (w - mean_c w) / std_c w + shift (unbiased std);
    process  E: (1 - beta^w) / (1 - beta), T: w / tau', with beta, tau' = parameter;
    weight   C * softmax over the channels.
    """

    def __init__(self, norm=True, L='MSE', process='E', parameter=0.1, DivPixel='None', shift=0.0,
                 activation=False, temperature=4.0):
        super().__init__()
        if DivPixel is None:
            DivPixel = 'None'
        if L not in DISTANCES:
            raise LossSettingError(f'--L must be one of {", ".join(DISTANCES)}, got {L!r}')
        if process not in PROCESSES:
            raise LossSettingError(f'--process must be one of {", ".join(PROCESSES)}, got {process!r}')
        if DivPixel not in PIXEL_DIVISORS:
            raise LossSettingError(f'--DivPixel must be one of {", ".join(PIXEL_DIVISORS)}, got {DivPixel!r}')
        if L == 'KL' and not activation:
            raise LossSettingError('--L KL compares probability maps and needs --activation')
        parameter = float(parameter)
        if not math.isfinite(parameter) or parameter <= 0:
            raise LossSettingError(f'--parameter must be a positive number with --process {process}, got {parameter}')
        if process == 'E' and parameter == 1:
            raise LossSettingError('--parameter (beta of --process E) must not be 1: (1 - beta^w) / (1 - beta) '
                                   'divides by zero')
        shift = float(shift)
        if not math.isfinite(shift):
            raise LossSettingError(f'--shift must be a finite number, got {shift}')
        self.norm = bool(norm)
        self.L = L
        self.process = process
        self.parameter = parameter
        self.DivPixel = DivPixel
        self.shift = shift
        self.activation = bool(activation)
        self.temperature = check_temperature(temperature)

    def extra_repr(self):
        return (f'norm={self.norm}, L={self.L!r}, process={self.process!r}, parameter={self.parameter}, '
                f'DivPixel={self.DivPixel!r}, shift={self.shift}, activation={self.activation}, '
                f'temperature={self.temperature}')

    def forward(self, preds_S, preds_T, labels):
        kl, weight = self._kl_and_weights(preds_S, preds_T, labels)
        n, c = kl.shape
        return (weight * kl).sum() * (self.temperature ** 2 / (n * c))

    @torch.no_grad()
    def weights(self, preds_S, preds_T, labels):
        """The N x C channel weights this loss gives the pair (mean 1 per image; CWD's are all 1)."""
        return self._kl_and_weights(preds_S, preds_T, labels)[1]

    def _kl_and_weights(self, preds_S, preds_T, labels):
        preds_S = resize_like(preds_S, preds_T)  # another family's stride (losses/align.py)
        check_pair(preds_S, preds_T)
        n, c, h, w = preds_S.shape
        if labels.dim() != 3 or labels.shape[0] != n or labels.is_floating_point():
            raise ValueError(f'labels must be an integer N x H x W tensor with N = {n}, got '
                             f'{labels.dtype} {tuple(labels.shape)}')
        dtype = loss_precision(preds_S)
        with autocast_disabled(preds_S.device.type):
            kl, distance = channel_kl(preds_S.to(dtype), preds_T.detach().to(dtype), self.temperature,
                                      distance=self.L, on_probabilities=self.activation)
            return kl, self.channel_weights(distance, labels, (h, w))

    @torch.no_grad()
    def channel_weights(self, distance, labels, size):
        """The N x C weights from the N x C distances (steps 2-5 of the class docstring)."""
        n, c = distance.shape
        if self.DivPixel != 'None':
            count = class_pixel_counts(resize_labels_nearest(labels, size), c, distance.dtype)
            if self.DivPixel == 'N':
                distance = distance / count
            elif self.DivPixel == 'SqrtN':
                distance = distance / count.sqrt()
            else:
                distance = distance / count.square()
        score = distance
        if self.norm:
            if c > 1:
                std, mean = torch.std_mean(score, dim=1, keepdim=True)
            else:  # the unbiased std of one value is undefined
                std, mean = torch.zeros_like(score), score
            # A spread that is only rounding noise divides by infinity: every channel then gets the
            # same score, 0 + shift. (Distances are never negative, so neither is the mean.)
            score = (score - mean) / torch.where(std > DEGENERATE_SPREAD * mean, std, math.inf) + self.shift
        if self.process == 'E':
            beta = self.parameter
            # beta^w is clamped just below where (1 - beta^w) / (1 - beta) would overflow to inf (and the
            # softmax give NaN), and nowhere else, so finite results keep the original's exact rounding.
            max_power = math.log(torch.finfo(score.dtype).max) + min(0.0, math.log(abs(1 - beta))) - 1
            # normalised scores are at most (C - 1) / sqrt(C) from the shift: often no clamp is needed
            bound = (c - 1) / math.sqrt(c) + abs(self.shift) if self.norm else math.inf
            if bound * abs(math.log(beta)) >= max_power:
                limit = max_power / math.log(beta)
                score = score.clamp(max=limit) if beta > 1 else score.clamp(min=limit)
            score = (1 - torch.pow(beta, score)) / (1 - beta)
        else:
            score = score / self.parameter
        return c * F.softmax(score, dim=1)
