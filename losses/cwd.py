"""Channel-wise distillation (CWD) and the pieces HWD shares with it.

Every channel of an N x C x H x W map is turned into a distribution over its H*W positions,
P = softmax(X / tau), and the student is pulled towards the teacher by KL(P_T || P_S) per (n, c).
"""
import torch.nn as nn

from .align import resize_like
from .channel import autocast_disabled, channel_kl, check_pair, check_temperature, loss_precision

__all__ = ['CriterionCWD', 'FeatureAdapter']


class CriterionCWD(nn.Module):
    """loss = tau^2 * sum_{n,c} KL(P_T[n,c] || P_S[n,c]) / (N * C), P = softmax over the H*W positions
    of X / tau. Works on logits and on features alike (the feature term passes the student's features
    through a FeatureAdapter first)."""

    def __init__(self, temperature=4.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, preds_S, preds_T):
        preds_S = resize_like(preds_S, preds_T)
        check_pair(preds_S, preds_T)
        n, c = preds_S.shape[:2]
        dtype = loss_precision(preds_S)
        with autocast_disabled(preds_S.device.type):
            kl, _ = channel_kl(preds_S.to(dtype), preds_T.detach().to(dtype), self.temperature)
            return kl.sum() * (self.temperature ** 2 / (n * c))

    def extra_repr(self):
        return f'temperature={self.temperature}'


class FeatureAdapter(nn.Sequential):
    """Maps the student's features to the teacher's channel count for CWD's feature term:
    1x1 convolution without bias, BN, ReLU (as train_cwd.py of the original, with the channel counts
    taken from the networks instead of fixed at 128 -> 256)."""

    def __init__(self, in_channels, out_channels, norm_layer=nn.BatchNorm2d):
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f'FeatureAdapter needs positive channel counts, got {in_channels} -> {out_channels}')
        super().__init__(nn.Conv2d(int(in_channels), int(out_channels), kernel_size=1, bias=False),
                         norm_layer(int(out_channels)),
                         nn.ReLU(inplace=True))
