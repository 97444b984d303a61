"""Pictures for people: de-normalised input images and side-by-side panels (PIL only).

`make_panel([('image', rgb), ('ground truth', colorize_rgb(label, 'citys')), ('prediction', ...)])`
draws the columns left to right with their titles above; the demo uses the same function for
image | gt | teacher | baseline | CWD | HWD.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dataset.datasets import MEAN_BGR as IMAGE_MEAN_BGR  # the mean subtracted from every input image


def denormalize_image(image, mean_bgr=IMAGE_MEAN_BGR):
    """Network input (3 x H x W float, BGR minus mean; tensor or array) -> H x W x 3 uint8 RGB."""
    if hasattr(image, 'detach'):
        image = image.detach().cpu().numpy()
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f'expected a 3 x H x W image, got shape {image.shape}')
    bgr = image + np.asarray(mean_bgr, dtype=np.float64).reshape(3, 1, 1)
    rgb = bgr[::-1].transpose(1, 2, 0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _as_rgb(picture):
    if isinstance(picture, Image.Image):
        return picture.convert('RGB')
    array = np.asarray(picture)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f'a panel column must be H x W x 3 (RGB) or H x W, got shape {array.shape}')
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def make_panel(columns, gap=4, title_height=None, background=(255, 255, 255)):
    """Side-by-side picture of `columns`, a list of (title, picture); picture = H x W x 3 uint8 RGB
    array, H x W grey array or PIL image. Pictures of different sizes are scaled to the height of the
    first one. Returns a PIL RGB image."""
    if not columns:
        raise ValueError('make_panel needs at least one (title, picture) column')
    pictures = [_as_rgb(picture) for _, picture in columns]
    height = pictures[0].height
    scaled = []
    for picture in pictures:
        if picture.height != height:
            width = max(1, round(picture.width * height / picture.height))
            picture = picture.resize((width, height), Image.NEAREST)
        scaled.append(picture)
    font = ImageFont.load_default()
    if title_height is None:
        title_height = 16
    total_width = sum(p.width for p in scaled) + gap * (len(scaled) - 1)
    panel = Image.new('RGB', (total_width, height + title_height), background)
    x = 0
    for (title, _), picture in zip(columns, scaled):
        # Each title is drawn on a strip as wide as its column, so a long title is cut, not overlapping.
        strip = Image.new('RGB', (picture.width, title_height), background)
        ImageDraw.Draw(strip).text((2, 2), str(title), fill=(0, 0, 0), font=font)
        panel.paste(strip, (x, 0))
        panel.paste(picture, (x, title_height))
        x += picture.width + gap
    return panel


def save_panel(path, columns, **kwargs):
    panel = make_panel(columns, **kwargs)
    panel.save(path)
    return panel
