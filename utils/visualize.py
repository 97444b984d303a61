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
    for (title, _), picture in zip(columns, scaled, strict=True):
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


def stack_vertically(pictures, gap=4, background=(255, 255, 255)):
    """PIL images one above the other, left-aligned."""
    width = max(p.width for p in pictures)
    height = sum(p.height for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new('RGB', (width, height), background)
    y = 0
    for picture in pictures:
        canvas.paste(picture, (0, y))
        y += picture.height + gap
    return canvas


def weight_bars(weights, class_names, colors, present=None, title='', bar_width=18, plot_height=120):
    """A bar chart per image of per-channel weights (N x C array), one bar per class in its palette
    colour, with a dashed line at 1 (the uniform weight of CWD). `present` (N x C bools) marks the
    classes that occur in each image; their names are drawn in black, the others in grey."""
    weights = np.asarray(weights, dtype=np.float64)
    n, c = weights.shape
    font = ImageFont.load_default()
    top = max(1.0, float(np.nanmax(weights)) if weights.size else 1.0) * 1.1
    left, label_height, row_title = 34, 70, 14
    width = left + c * bar_width + 10
    rows = []
    for i in range(n):
        row = Image.new('RGB', (width, row_title + plot_height + label_height), (255, 255, 255))
        draw = ImageDraw.Draw(row)
        draw.text((left, 1), f'image {i}', fill=(0, 0, 0), font=font)
        base = row_title + plot_height
        for tick in (0.0, 1.0, top / 1.1):
            y = base - int(round(tick / top * plot_height))
            draw.text((2, y - 5), f'{tick:.1f}', fill=(0, 0, 0), font=font)
        for j in range(c):
            x0 = left + j * bar_width
            h = int(round(weights[i, j] / top * plot_height))
            draw.rectangle([x0 + 2, base - h, x0 + bar_width - 3, base], fill=tuple(int(v) for v in colors[j]),
                           outline=(0, 0, 0))
            # class name written upwards under its bar
            shade = (0, 0, 0) if present is None or present[i, j] else (160, 160, 160)
            text = Image.new('RGB', (label_height, bar_width), (255, 255, 255))
            ImageDraw.Draw(text).text((2, 3), str(class_names[j])[:11], fill=shade, font=font)
            row.paste(text.rotate(90, expand=True), (x0, base + 2))
        y_one = base - int(round(1.0 / top * plot_height))
        for x in range(left, width - 10, 6):
            draw.line([x, y_one, x + 3, y_one], fill=(200, 0, 0))
        draw.line([left, base, width - 10, base], fill=(0, 0, 0))
        rows.append(row)
    lines = str(title).split('\n')
    header = Image.new('RGB', (width, 4 + 12 * len(lines)), (255, 255, 255))
    for k, line in enumerate(lines):
        ImageDraw.Draw(header).text((4, 2 + 12 * k), line, fill=(0, 0, 0), font=font)
    return stack_vertically([header] + rows, gap=2)
