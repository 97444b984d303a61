"""Losses: the segmentation task loss and the distillation losses of every training script.

| module | losses | script |
|---|---|---|
| task.py | SegCrossEntropyLoss | all |
| cwd.py | CriterionCWD, FeatureAdapter | train_cwd.py |
| hwd_loss.py | CriterionHWD | train_hwd.py |
| kd.py | CriterionKD | train_kd.py, train_skd.py, train_ifvd.py, train_cirkd.py |
| dist.py | CriterionDIST | train_dist.py |
| mgd.py | CriterionMGD | train_mgd.py |
| pairwise.py | CriterionPairWise | train_skd.py |
| ifv.py | CriterionIFV | train_ifvd.py |
| adversarial.py | CriterionAdvForG, CriterionAdv | train_skd.py, train_ifvd.py |
| cirkd.py | CriterionMiniBatchCrossImagePair, StudentSegContrast | train_cirkd.py, train_cirkdv2.py |
| cirkd_channel.py | StudentSegChannelContrast | train_cirkdv2.py |
| at.py | CriterionAT | train_at.py |
| fitnet.py | CriterionFitNet | train_fitnet.py, train_cirkdv2.py |
| dsd.py | CriterionDoubleSimKD | train_dsd.py |
| gcn.py | GCN | train_cirkdv2.py |
| afdcd.py | OmniContrastiveFeatureLoss | train_afdcd.py |

align.py (the student's map resized to the teacher's), channel.py (the error type, the loss precision) and
checks.py (the constructor arguments' checks) serve them all.
"""
from .adversarial import CriterionAdv, CriterionAdvForG
from .afdcd import OmniContrastiveFeatureLoss
from .at import CriterionAT
from .channel import LossSettingError
from .cirkd import CriterionMiniBatchCrossImagePair, StudentSegContrast
from .cirkd_channel import StudentSegChannelContrast
from .cwd import CriterionCWD, FeatureAdapter
from .dist import CriterionDIST
from .dsd import CriterionDoubleSimKD
from .fitnet import CriterionFitNet
from .gcn import GCN
from .hwd_loss import CriterionHWD
from .ifv import CriterionIFV
from .kd import CriterionKD
from .mgd import CriterionMGD
from .pairwise import CriterionPairWise
from .task import SegCrossEntropyLoss

__all__ = ['SegCrossEntropyLoss', 'CriterionCWD', 'CriterionHWD', 'FeatureAdapter', 'LossSettingError',
           'CriterionKD', 'CriterionDIST', 'CriterionMGD', 'CriterionPairWise', 'CriterionIFV',
           'CriterionAdvForG', 'CriterionAdv', 'CriterionMiniBatchCrossImagePair', 'StudentSegContrast',
           'StudentSegChannelContrast',
           'CriterionAT', 'CriterionFitNet', 'CriterionDoubleSimKD', 'GCN', 'OmniContrastiveFeatureLoss']
