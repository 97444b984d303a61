"""Pictures for people: de-normalised input images, side-by-side panels and bar charts of weights (PIL only).

`make_panel([('image', rgb), ('ground truth', colorize_rgb(label, 'citys')), ('prediction', ...)])`
draws the columns left to right with their titles above; the demo uses the same function for
image | gt | teacher | baseline | CWD | HWD. `weight_bars` draws the per-class channel weights of HWD.

Text is drawn in pillow's own scalable font (`ImageFont.load_default(size=...)`, shipped with pillow, so
no font file is looked for on the machine), and every layout is computed from the measured size of its
text: names are written in full, a title wider than its column is wrapped at spaces or widens the column,
and nothing overlaps. That font's space is narrow (3 pixels at 13), so words are set a third of the font
size apart, which keeps them apart at any size.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dataset.datasets import MEAN_BGR as IMAGE_MEAN_BGR  # the mean subtracted from every input image

FONT_SIZE = 13  # pixels; large enough for a name to read at 100 % zoom, small enough for 19 bars side by side
PAD = 3  # pixels of blank around a piece of text
TEXT = (0, 0, 0)
GREY_TEXT = (150, 150, 150)
WHITE = (255, 255, 255)


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


# ---- text ------------------------------------------------------------------------------------------------

def load_font(size=FONT_SIZE):
    """Pillow's bundled scalable font at `size` pixels."""
    return ImageFont.load_default(size=size)


def line_height(font):
    """Pixels from one line's top to the next: the font's ascent plus descent."""
    ascent, descent = font.getmetrics()
    return ascent + descent


def _word_gap(font):
    return max(font.getlength(' '), font.size / 3)


def _words_at(text, font):
    """(pen x, word) of each word of a one-line text, the pen starting at 0."""
    gap = _word_gap(font)
    placed, x = [], 0.0
    for word in str(text).split(' '):
        if word:
            placed.append((round(x), word))
            x += font.getlength(word)
        x += gap
    return placed


def _ink_span(text, font):
    """(left, right) of the ink of one line drawn with its pen at 0; (0, 0) for a blank line."""
    spans = [(x + font.getbbox(word)[0], x + font.getbbox(word)[2]) for x, word in _words_at(text, font)]
    if not spans:
        return 0, 0
    return min(s[0] for s in spans), max(s[1] for s in spans)


def text_width(text, font):
    """The width in pixels of the ink of one line of `text` as `draw_text` draws it."""
    left, right = _ink_span(text, font)
    return right - left


def draw_text(draw, xy, text, font, fill=TEXT):
    """Draw one line with the left edge of its ink at x and the top of the line (the font's ascender) at y."""
    x, y = xy
    left = _ink_span(text, font)[0]
    for pen, word in _words_at(text, font):
        draw.text((x - left + pen, y), word, font=font, fill=fill)


def wrap_words(text, font, width):
    """`text` cut at spaces (and at its own line breaks) into lines no wider than `width` where possible;
    a single word wider than `width` stays whole on its own line."""
    lines = []
    for paragraph in str(text).split('\n'):
        line = ''
        for word in paragraph.split():
            candidate = f'{line} {word}' if line else word
            if line and text_width(candidate, font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def text_block(text, width=None, font_size=FONT_SIZE, background=WHITE):
    """A picture of `text` (lines separated by newlines), left-aligned; with `width` (pixels), the lines
    are wrapped at spaces to fit it and the picture is that wide (wider only if a single word needs it)."""
    font = load_font(font_size)
    lines = wrap_words(text, font, width - 2 * PAD) if width is not None else str(text).split('\n')
    needed = 2 * PAD + max(text_width(line, font) for line in lines)
    block = Image.new('RGB', (needed if width is None else max(width, needed),
                              2 * PAD + len(lines) * line_height(font)), background)
    draw = ImageDraw.Draw(block)
    for k, line in enumerate(lines):
        draw_text(draw, (PAD, PAD + k * line_height(font)), line, font)
    return block


# ---- panels ----------------------------------------------------------------------------------------------

def _as_rgb(picture):
    if isinstance(picture, Image.Image):
        return picture.convert('RGB')
    array = np.asarray(picture)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f'a panel column must be H x W x 3 (RGB) or H x W, got shape {array.shape}')
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def make_panel(columns, gap=4, title_height=None, background=WHITE, font_size=FONT_SIZE):
    """Side-by-side picture of `columns`, a list of (title, picture); picture = H x W x 3 uint8 RGB
    array, H x W grey array or PIL image. Pictures of different sizes are scaled to the height of the
    first one. Each title is centred above its picture, wrapped at spaces to the picture's width; a column
    whose title has a word wider than the picture is widened (the picture centred in it), so no title is
    cut. `title_height` (pixels) is a minimum: the strip is as tall as the longest title needs. Returns a
    PIL RGB image."""
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
    font = load_font(font_size)
    titles = [wrap_words(title, font, picture.width - 2 * PAD) for (title, _), picture in
              zip(columns, scaled, strict=True)]
    slots = [max(picture.width, max(text_width(line, font) for line in lines) + 2 * PAD)
             for lines, picture in zip(titles, scaled, strict=True)]
    needed = 2 * PAD + max(len(lines) for lines in titles) * line_height(font)
    title_height = needed if title_height is None else max(title_height, needed)
    panel = Image.new('RGB', (sum(slots) + gap * (len(slots) - 1), height + title_height), background)
    draw = ImageDraw.Draw(panel)
    x = 0
    for lines, picture, slot in zip(titles, scaled, slots, strict=True):
        for k, line in enumerate(lines):
            draw_text(draw, (x + (slot - text_width(line, font)) // 2, PAD + k * line_height(font)), line, font)
        panel.paste(picture, (x + (slot - picture.width) // 2, title_height))
        x += slot + gap
    return panel


def save_panel(path, columns, **kwargs):
    panel = make_panel(columns, **kwargs)
    panel.save(path)
    return panel


def stack_vertically(pictures, gap=4, background=WHITE):
    """PIL images one above the other, left-aligned."""
    width = max(p.width for p in pictures)
    height = sum(p.height for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new('RGB', (width, height), background)
    y = 0
    for picture in pictures:
        canvas.paste(picture, (0, y))
        y += picture.height + gap
    return canvas


# ---- weight charts ---------------------------------------------------------------------------------------

def weight_bars(weights, class_names, colors, present=None, title='', bar_width=18, plot_height=120,
                font_size=FONT_SIZE):
    """A bar chart per image of per-channel weights (N x C array), one bar per class in its palette
    colour, with a dashed line at 1 (the uniform weight of CWD). `present` (N x C bools) marks the
    classes that occur in each image; their names are drawn in black, the others in grey. `title` may
    hold several lines (separated by newlines). Each class name is written in full, upwards, ending under
    its bar; the bars are at least one line of text wide. Returns a PIL RGB image."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2:
        raise ValueError(f'weights must be an N x C array, got shape {weights.shape}')
    n, c = weights.shape
    if len(class_names) != c or len(colors) < c:
        raise ValueError(f'{c} weights per image need {c} class names and colours, got {len(class_names)} '
                         f'names and {len(colors)} colours')
    if present is not None:
        present = np.asarray(present, dtype=bool)
        if present.shape != weights.shape:
            raise ValueError(f'present must have the shape of weights {weights.shape}, got {present.shape}')
    weights = np.nan_to_num(weights, nan=0.0)
    font = load_font(font_size)
    line = line_height(font)

    largest = float(weights.max()) if weights.size else 1.0
    top = max(1.0, largest) * 1.1
    # Ticks at 0, at 1 and at the largest weight when it is a line of text away from 1 (labels never overlap).
    ticks = [0.0, 1.0] + ([largest] if (largest - 1.0) / top * plot_height >= line else [])
    tick_labels = [f'{tick:.2f}' for tick in ticks]
    left = PAD + max(text_width(label, font) for label in tick_labels) + 2 * PAD  # tick labels, then the axis
    bar_width = max(bar_width, line + 4)  # a name written upwards is one line wide
    name_length = max([text_width(name, font) for name in map(str, class_names)] + [0])
    right = 2 * PAD
    width = left + c * bar_width + right

    lines = str(title).split('\n') if str(title) else []
    width = max([width] + [2 * PAD + text_width(text, font) for text in lines])
    plot_top = PAD + line + line // 2 + PAD  # the row title, then room for half the top tick label
    base = plot_top + plot_height
    rows = []
    for i in range(n):
        row = Image.new('RGB', (width, base + PAD + name_length + PAD), WHITE)
        draw = ImageDraw.Draw(row)
        draw_text(draw, (left, PAD), f'image {i}', font)
        for tick, label in zip(ticks, tick_labels, strict=True):
            y = base - round(tick / top * plot_height)
            draw_text(draw, (left - 2 * PAD - text_width(label, font), y - line // 2), label, font)
            draw.line([left - PAD, y, left, y], fill=TEXT)
        for j in range(c):
            x0 = left + j * bar_width
            h = max(0, round(weights[i, j] / top * plot_height))
            draw.rectangle([x0 + 2, base - h, x0 + bar_width - 3, base], fill=tuple(int(v) for v in colors[j]),
                           outline=TEXT)
            shade = TEXT if present is None or present[i, j] else GREY_TEXT
            # The name on a strip as long as the longest one, right-aligned, then turned upwards: every name
            # ends just under the axis.
            name = str(class_names[j])
            strip = Image.new('RGB', (name_length + PAD, line), WHITE)
            draw_text(ImageDraw.Draw(strip), (name_length - text_width(name, font), 0), name, font, fill=shade)
            row.paste(strip.rotate(90, expand=True), (x0 + (bar_width - line) // 2, base + PAD))
        y_one = base - round(1.0 / top * plot_height)
        for x in range(left, left + c * bar_width, 6):
            draw.line([x, y_one, x + 3, y_one], fill=(200, 0, 0))
        draw.line([left, plot_top, left, base], fill=TEXT)
        draw.line([left, base, left + c * bar_width, base], fill=TEXT)
        rows.append(row)
    header = [text_block(title, width, font_size)] if lines else []
    return stack_vertically(header + rows, gap=line // 2)
