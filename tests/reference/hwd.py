"""The original HWD loss (zju-SWJ/HWD, losses/hwd_loss.py) restated plainly, loops and all.

A yardstick for the tests and the loss benchmark, never for training: class counts by a loop over images
and classes, distances with the nn losses, the log of a softmax, an unguarded normalisation.
"""
import torch
import torch.nn.functional as F


def original_hwd_loss(preds_S, preds_T, labels, norm=True, L='MSE', process='E', parameter=0.1,
                      DivPixel='None', shift=0.0, activation=False, temperature=4.0):
    """The original algorithm stated plainly, loops and all (the yardstick, not for training):
    counts by a loop over images and classes, distances with the nn losses, log of a softmax,
    unguarded normalisation."""
    n, c, h, w = preds_S.shape
    small_labels = F.interpolate(labels.unsqueeze(1).float(), (h, w), mode='nearest').squeeze(1).long()
    s = preds_S.reshape(n, c, -1)
    t = preds_T.reshape(n, c, -1).detach()
    p_s = F.softmax(s / temperature, dim=-1)
    p_t = F.softmax(t / temperature, dim=-1)
    with torch.no_grad():
        a, b = (p_s, p_t) if activation else (s, t)
        count = torch.ones(n, c, dtype=preds_S.dtype, device=preds_S.device)
        for i in range(n):
            for j in range(c):
                count[i, j] += (small_labels[i] == j).sum()
        if L == 'MSE':
            dist = F.mse_loss(a, b, reduction='none').sum(-1)
        elif L == 'L1':
            dist = F.l1_loss(a, b, reduction='none').sum(-1)
        elif L == 'SMOOTHL1':
            dist = F.smooth_l1_loss(a, b, reduction='none').sum(-1)
        else:
            dist = F.kl_div(a.log(), b, reduction='none').sum(-1)
        divisor = {'None': 1.0, 'N': count, 'SqrtN': count.sqrt(), 'N2': count ** 2}[DivPixel]
        score = dist / divisor
        if norm:
            score = (score - score.mean(1, keepdim=True)) / score.std(1, keepdim=True) + shift
        if process == 'E':
            score = (1 - parameter ** score) / (1 - parameter)
        else:
            score = score / parameter
        weight = F.softmax(score, dim=-1) * c
    kl = F.kl_div(p_s.log(), p_t, reduction='none').sum(-1) * temperature ** 2
    return (weight * kl).sum() / (n * c)
