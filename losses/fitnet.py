"""FitNet: the student's feature, mapped to the teacher's channels by a trainable 1x1 convolution, regresses
the teacher's feature.

Paper: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015, https://arxiv.org/abs/1412.6550, as winycg/CIRKD (losses/fitnet.py) applies it to
segmentation: one hint, the head's feature, a plain mean squared error.

Differences from the original: the same value and the same parameter (`conv.weight`); the teacher's feature
is detached inside the loss, a student feature of another spatial size is resized to the teacher's
(losses/align.py), the shapes and channel counts are checked, and half-precision inputs are computed in
float32 (the weight is cast to the precision of the computation, so a float32 module serves float64
features too).
"""
import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .channel import autocast_disabled, loss_precision
from .checks import check_channels

__all__ = ['CriterionFitNet', 'CastingConv2d']


class CastingConv2d(nn.Conv2d):
    """nn.Conv2d computed in its input's precision: the parameters stay in their own dtype (the optimizer's)
    and are cast for the product, so the gradient reaches them in their own dtype. The same keys as
    nn.Conv2d."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class CriterionFitNet(nn.Module):
    """loss = sum (conv(S) - T)^2 / (N * Ct * h * w), conv a 1x1 convolution Cs -> Ct without bias
    (key `conv.weight`, PyTorch's default initialisation), trained with the student.

    Args:
        s_channels (int): Cs, the student feature's channels.
        t_channels (int): Ct, the teacher feature's channels.
    """

    def __init__(self, s_channels, t_channels):
        super().__init__()
        self.s_channels = check_channels('s_channels', s_channels)
        self.t_channels = check_channels('t_channels', t_channels)
        self.conv = CastingConv2d(self.s_channels, self.t_channels, kernel_size=1, bias=False)

    def extra_repr(self):
        return f's_channels={self.s_channels}, t_channels={self.t_channels}'

    def forward(self, feat_S, feat_T):
        """feat_S: N x Cs x h x w, feat_T: N x Ct x h x w (feat_S resized to the teacher's h x w when they
        differ, see losses/align.py). Returns a scalar."""
        feat_S = resize_like(feat_S, feat_T)
        check_feature_channels(feat_S, feat_T, self.s_channels, self.t_channels, 'FitNet')
        dtype = loss_precision(feat_S)
        with autocast_disabled(feat_S.device.type):
            return F.mse_loss(self.conv(feat_S.to(dtype)), feat_T.detach().to(dtype))


def check_feature_channels(feat_S, feat_T, s_channels, t_channels, method):
    """Both N x C x h x w with the same N, h and w, and the channel counts the module was built for."""
    if feat_S.dim() != 4 or feat_T.dim() != 4 or feat_S.shape[1] != s_channels or feat_T.shape[1] != t_channels \
            or feat_S.shape[0] != feat_T.shape[0] or feat_S.shape[2:] != feat_T.shape[2:]:
        raise ValueError(f'{method} built for {s_channels} student and {t_channels} teacher channels needs features '
                         f'N x {s_channels} x h x w and N x {t_channels} x h x w, got {tuple(feat_S.shape)} and '
                         f'{tuple(feat_T.shape)}')
    if feat_S.numel() == 0 or feat_T.numel() == 0:
        raise ValueError(f'{method} needs at least one image and one pixel, got {tuple(feat_S.shape)}')
