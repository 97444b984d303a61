"""The segmentation task loss."""
import torch.nn as nn
import torch.nn.functional as F

from .channel import autocast_disabled, loss_precision

__all__ = ['SegCrossEntropyLoss']


class SegCrossEntropyLoss(nn.Module):
    """Cross-entropy on the logits upsampled (bilinear, align_corners=True) to the label size, averaged
    over the positions whose label is not ignore_index. A batch with no labelled position gives 0 (with
    a zero gradient) where nn.CrossEntropyLoss would give NaN."""

    def __init__(self, ignore_index=-1):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, logits, labels):
        if logits.dim() != 4 or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f'expected logits N x C x h x w and labels N x H x W, got {tuple(logits.shape)} '
                             f'and {tuple(labels.shape)}')
        num_class = logits.shape[1]
        labelled = labels != self.ignore_index
        # The data sets already refuse illegal label values; this check turns a wrong --ignore-label into a
        # clear message on the CPU. On a GPU it would cost a synchronisation every step, so it is skipped.
        out_of_range = labelled & ((labels < 0) | (labels >= num_class)) if labels.device.type == 'cpu' else None
        if out_of_range is not None and out_of_range.any():
            bad = labels[out_of_range].unique()[:10].tolist()
            raise ValueError(f'label values {bad} are neither a class (0..{num_class - 1}) nor the ignore '
                             f'label {self.ignore_index}: check --ignore-label and the dataset\'s label mapping')
        with autocast_disabled(logits.device.type):
            logits = logits.to(loss_precision(logits))
            logits = F.interpolate(logits, labels.shape[-2:], mode='bilinear', align_corners=True)
            total = F.cross_entropy(logits, labels.long(), ignore_index=self.ignore_index, reduction='sum')
            return total / labelled.sum().clamp(min=1)

    def extra_repr(self):
        return f'ignore_index={self.ignore_index}'
