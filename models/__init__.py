"""Segmentation networks (the model zoo of CIRKD: DeepLabV3 and PSPNet on dilated ResNets and MobileNetV2) and
their checkpoint loading."""
from .checkpoint import CheckpointError, read_state_dict
from .model_zoo import MODEL_BACKBONES, get_segmentation_model

__all__ = ['CheckpointError', 'MODEL_BACKBONES', 'get_segmentation_model', 'read_state_dict']
