"""Masked generative distillation (MGD): random pixels of the student's features are masked out and a
small generator must rebuild the teacher's whole feature map from what is left.

Paper: "Masked Generative Distillation", Yang et al., ECCV 2022,
https://arxiv.org/abs/2205.01529. The loss and its scale are those of the original zju-SWJ/HWD code
(train_mgd.py): a sum of squared errors divided by the batch size, weighed by a small alpha (2e-5) there.

Differences from the original zju-SWJ/HWD code: the channel counts come from the networks (the original
fixed 128 -> 256); the mask is drawn from a generator the caller can seed (the original used torch's
unseeded global one) or passed in; the teacher's features are detached inside the loss; the settings are
checked; half-precision inputs are computed in float32 (the parameters are cast to the precision of the
computation, so a float32 module serves float64 features too).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .channel import LossSettingError, autocast_disabled, loss_precision
from .checks import check_channels

__all__ = ['CriterionMGD', 'draw_pixel_mask', 'pixel_mask']


def draw_pixel_mask(generator, drop_probability, n, h, w, device=None, dtype=torch.float32):
    """N x 1 x h x w of 0 (dropped) and 1 (kept), on `device` in `dtype`: with u uniform in [0, 1) drawn from
    `generator` (a CPU generator; None: torch's default one) in float32 on the CPU whatever the device and
    dtype, so one generator state gives the same mask everywhere, 0 where u > 1 - drop_probability. The
    comparison runs in float32 with 1 - drop_probability rounded to float32, exactly as MGD's and Af-DCD's
    originals (torch.rand, then torch.where(u > 1 - ratio, 0, 1))."""
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != 'cpu'):
        raise ValueError(f'generator must be a CPU torch.Generator or None, got {generator!r}')
    uniform = torch.rand(n, 1, h, w, generator=generator, dtype=torch.float32, device='cpu')
    dropped = uniform > 1 - drop_probability
    return dropped.logical_not_().to(device=device, dtype=dtype)


def pixel_mask(mask, draw, n, h, w, device=None, dtype=torch.float32):
    """A caller's N x 1 x h x w `mask` of 0 and 1 (floating or bool), checked and detached, on `device` in
    `dtype`; when it is None, draw(n, h, w, device=device, dtype=dtype)."""
    if mask is None:
        return draw(n, h, w, device=device, dtype=dtype)
    if tuple(mask.shape) != (n, 1, h, w) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f'mask must be a floating or bool tensor of shape {(n, 1, h, w)}, got '
                         f'{mask.dtype} {tuple(mask.shape)}')
    mask = mask.detach().to(device=device, dtype=dtype)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError('mask must hold only 0 and 1')
    return mask


class CriterionMGD(nn.Module):
    """loss = sum over all elements of (generation(align(S) * M) - T)^2 / N, with

    S, T     student (N x Cs x h x w) and teacher (N x Ct x h x w) features;
    align    1x1 convolution Cs -> Ct with bias (applied even when Cs = Ct);
    M        N x 1 x h x w spatial mask, the same for every channel: with u uniform in [0, 1) drawn in
             float32 on the CPU, M = 0 where u > 1 - lambda_mgd and 1 elsewhere (lambda_mgd is the
             probability of dropping a pixel);
    generation  3x3 convolution Ct -> Ct (padding 1, bias), ReLU, 3x3 convolution Ct -> Ct (padding 1, bias).

    The parameters (keys `align.*`, `generation.0.*`, `generation.2.*`, PyTorch's default initialisation)
    are trained with the student. `generator` is a plain attribute, not state: the training loop may
    replace or reseed it; None draws from torch's default CPU generator.

    Args:
        student_channels (int): Cs. Defaults to 128.
        teacher_channels (int): Ct. Defaults to 256.
        lambda_mgd (float): probability of masking a pixel, in [0, 1]. Defaults to 0.75.
        generator (torch.Generator | None): the CPU generator of the masks. Defaults to None.
    """

    def __init__(self, student_channels=128, teacher_channels=256, lambda_mgd=0.75, generator=None):
        super().__init__()
        self.student_channels = check_channels('student_channels', student_channels)
        self.teacher_channels = check_channels('teacher_channels', teacher_channels)
        lambda_mgd = float(lambda_mgd)
        if not 0 <= lambda_mgd <= 1:
            raise LossSettingError(f'lambda_mgd must be a number in [0, 1], got {lambda_mgd}')
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != 'cpu'):
            raise LossSettingError(f'generator must be a CPU torch.Generator or None, got {generator!r}')
        self.lambda_mgd = lambda_mgd
        self.generator = generator
        self.align = nn.Conv2d(self.student_channels, self.teacher_channels, kernel_size=1)
        self.generation = nn.Sequential(
            nn.Conv2d(self.teacher_channels, self.teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.teacher_channels, self.teacher_channels, kernel_size=3, padding=1))

    def extra_repr(self):
        return (f'student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, '
                f'lambda_mgd={self.lambda_mgd}')

    def draw_mask(self, n, h, w, device=None, dtype=torch.float32):
        """A fresh N x 1 x h x w mask of 0 (dropped) and 1 (kept) from `self.generator`, on `device`.
        Drawn in float32 on the CPU whatever the device and dtype (as the original), so one generator
        state gives the same mask everywhere."""
        return draw_pixel_mask(self.generator, self.lambda_mgd, n, h, w, device=device, dtype=dtype)

    def forward(self, preds_S, preds_T, mask=None):
        """preds_S: student features N x Cs x h x w; preds_T: teacher features N x Ct x h x w;
        mask: optional N x 1 x h x w tensor of 0 and 1 (floating or bool) used instead of a random
        draw (then nothing is drawn). Returns a scalar."""
        preds_S = resize_like(preds_S, preds_T)  # another family's stride (losses/align.py)
        if preds_S.dim() != 4 or preds_T.dim() != 4:
            raise ValueError(f'MGD needs N x C x h x w features, got {tuple(preds_S.shape)} and '
                             f'{tuple(preds_T.shape)}')
        n, c_s, h, w = preds_S.shape
        if c_s != self.student_channels or tuple(preds_T.shape) != (n, self.teacher_channels, h, w):
            raise ValueError(f'MGD built for {self.student_channels} student and {self.teacher_channels} teacher '
                             f'channels got features {tuple(preds_S.shape)} and {tuple(preds_T.shape)}')
        if math.prod((n, h, w)) == 0:
            raise ValueError(f'MGD needs at least one image and one pixel, got {tuple(preds_S.shape)}')
        dtype = loss_precision(preds_S)
        device = preds_S.device
        mask = pixel_mask(mask, self.draw_mask, n, h, w, device=device, dtype=dtype)
        with autocast_disabled(device.type):
            aligned = self._conv(self.align, preds_S.to(dtype), dtype)
            hidden = self.generation[1](self._conv(self.generation[0], aligned * mask, dtype))
            rebuilt = self._conv(self.generation[2], hidden, dtype)
            return (rebuilt - preds_T.detach().to(dtype)).square().sum() / n

    @staticmethod
    def _conv(conv, x, dtype):
        # The layer's own weights in the precision of the computation (a no-op when they match);
        # the gradient still reaches the parameters in their own dtype.
        return F.conv2d(x, conv.weight.to(dtype), conv.bias.to(dtype), conv.stride, conv.padding,
                        conv.dilation, conv.groups)
