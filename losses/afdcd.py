"""Augmentation-free dense contrastive distillation (Af-DCD): masked feature mimicking (the student's feature,
randomly masked, is projected to rebuild the teacher's) and an omni-contrastive term between the rebuilt and
the teacher's features, cut into local patches across space and channel groups.

Paper: J. Fan, C. Li, X. Liu, M. Song, A. Yao, "Augmentation-free Dense Contrastive Knowledge Distillation for
Efficient Semantic Segmentation", NeurIPS 2023, https://arxiv.org/abs/2312.04168. The losses of the original
code, OSVAI/Af-DCD (losses/ocmgd.py, OmniContrastiveFeatureLoss), which distils the backbone's last stage.

Differences from the original (the values are the same wherever the original runs):
- equal student and teacher channel counts work: the alignment is then the identity (the original called an
  align layer it had not built);
- the pooled map is cropped top-left to the largest multiple of the patch size when it is not one (the
  original failed with a reshape error); for dataset 'camvid' (no pooling) this rule replaces the original's
  hard-coded crop to 44 x 44, which it gives for CamVid's 360 x 360 crops (45 x 45 features);
- channels not divisible by M_ocd, and every other bad setting, are refused at construction;
- the random mask comes from the CPU generator in the attribute `generator` (the training loop sets and
  saves it; None: torch's default generator, as the original), or is passed in;
- the teacher's feature is detached inside the loss, a student feature of another spatial size is resized to
  the teacher's (losses/align.py), half-precision inputs are computed in float32 (the parameters are cast to
  the precision of the computation, so a float32 module serves float64 features too);
- the contrastive term takes the log-sum-exp of each row of the patch's similarity matrix over the allowed
  columns instead of gathering the positive and the negatives with boolean masks and concatenating them.

Parameter names: the original's, with its misspellings corrected, registered in the same order (so the values
of an original state_dict, in order, load into this module's keys, in order):

| original | here |
|---|---|
| align.weight, align.bias (only when the channel counts differ) | align.weight, align.bias (the same) |
| projetor.0.*, projetor.2.* | projector.0.*, projector.2.* |
| projetor.block_1.0.*, projetor.block_2.0.* (enhance_projector) | projector.block_1.0.*, projector.block_2.0.* |
| projetor.adpator_1.*, projetor.adpator_2.* (enhance_projector) | projector.adapter_1.*, projector.adapter_2.* |
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .align import resize_like
from .channel import LossSettingError, autocast_disabled, loss_precision
from .checks import check_channels, integer_at_least, number, positive_number, switch
from .fitnet import CastingConv2d, check_feature_channels
from .mgd import draw_pixel_mask, pixel_mask

__all__ = ['OmniContrastiveFeatureLoss', 'EnhancedProjector', 'omni_contrastive_loss']


def _conv3x3(channels):
    return CastingConv2d(channels, channels, kernel_size=3, padding=1)


class EnhancedProjector(nn.Module):
    """(adapter_1(h1) + adapter_2(h2)) / 2 with h1 = block_1(x), h2 = block_2(h1); the blocks are a 3x3
    convolution and ReLU, the adapters 3x3 convolutions (all with bias, channels -> channels)."""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = nn.Sequential(_conv3x3(channels), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(_conv3x3(channels), nn.ReLU(inplace=True))
        self.adapter_1 = _conv3x3(channels)
        self.adapter_2 = _conv3x3(channels)

    def forward(self, x):
        hidden_1 = self.block_1(x)
        hidden_2 = self.block_2(hidden_1)
        return (self.adapter_1(hidden_1) + self.adapter_2(hidden_2)) / 2


def _patch_samples(x, groups, patch_size):
    """N x C x H x W (H, W multiples of the patch) -> (N * patches) x (ph * pw * groups) x (C / groups): the
    samples of every patch (patches row-major), pixel-in-patch (row-major) major, channel group minor; the
    groups are consecutive channels."""
    n, c, h, w = x.shape
    ph, pw = patch_size
    x = x.reshape(n, groups, c // groups, h // ph, ph, w // pw, pw)
    return x.permute(0, 3, 5, 4, 6, 1, 2).reshape(-1, ph * pw * groups, c // groups)


class _PatchCrossEntropy(torch.autograd.Function):
    """sum over the rows of B x R x R logits of logsumexp(allowed entries of the row) - the diagonal entry
    (the cross-entropy with the diagonal as the target); `allowed` (R x R, bool) holds the diagonal.

    Written by hand so that the exponentials are taken once (the backward reuses the softmax), and so that exp()
    never gets an argument below log of the smallest normal number: the contrast's logits span hundreds of
    units, and on the CPU exp() of arguments whose result underflows is several times slower. The clamp changes
    a row sum (at least 1) by less than R times that smallest number."""

    @staticmethod
    def forward(ctx, logits, allowed):
        peak = logits.masked_fill(~allowed, -math.inf).amax(dim=2, keepdim=True)
        floor = math.log(torch.finfo(logits.dtype).tiny)
        # the entries left out of a row (the same group at another pixel) may lie far above its peak: capped at
        # 0 before exp() (no overflow to inf, whose product with the mask would be NaN), then zeroed
        softmax = (logits - peak).clamp_(min=floor, max=0.0).exp_().mul_(allowed)
        row_sums = softmax.sum(dim=2, keepdim=True)
        softmax.div_(row_sums)
        ctx.save_for_backward(softmax)
        return (row_sums.log_() + peak).sum() - logits.diagonal(dim1=1, dim2=2).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (softmax,) = ctx.saved_tensors
        grad = softmax * grad_output
        grad.diagonal(dim1=1, dim2=2).sub_(grad_output)
        return grad, None


def omni_contrastive_loss(preds, targets, groups, patch_size, temperature):
    """Af-DCD's contrastive term on maps N x C x H x W (pooled already, H and W multiples of the patch):
    sum over the samples (pixel, group) of every patch of the cross-entropy of

        [-|s_(p,g) - t_(p,g)|_1, -|s_(p,g) - t_(p',g')|_1 for all p' and g' != g] / temperature

    with target 0 (its own teacher sample is the positive; the teacher samples of the other groups, at every
    pixel of the patch, the negatives), divided by H * W and by N."""
    n, _, h, w = preds.shape
    group_of = torch.arange(groups, device=preds.device).repeat(patch_size[0] * patch_size[1])
    # the teacher samples of the same group at another pixel are neither the positive nor a negative
    allowed = (group_of.unsqueeze(1) != group_of.unsqueeze(0)).fill_diagonal_(True)
    logits = torch.cdist(_patch_samples(preds, groups, patch_size), _patch_samples(targets, groups, patch_size),
                         p=1) * (-1.0 / temperature)
    return _PatchCrossEntropy.apply(logits, allowed) / (h * w * n)


class OmniContrastiveFeatureLoss(nn.Module):
    """(dis_loss, ctr_loss) of a student feature S (N x Cs x h x w) and a teacher feature T (N x Ct x h x w):

        R = projector(align(S) * mask)
        dis_loss = sum over all elements of (R - T)^2 / N
        ctr_loss = omni_contrastive_loss(pool(R), pool(T)): for each patch of patch_size pixels of the maps
                   max-pooled by pool_size x pool_size windows (stride pool_size, incomplete windows dropped;
                   no pooling for dataset 'camvid' or pool_size 0), cropped top-left to multiples of the
                   patch, and each of its pixel's M_ocd groups of Ct / M_ocd consecutive channels, the
                   cross-entropy of the L1 similarities to the teacher's samples (the positive: the same pixel
                   and group; the negatives: the other groups at every pixel of the patch) over tau_ocd, summed,
                   divided by the pooled h' * w' and by N.

    align is a 1x1 convolution Cs -> Ct with bias (the identity when Cs = Ct); projector is a 3x3 convolution,
    ReLU, 3x3 convolution (Ct -> Ct, padding 1, bias), or the EnhancedProjector with enhance_projector. mask
    (N x 1 x h x w, the same for every channel) is 0 where a uniform draw u in [0, 1) exceeds 1 - mask_ratio
    and 1 elsewhere (rand_mask), or 0 on the middle third of the rows and columns (rows h//3 .. 2h//3 - 1,
    columns w//3 .. 2w//3 - 1) and 1 elsewhere. The draw is made in float32 on the CPU from `self.generator`
    (a CPU torch.Generator the training loop sets; None: torch's default generator), a plain attribute that is
    not part of the state_dict.

    Args:
        student_channels (int): Cs.
        teacher_channels (int): Ct, a multiple of M_ocd.
        tau_ocd (float): the contrastive temperature, positive. Defaults to 0.07.
        M_ocd (int): the number of channel groups. Defaults to 16.
        pool_size (int): the max-pooling window and stride before the contrast; 0: none. Defaults to 4.
        patch_size (tuple[int, int] | int): the patch (rows, columns) on the pooled map. Defaults to (4, 4).
        rand_mask (bool): a random mask (True) or the fixed middle block (False). Defaults to True.
        mask_ratio (float): the probability of masking a pixel, in [0, 1]. Defaults to 0.75.
        enhance_projector (bool): the EnhancedProjector instead of the plain one. Defaults to False.
        dataset (str): 'camvid' contrasts the unpooled maps; any other name pools. Defaults to 'citys'.
    """

    def __init__(self, student_channels, teacher_channels, tau_ocd=0.07, M_ocd=16, pool_size=4, patch_size=(4, 4),
                 rand_mask=True, mask_ratio=0.75, enhance_projector=False, dataset='citys'):
        super().__init__()
        self.student_channels = check_channels('student_channels', student_channels)
        self.teacher_channels = check_channels('teacher_channels', teacher_channels)
        self.tau_ocd = positive_number('tau_ocd', tau_ocd)
        self.M_ocd = integer_at_least('M_ocd', M_ocd, 1)
        if self.teacher_channels % self.M_ocd:
            raise LossSettingError(f'M_ocd ({self.M_ocd}) must divide teacher_channels ({self.teacher_channels}): '
                                   'the contrast cuts the channels into M_ocd equal groups')
        self.pool_size = integer_at_least('pool_size', pool_size, 0)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        if not isinstance(patch, (tuple, list)) or len(patch) != 2:
            raise LossSettingError(f'patch_size must be a pair of whole numbers >= 1, got {patch_size!r}')
        self.patch_size = tuple(integer_at_least('patch_size', side, 1) for side in patch)
        self.rand_mask = switch('rand_mask', rand_mask)
        self.mask_ratio = number('mask_ratio', mask_ratio)
        if not 0 <= self.mask_ratio <= 1:
            raise LossSettingError(f'mask_ratio must be a number in [0, 1], got {self.mask_ratio}')
        self.enhance_projector = switch('enhance_projector', enhance_projector)
        if not isinstance(dataset, str):
            raise LossSettingError(f'dataset must be a data set name, got {dataset!r}')
        self.dataset = dataset
        self.generator = None
        if self.student_channels == self.teacher_channels:
            self.align = nn.Identity()
        else:
            self.align = CastingConv2d(self.student_channels, self.teacher_channels, kernel_size=1)
        if self.enhance_projector:
            self.projector = EnhancedProjector(self.teacher_channels)
        else:
            self.projector = nn.Sequential(_conv3x3(self.teacher_channels), nn.ReLU(inplace=True),
                                           _conv3x3(self.teacher_channels))

    def extra_repr(self):
        return (f'student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, '
                f'tau_ocd={self.tau_ocd}, M_ocd={self.M_ocd}, pool_size={self.pool_size}, '
                f'patch_size={self.patch_size}, rand_mask={self.rand_mask}, mask_ratio={self.mask_ratio}, '
                f'dataset={self.dataset!r}')

    @property
    def pools(self):
        """Whether the contrast max-pools the maps (not for CamVid, as the original, nor for pool_size 0)."""
        return self.dataset != 'camvid' and self.pool_size != 0

    def contrast_size(self, h, w):
        """The h' x w' the contrast works on for h x w features: pooled, then cropped to patch multiples."""
        if self.pools:
            h, w = h // self.pool_size, w // self.pool_size
        return h - h % self.patch_size[0], w - w % self.patch_size[1]

    def make_mask(self, n, h, w, device=None, dtype=torch.float32):
        """A fresh N x 1 x h x w mask of 0 and 1 (the rule of rand_mask; the random one from self.generator)."""
        if self.rand_mask:
            return draw_pixel_mask(self.generator, self.mask_ratio, n, h, w, device=device, dtype=dtype)
        mask = torch.ones(n, 1, h, w, device=device, dtype=dtype)
        mask[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3] = 0
        return mask

    def forward(self, feat_S, feat_T, mask=None):
        """feat_S: N x Cs x h x w (resized to the teacher's h x w when it differs, see losses/align.py);
        feat_T: N x Ct x h x w; mask: an N x 1 x h x w tensor of 0 and 1 (floating or bool) used instead of
        make_mask (then nothing is drawn). Returns (dis_loss, ctr_loss), scalars."""
        feat_S = resize_like(feat_S, feat_T)
        check_feature_channels(feat_S, feat_T, self.student_channels, self.teacher_channels, 'Af-DCD')
        n, _, h, w = feat_T.shape
        if min(self.contrast_size(h, w)) == 0:
            pooled = f'pooled by {self.pool_size} to {h // self.pool_size} x {w // self.pool_size}, ' if self.pools \
                else ''
            raise ValueError(f'Af-DCD features of {h} x {w} ({pooled}patch_size {self.patch_size}) hold no patch: '
                             'use larger crops or a smaller pool_size or patch_size')
        dtype = loss_precision(feat_S)
        device = feat_S.device
        mask = pixel_mask(mask, self.make_mask, n, h, w, device=device, dtype=dtype)
        with autocast_disabled(device.type):
            rebuilt = self.projector(self.align(feat_S.to(dtype)) * mask)
            return self.feature_terms(rebuilt, feat_T.detach().to(dtype))

    def feature_terms(self, rebuilt, teacher):
        """(dis_loss, ctr_loss) of the projector's output and the teacher's feature (both N x Ct x h x w)."""
        n = teacher.shape[0]
        dis_loss = F.mse_loss(rebuilt, teacher, reduction='sum') / n
        ctr_loss = omni_contrastive_loss(self._contrast_map(rebuilt), self._contrast_map(teacher), self.M_ocd,
                                         self.patch_size, self.tau_ocd)
        return dis_loss, ctr_loss

    def _contrast_map(self, x):
        if self.pools:
            x = F.max_pool2d(x, self.pool_size)
        h, w = x.shape[2:]
        return x[:, :, :h - h % self.patch_size[0], :w - w % self.patch_size[1]]
