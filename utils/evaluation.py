"""Evaluation shared by eval.py and the training loop's validation.

- `ShardSampler`: every process gets a disjoint strided share of the data set, every image is seen
  exactly once (no padding, unlike DistributedSampler), so the summed confusion matrix does not
  depend on the number of processes;
- `predict`: multi-scale and horizontally flipped inference, as the original's eval.py, logits at the
  image's full size;
- `evaluate`: runs `predict` over a loader and returns the confusion matrix summed over processes; an error
  one process meets in its share (bad data) stops every process with one message (`agree_on_error`).
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from tqdm import tqdm

from utils.distributed import agree_on_error, get_rank, get_world_size
from utils.errors import StopCommand
from utils.metric import ConfusionMatrix


class ShardSampler(Sampler):
    """Indices rank, rank + world_size, ... of the data set: a disjoint share per process, every index
    exactly once over all processes, no padding (shares may differ in length by one)."""

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f'rank {self.rank} is not in [0, {self.num_replicas})')
        self.indices = list(range(self.rank, len(dataset), self.num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _unwrap(model):
    # DDP's forward broadcasts buffers, a collective call: with uneven shards the process with fewer
    # images would wait forever. Inference needs no synchronisation, so use the bare module.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _logits(model, image, tile_width=None):
    """The network's logits for `image`; with `tile_width`, the image is cut into vertical strips of that width
    (the last may be narrower), each predicted alone, and their logits are put side by side (CIRKDv2's protocol
    for its SegFormers on Cityscapes: two 1024-wide halves of a 1024 x 2048 image)."""
    if tile_width is not None and image.shape[-1] > tile_width:
        strips = [_logits(model, image[..., start:start + tile_width])
                  for start in range(0, image.shape[-1], tile_width)]
        return torch.cat(strips, dim=-1)
    out = model(image)
    # the logits: the first field of a SegmentationOutput, and of the lists that networks written against the
    # original return
    return out[0] if isinstance(out, (list, tuple)) else out


def scaled_size(height, width, scale):
    """Size of the image resized by `scale`: floor(H * s) x floor(W * s), the size
    F.interpolate(scale_factor=s) gives, as in the original's evaluation; at least 1 x 1."""
    return max(1, int(math.floor(height * scale))), max(1, int(math.floor(width * scale)))


@torch.no_grad()
def predict(model, image, scales=(1.0,), flip=False, tile_width=None):
    """Logits N x C x H x W at the input's full size H x W, averaged over `scales` (and, with `flip`,
    over each scale's prediction and the unflipped prediction of the horizontally flipped image).

    image: N x 3 x H x W on the model's device. For each scale the image is resized bilinearly with
    align_corners=True; the logits are resized back to H x W the same way. `tile_width`: see `_logits`. The
    model is used as it is (call model.eval() first).
    """
    if len(scales) == 0:
        raise ValueError('predict needs at least one scale')
    model = _unwrap(model)
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        if scale <= 0:
            raise ValueError(f'scales must be positive, got {scale}')
        size = scaled_size(height, width, scale)
        scaled = image if size == (height, width) else F.interpolate(
            image, size=size, mode='bilinear', align_corners=True)
        logits = _full_size(_logits(model, scaled, tile_width), height, width)
        if flip:
            flipped = _full_size(_logits(model, scaled.flip(-1), tile_width), height, width).flip(-1)
            logits = (logits + flipped) * 0.5
        total = logits if total is None else total + logits
    return total / len(scales)


def _full_size(logits, height, width):
    if tuple(logits.shape[-2:]) == (height, width):
        return logits
    return F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=True)


def split_batch(batch):
    """(image, label or None, names) from a loader batch of (image, label, name) or (image, name)."""
    if isinstance(batch, dict):
        return batch['image'], batch.get('label'), batch.get('name')
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    if len(batch) == 2:
        return batch[0], None, batch[1]
    raise ValueError(f'a batch must be (image, label, name) or (image, name), got {len(batch)} items')


@torch.no_grad()
def evaluate(model, loader, num_class, device, scales=(1.0,), flip=False, progress=False,
             on_prediction=None, labelled=True, tile_width=None):
    """Confusion matrix of `model` over `loader`, already summed over all processes.

    Use a loader with a `ShardSampler` when distributed (each image once). Images are predicted one
    batch at a time with `predict`; validation uses batch size 1 since images can differ in size.
    `on_prediction(position, image, label, pred, names)` (optional) is called for every batch with
    the CPU class map `pred` (N x H x W int64), e.g. to save pictures; `position` counts the batches
    of this process. `labelled=False` (a test split) counts nothing and passes label=None.
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    matrix = ConfusionMatrix(num_class, device=device)
    batches = loader
    if progress:
        batches = tqdm(loader, desc='eval', dynamic_ncols=True)
    error = None
    try:
        for position, batch in enumerate(batches):
            image, label, names = split_batch(batch)
            if not labelled:
                label = None
            image = torch.as_tensor(image).to(device, non_blocking=True)
            pred = predict(net, image, scales=scales, flip=flip, tile_width=tile_width).argmax(dim=1)
            if label is not None:
                label = torch.as_tensor(label).to(device, non_blocking=True)
                matrix.update(pred, label)
            if on_prediction is not None:
                on_prediction(position, image, label, pred.cpu(), names)
    except StopCommand as stop:  # the other processes are about to wait for this one in the reduction
        error = stop
    finally:
        net.train(was_training)
    agree_on_error(error)
    return matrix.reduce_from_all_processes()
