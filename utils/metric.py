"""Segmentation metrics from one confusion matrix, exact on any number of processes.

Counts are int64 (no float accumulation), so the sum over processes does not depend on how the images
were split between them. Definitions:
- pixAcc = correctly classified pixels / labelled pixels (label not ignored);
- IoU[c] = TP / (TP + FP + FN) over the labelled pixels; NaN when that union is empty, i.e. class c
  occurs neither in the labels nor in the predictions;
- mIoU = mean of IoU over the classes whose union is not empty.
"""
import math

import torch

from utils.distributed import all_reduce_sum


class ConfusionMatrix:
    """`mat[t, p]` = number of labelled pixels of true class t predicted as class p."""

    def __init__(self, num_class, device='cpu'):
        if num_class < 1:
            raise ValueError(f'num_class must be positive, got {num_class}')
        self.num_class = int(num_class)
        self.mat = torch.zeros((self.num_class, self.num_class), dtype=torch.int64, device=device)

    def reset(self):
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred, label):
        """Add a batch: `pred` class indices, `label` true classes, same shape (e.g. N x H x W).

        Label values < 0 or >= num_class (the ignore label, -1 or 255) are not counted.
        """
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label)
        if pred.shape != label.shape:
            raise ValueError(f'prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}')
        if pred.is_floating_point():
            raise ValueError('pred must hold class indices (argmax of the logits), not scores')
        n = self.num_class
        pred = pred.to(self.mat.device, torch.int64).reshape(-1)
        label = label.to(self.mat.device, torch.int64).reshape(-1)
        labelled = (label >= 0) & (label < n)
        pred = pred[labelled]
        label = label[labelled]
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n):
            raise ValueError(f'predicted class indices must lie in [0, {n})')
        self.mat += torch.bincount(label * n + pred, minlength=n * n).reshape(n, n)
        return self

    def reduce_from_all_processes(self):
        """Sum the counts over all processes (no-op without a process group)."""
        all_reduce_sum(self.mat)
        return self

    def compute(self):
        """(pixAcc, mIoU, IoU per class) as fractions in [0, 1]; IoU is a float64 CPU tensor with NaN
        for classes that occur neither in the labels nor in the predictions."""
        mat = self.mat.detach().to('cpu', torch.float64)
        true_positive = mat.diagonal()
        union = mat.sum(dim=1) + mat.sum(dim=0) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))
        labelled = mat.sum()
        pix_acc = (true_positive.sum() / labelled).item() if labelled > 0 else math.nan
        present = ~torch.isnan(iou)
        miou = iou[present].mean().item() if bool(present.any()) else math.nan
        return pix_acc, miou, iou

    def chance_miou(self):
        """The mIoU any trained network must clear: twice that of predicting the most frequent labelled class
        everywhere (its IoU is its share of the labelled pixels, every other class scores 0), averaged over the
        classes present, and at least 1 / num_class."""
        counts = self.mat.detach().sum(dim=1).double().cpu()
        present = int((counts > 0).sum())
        constant = float(counts.max() / counts.sum()) / max(present, 1) if counts.sum() > 0 else 0.0
        return max(2 * constant, 1 / self.num_class)

    def __repr__(self):
        pix_acc, miou, _ = self.compute()
        return f'ConfusionMatrix(num_class={self.num_class}, pixAcc={pix_acc:.5f}, mIoU={miou:.5f})'


def format_iou_table(iou, class_names):
    """Per-class IoU table (percent, three decimals); classes absent from labels and predictions show '-'."""
    iou = torch.as_tensor(iou, dtype=torch.float64)
    if len(class_names) != iou.numel():
        raise ValueError(f'{len(class_names)} class names for {iou.numel()} IoU values')
    width = max([len('class')] + [len(str(name)) for name in class_names])
    lines = [f'{"id":>3}  {"class":<{width}}  {"IoU (%)":>8}']
    for index, (name, value) in enumerate(zip(class_names, iou.tolist(), strict=True)):
        shown = '-' if math.isnan(value) else f'{value * 100:.3f}'
        lines.append(f'{index:>3}  {str(name):<{width}}  {shown:>8}')
    return '\n'.join(lines)


def format_summary(pix_acc, miou):
    """The original's summary line (percent, three decimals)."""
    return 'Overall validation pixAcc: {:.3f}, mIoU: {:.3f}'.format(pix_acc * 100, miou * 100)
