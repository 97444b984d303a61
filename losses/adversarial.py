"""The adversarial terms of SKD and IFVD (hinge loss): the student's logits should look like the
teacher's to a discriminator, which learns to tell them apart.

Papers: "Structured Knowledge Distillation for Semantic Segmentation", Liu et al., CVPR 2019,
https://arxiv.org/abs/1903.04197 (holistic distillation); the hinge loss as in "Self-Attention Generative
Adversarial Networks", Zhang et al., ICML 2019, https://arxiv.org/abs/1805.08318.

Differences from the original zju-SWJ/HWD code (CriterionAdvForG and CriterionAdv in losses/loss.py): the
same values; the loss type is the hinge loss the scripts hard-code (no `adv_type` argument, the WGAN-GP
variant is not provided), a shape mismatch raises ValueError rather than failing an assert, and
half-precision inputs are computed in float32.
"""
import torch.nn as nn
import torch.nn.functional as F

from .channel import autocast_disabled, loss_precision

__all__ = ['CriterionAdvForG', 'CriterionAdv']


def _check_scores(name, scores):
    if scores.numel() == 0:
        raise ValueError(f'{name} is empty: {tuple(scores.shape)}')


class CriterionAdvForG(nn.Module):
    """The student's (generator's) side: loss = -mean(D(S)), the mean over every element of the
    discriminator's scores of the student's logits."""

    def forward(self, d_out_S):
        """d_out_S: the discriminator's output on the student's logits (any shape). Returns a scalar."""
        _check_scores('d_out_S', d_out_S)
        with autocast_disabled(d_out_S.device.type):
            return -d_out_S.to(loss_precision(d_out_S)).mean()


class CriterionAdv(nn.Module):
    """The discriminator's side, hinge loss:

        loss = mean(relu(1 - D(T))) + mean(relu(1 + D(S)))

    the teacher's logits being the real samples and the student's the fake ones. Both scores carry
    gradient to the discriminator (the logits fed to it are detached by the caller).
    """

    def forward(self, d_out_S, d_out_T):
        """d_out_S, d_out_T: the discriminator's outputs on the student's and the teacher's logits, of
        the same shape. Returns a scalar."""
        if d_out_S.shape != d_out_T.shape:
            raise ValueError('the discriminator scores of the student and the teacher must have the same shape, '
                             f'got {tuple(d_out_S.shape)} and {tuple(d_out_T.shape)}')
        _check_scores('d_out_S', d_out_S)
        dtype = loss_precision(d_out_S)
        with autocast_disabled(d_out_S.device.type):
            real = F.relu(1.0 - d_out_T.to(dtype)).mean()
            fake = F.relu(1.0 + d_out_S.to(dtype)).mean()
            return real + fake
