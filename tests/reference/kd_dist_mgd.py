"""The original KD, DIST and MGD losses (zju-SWJ/HWD, losses/loss.py: CriterionKD, CriterionDIST,
CriterionMGD) restated plainly, the way the original computes them.

A yardstick for the tests, never for training: channel-last flattening with copies, the softmax and
log-softmax as separate tensors, kl_div with 'batchmean', a row-wise cosine with the eps added to the
product of the norms, and MGD's mask drawn from torch's global generator as an int64 tensor. The only
liberty taken: OriginalMGD has its channel counts as arguments (the original fixed them at 128 -> 256,
the defaults here), and its forward can be handed the uniform draw instead of making it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def original_kd_loss(pred, soft, temperature=1):
    """Pixel-wise KD: (N*h*w) x C rows, batchmean KL(softmax(T/tau) || softmax(S/tau)) * tau^2."""
    _, c, _, _ = soft.size()
    rows_s = pred.permute(0, 2, 3, 1).contiguous().view(-1, c)
    rows_t = soft.permute(0, 2, 3, 1).contiguous().view(-1, c)
    log_q = F.log_softmax(rows_s / temperature, dim=1)
    p = F.softmax(rows_t / temperature, dim=1)
    return F.kl_div(log_q, p, reduction='batchmean') * temperature ** 2


def _cosine_rows(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _pearson_rows(a, b, eps=1e-8):
    return _cosine_rows(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def _relation(rows_s, rows_t):
    return 1 - _pearson_rows(rows_s, rows_t).mean()


def original_dist_loss(preds_S, preds_T, beta=1.0, gamma=1.0):
    """DIST on raw logits: rows are pixels (inter-class), then the transposed rows are classes
    over every pixel of the batch (intra-class)."""
    _, c, _, _ = preds_S.size()
    rows_s = preds_S.permute(0, 2, 3, 1).contiguous().view(-1, c)
    rows_t = preds_T.permute(0, 2, 3, 1).contiguous().view(-1, c)
    inter = _relation(rows_s, rows_t)
    intra = _relation(rows_s.transpose(0, 1), rows_t.transpose(0, 1))
    return beta * inter + gamma * intra


def original_mgd_mask(uniform, lambda_mgd):
    """The original's mask from a uniform draw: int64, 0 where u > 1 - lambda, 1 elsewhere."""
    return torch.where(uniform > 1 - lambda_mgd, 0, 1)


class OriginalMGD(nn.Module):
    """MGD as the original builds and runs it (keys align.*, generation.0.*, generation.2.*)."""

    def __init__(self, lambda_mgd, student_channels=128, teacher_channels=256):
        super().__init__()
        self.lambda_mgd = lambda_mgd
        self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        self.generation = nn.Sequential(nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
                                        nn.ReLU(inplace=True),
                                        nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1))

    def forward(self, preds_S, preds_T, uniform=None):
        aligned = self.align(preds_S)
        n, _, h, w = preds_T.shape
        if uniform is None:
            uniform = torch.rand((n, 1, h, w))  # torch's global CPU generator, default dtype
        mask = original_mgd_mask(uniform.to(preds_S.device), self.lambda_mgd).to(preds_S.device)
        rebuilt = self.generation(torch.mul(aligned, mask))
        return nn.MSELoss(reduction='sum')(rebuilt, preds_T) / n
