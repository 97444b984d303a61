"""Reading images and label maps as the original read them with OpenCV: images as three 8-bit
channels (grey ones repeated, EXIF orientation not applied), labels as their stored values (palette
indices for palette PNGs, never colours).

torchvision.io (libpng / libjpeg) decodes (PIL would give the same: it does not apply EXIF orientation
either).
"""
import os
import warnings

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from dataset.errors import DataError


def _check_file(path, what):
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise DataError(f'cannot read {what} {path}: {error.strerror or error}') from None
    if size == 0:
        raise DataError(f'{what} {path} is an empty file')


def _bad_file(path, what, error):
    detail = str(error).strip().splitlines()
    return DataError(f'{what} {path} cannot be decoded (corrupt, truncated or not an image): '
                     f'{detail[-1] if detail else type(error).__name__}')


def _decode_torchvision(path, what, mode):
    try:
        with warnings.catch_warnings():  # torchvision 0.29's deprecation notice, once per image
            warnings.simplefilter('ignore', DeprecationWarning)
            return decode_image(read_file(path), mode=mode)
    except (RuntimeError, ValueError, OSError) as error:
        raise _bad_file(path, what, error) from None


def read_image(path):
    """uint8 tensor (3, H, W) in RGB order."""
    _check_file(path, 'image')
    image = _decode_torchvision(path, 'image', ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # 16-bit PNG: keep the high byte, as OpenCV's IMREAD_COLOR does
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def read_label(path):
    """Integer tensor (H, W) of the stored values (uint8, or int32 for 16-bit PNGs)."""
    _check_file(path, 'label')
    label = _decode_torchvision(path, 'label', ImageReadMode.UNCHANGED)
    if label.dtype != torch.uint8:
        label = label.to(torch.int32)
    channels = label.shape[0]
    if channels == 2:  # grey + alpha: the ids are in the grey channel
        label = label[:1]
    elif channels in (3, 4):
        # A colour label is only acceptable when it is grey stored as RGB (all channels equal).
        if not (torch.equal(label[0], label[1]) and torch.equal(label[0], label[2])):
            raise DataError(f'label {path} is a colour image; expected a single-channel PNG of class ids '
                            f'(grey or palette), not a colourised label map')
        label = label[:1]
    return label[0]
