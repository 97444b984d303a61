"""Double similarity distillation (DSD): pixel-wise similarities between the attention maps of several
outputs of a network (PSD), and category-wise similarities between the class maps of its logits (CSD).

Paper: Y. Feng, X. Sun, W. Diao, J. Li, X. Gao, "Double Similarity Distillation for Semantic Image
Segmentation", IEEE TIP 2021, https://arxiv.org/abs/2107.08591, as winycg/CIRKD implements it
(losses/dsd.py, CriterionDoubleSimKD).

Differences from the original: the same values. Both results are in the inputs' precision (PSD summed its
pair terms into a float32 tensor put on the GPU with `.cuda()`, so it failed on the CPU and rounded float64
inputs); the pairs of maps are formed at once, not in a Python loop; any number L >= 2 of maps (the
original's callers pass 2 or 3); the teacher's maps are detached inside the loss; each student map of another
spatial size is resized to its teacher counterpart's (losses/align.py); the shapes and the temperature are
checked; half-precision inputs are computed in float32.

What the caller passes (the original's train_kd.py wiring, with one fix): [aux logits, feature, logits] for a
network with an auxiliary head, [feature, logits] (K = 1) for one without. The original passed
[logits, feature, logits] there: a map holding the same tensor twice gives a zero residual whose
normalisation multiplies the gradient by 1e24, and the logits' PSD gradient came out exactly zero.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .at import attention_map
from .channel import autocast_disabled
from .checks import positive_number

__all__ = ['CriterionDoubleSimKD']


def map_pairs(count):
    """(earlier, later) indices of the K = L(L-1)/2 pairs of L maps, in the order (0,1), (0,2), ..., (1,2), ...
    (the original's)."""
    earlier, later = torch.triu_indices(count, count, offset=1)
    return earlier, later


def pair_residuals(maps):
    """L x N x P attention maps -> K x N x P: normalise(a_later - a_earlier) for every pair, normalised twice
    as the original (its residual list, then its loss, normalise each; the second changes only the
    zero vector's gradient)."""
    earlier, later = map_pairs(maps.shape[0])
    residuals = F.normalize(maps[later] - maps[earlier], p=2, dim=2)
    return F.normalize(residuals, p=2, dim=2)


def class_similarity(logits, temperature):
    """N x C x h x w -> N x C x C: P P^T with P the softmax over the positions of each class map of the
    logits 2x2-average-pooled (stride 2, ceil mode: a border window averages its in-bounds values) and
    divided by the temperature."""
    pooled = F.avg_pool2d(logits, kernel_size=2, stride=2, padding=0, ceil_mode=True)
    distribution = torch.softmax(pooled.flatten(2) / temperature, dim=2)
    return torch.bmm(distribution, distribution.transpose(1, 2))


class CriterionDoubleSimKD(nn.Module):
    """(psd_loss, csd_loss) of lists of L >= 2 maps of the student and the teacher, the logits last.

    PSD: every map (N x C_l x h x w; the channel counts may differ between maps and networks) becomes its
    attention vector a_l (losses/at.py: the L2-normalised channel mean of the squared map, N x h*w). For the
    K = L(L-1)/2 pairs l < m, r_lm = normalise(a_m - a_l), and

        psd_loss = 1/K sum_{l<m} sum_{n,i} (r_S,lm[n,i] - r_T,lm[n,i])^2 / (N * h * w).

    CSD, on the logits (the last maps; the same number of classes): with P the softmax over the positions of
    each class map of the 2x2-average-pooled logits divided by the temperature,

        csd_loss = sum_{n,c,c'} ((P_S P_S^T)[n,c,c'] - (P_T P_T^T)[n,c,c'])^2 / (N * C^2)

    (no temperature^2 factor). No trainable parameters, no random draws.

    Args:
        temperature (float): CSD's temperature, a positive number. Defaults to 4.0.
    """

    def __init__(self, temperature=4.0):
        super().__init__()
        self.temperature = positive_number('temperature', temperature)

    def extra_repr(self):
        return f'temperature={self.temperature}'

    def forward(self, s_list, t_list):
        """s_list, t_list: sequences of L >= 2 maps N x C_l x h x w (the l-th student map resized to the
        teacher's l-th map's size when they differ, see losses/align.py), the logits last.
        Returns (psd_loss, csd_loss), scalars."""
        s_list, t_list = self._check_lists(s_list, t_list)
        # float64 if any map is float64, float32 otherwise (half precisions included)
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in s_list + t_list) else torch.float32
        with autocast_disabled(s_list[0].device.type):
            s_maps = torch.stack([attention_map(x.to(dtype)) for x in s_list])
            with torch.no_grad():
                t_maps = torch.stack([attention_map(x.detach().to(dtype)) for x in t_list])
                t_residuals = pair_residuals(t_maps)
                t_similarity = class_similarity(t_list[-1].detach().to(dtype), self.temperature)
            # every pair term is a mean over the same N*h*w entries: their mean over K pairs is one mean
            psd_loss = F.mse_loss(pair_residuals(s_maps), t_residuals)
            csd_loss = F.mse_loss(class_similarity(s_list[-1].to(dtype), self.temperature), t_similarity)
            return psd_loss, csd_loss

    @staticmethod
    def _check_lists(s_list, t_list):
        for name, maps in (('s_list', s_list), ('t_list', t_list)):
            if not isinstance(maps, (list, tuple)) or not all(isinstance(x, torch.Tensor) for x in maps):
                raise ValueError(f'{name} must be a list of tensors, got {type(maps).__name__}')
        if len(s_list) < 2 or len(s_list) != len(t_list):
            raise ValueError(f's_list and t_list must hold the same number (at least 2) of maps, got {len(s_list)} '
                             f'and {len(t_list)}')
        if any(x.dim() != 4 for x in s_list + t_list):
            raise ValueError('every map of s_list and t_list must be N x C x h x w, got shapes '
                             f'{[tuple(x.shape) for x in s_list]} and {[tuple(x.shape) for x in t_list]}')
        t_shape = (t_list[0].shape[0],) + tuple(t_list[0].shape[2:])
        s_list = [resize_like(s, t) for s, t in zip(s_list, t_list, strict=True)]
        if any((x.shape[0],) + tuple(x.shape[2:]) != t_shape for x in s_list + t_list):
            raise ValueError('the maps of s_list and t_list must share N, h and w (a student map is resized to its '
                             f'teacher map\'s h x w), got {[tuple(x.shape) for x in s_list]} and '
                             f'{[tuple(x.shape) for x in t_list]}')
        if s_list[-1].shape[1] != t_list[-1].shape[1]:
            raise ValueError('the last maps of s_list and t_list (the logits) must have the same number of classes, '
                             f'got {s_list[-1].shape[1]} and {t_list[-1].shape[1]}')
        if min(x.numel() for x in s_list + t_list) == 0:
            raise ValueError(f'empty maps: {[tuple(x.shape) for x in s_list]} and {[tuple(x.shape) for x in t_list]}')
        return s_list, list(t_list)
