"""Segmentation networks (SPEC 1) and their checkpoint loading."""
from .checkpoint import CheckpointError, read_state_dict
from .model_zoo import MODEL_BACKBONES, get_segmentation_model

__all__ = ['CheckpointError', 'MODEL_BACKBONES', 'get_segmentation_model', 'read_state_dict']
