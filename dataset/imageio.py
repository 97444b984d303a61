"""Reading images and label maps as the original read them with OpenCV: images as three 8-bit
channels (grey ones repeated, EXIF orientation not applied), labels as their stored values (palette
indices for palette PNGs, never colours).

torchvision.io (libpng / libjpeg) decodes; torchvision 0.29 deprecates its decoders, so PIL takes
over when they are gone (same results: PIL does not apply EXIF orientation either).
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dataset.errors import DataError

try:
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # a torchvision without image decoders
    decode_image = None



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


def _open_pil(path, what):
    try:
        image = Image.open(path)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise _bad_file(path, what, error) from None


def read_image(path):
    """uint8 tensor (3, H, W) in RGB order."""
    _check_file(path, 'image')
    if decode_image is not None:
        image = _decode_torchvision(path, 'image', ImageReadMode.RGB)
        if image.dtype != torch.uint8:  # 16-bit PNG: keep the high byte, as OpenCV's IMREAD_COLOR does
            image = (image.to(torch.int32) >> 8).to(torch.uint8)
        return image
    pil = _open_pil(path, 'image')
    if pil.mode in ('I;16', 'I;16B', 'I'):
        pil = Image.fromarray((np.asarray(pil, dtype=np.int64) >> 8).astype(np.uint8))
    return torch.from_numpy(np.asarray(pil.convert('RGB')).copy()).permute(2, 0, 1)


def read_label(path):
    """Integer tensor (H, W) of the stored values (uint8, or int32 for 16-bit PNGs)."""
    _check_file(path, 'label')
    if decode_image is not None:
        label = _decode_torchvision(path, 'label', ImageReadMode.UNCHANGED)
    else:
        array = np.asarray(_open_pil(path, 'label'))   # 'P' mode gives the palette indices
        label = torch.from_numpy(array.copy())
        label = label[None] if label.dim() == 2 else label.permute(2, 0, 1)
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
