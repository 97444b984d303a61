"""Machinery shared by CWD and HWD: per-channel spatial distributions, their KL divergence, the
distances between channels, input checks and the precision policy.

Every channel of an N x C x H x W map becomes a distribution over its H*W positions,
P = softmax(X / tau). On the CPU, touching freshly allocated memory is much of what these losses
cost, so the code below allocates as few N x C x H*W tensors as it can and reuses its buffers.
"""
import contextlib

import torch
import torch.nn.functional as F

from utils.errors import UserError

DISTANCES = ('MSE', 'L1', 'SMOOTHL1', 'KL')


class LossSettingError(UserError, ValueError):
    """A loss built with a flag value that makes no sense. A ValueError for library callers, a UserError
    (printed without a traceback) for the scripts."""


def check_temperature(temperature):
    temperature = float(temperature)
    if not 0 < temperature < float('inf'):
        raise LossSettingError(f'--temperature must be a positive number, got {temperature}')
    return temperature


def loss_precision(tensor):
    """float32 for half, bfloat16 and float32 inputs (the losses sum thousands of small terms and take
    exponentials, which half precisions cannot carry); float64 stays float64 (gradcheck)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def autocast_disabled(device_type):
    # Under autocast some ops would be re-cast to a half precision; the losses manage precision themselves.
    if device_type in ('cpu', 'cuda'):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def check_pair(preds_S, preds_T):
    if preds_S.dim() != 4 or preds_S.shape != preds_T.shape:
        raise ValueError('student and teacher maps must both be N x C x H x W of the same shape, got '
                         f'{tuple(preds_S.shape)} and {tuple(preds_T.shape)}')


def channel_distance(L, a, b, out=None):
    """Sum over the last axis of the elementwise MSE, L1 or SMOOTHL1 distance between a and b
    (N x C x H*W -> N x C; the KL distance is the loss's own KL term), with
    the same rounding as the nn losses with reduction 'none'. `out` is an optional workspace of a's
    shape that MSE and L1 write into instead of allocating."""
    if L == 'SMOOTHL1':
        return F.smooth_l1_loss(a, b, reduction='none', beta=1.0).sum(-1)
    diff = torch.sub(a, b, out=out) if out is not None else a - b
    return (diff.abs_() if L == 'L1' else diff.square_()).sum(-1)


class _ChannelKL(torch.autograd.Function):
    """KL(P_T[n,c] || P_S[n,c]) summed over the positions, an N x C tensor differentiable in the student
    logits; optionally also the N x C distances HWD weighs channels by (no gradient).

    Written by hand so that each softmax is computed once and serves the forward value, the distances
    and the backward pass, d KL / d s = (P_S - P_T) / tau (P_T sums to 1), and so that the big
    temporaries are reused instead of allocated again; only P_S - P_T is kept for the backward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, distance, on_probabilities):
        n, c = student_logits.shape[:2]
        student = student_logits.reshape(n, c, -1)
        teacher = teacher_logits.reshape(n, c, -1)
        scaled = teacher / temperature
        p_t = torch.softmax(scaled, dim=-1)
        log_p_t = torch.log_softmax(scaled, dim=-1)
        scaled = torch.div(student, temperature, out=scaled)  # the teacher's buffer is free again
        p_s = torch.softmax(scaled, dim=-1)
        log_p_s = torch.log_softmax(scaled, dim=-1)
        # log P_S is finite for finite logits, so a P_T that underflowed to 0 contributes 0, as in kl_div.
        work = torch.sub(log_p_t, log_p_s, out=log_p_s)
        kl = work.mul_(p_t).sum(-1)
        del log_p_t
        p_diff = torch.sub(p_s, p_t, out=scaled)
        if distance is None:
            dist = kl.new_empty(0)
        elif distance == 'KL':
            dist = kl.clone()
        elif distance == 'SMOOTHL1':
            dist = channel_distance(distance, *((p_s, p_t) if on_probabilities else (student, teacher)))
        elif on_probabilities:
            # Same rounding as mse_loss / l1_loss then sum, from the difference the backward needs anyway.
            dist = (torch.mul(p_diff, p_diff, out=work) if distance == 'MSE' else torch.abs(p_diff, out=work)).sum(-1)
        else:
            dist = channel_distance(distance, student, teacher, out=work)
        ctx.save_for_backward(p_diff)
        ctx.temperature = temperature
        ctx.input_shape = student_logits.shape
        ctx.mark_non_differentiable(dist)
        return kl, dist

    @staticmethod
    def backward(ctx, grad_kl, _grad_dist):
        (p_diff,) = ctx.saved_tensors
        grad = p_diff * (grad_kl / ctx.temperature).unsqueeze(-1)
        return grad.reshape(ctx.input_shape), None, None, None, None


def channel_kl(preds_S, preds_T, temperature, distance=None, on_probabilities=True):
    """Per-(n, c) KL(P_T || P_S) over the H*W positions of the N x C x H x W maps (N x C, differentiable
    in preds_S; preds_T is never differentiated), and the per-(n, c) `distance` ('MSE', 'L1',
    'SMOOTHL1', 'KL' or None) between the student's and the teacher's channels, on P
    (on_probabilities) or on the raw maps (N x C, detached; empty when distance is None). Both maps
    must have the same floating dtype."""
    return _ChannelKL.apply(preds_S, preds_T.detach(), temperature, distance, on_probabilities)
