"""Losses: the segmentation task loss, channel-wise distillation (CWD) and HWD."""
from .channel import LossSettingError
from .cwd import CriterionCWD, FeatureAdapter
from .hwd_loss import CriterionHWD
from .task import SegCrossEntropyLoss

__all__ = ['SegCrossEntropyLoss', 'CriterionCWD', 'CriterionHWD', 'FeatureAdapter', 'LossSettingError']
