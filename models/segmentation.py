"""What every network of the model zoo is and returns.

- `SegmentationOutput`: the result of `forward(x)`, with named fields `logits`, `aux` (None without an aux
  head), `features` (the head's features the distillation methods use) and `stages` (the backbone's stage
  outputs, only when asked for with `forward(x, return_stages=True)`). It is also the tuple of the original
  code, `(logits, aux, features)` with an aux head and `(logits, features)` without, so that `out[0]`
  (logits) and `out[-1]` (features) keep working in code written against the original.
- `SegmentationModel`: the base class. Every network states what it returns: `num_class`, `output_stride`
  (the logits and the features are at input size / output_stride, never upsampled), `feature_channels`,
  `stage_channels` / `stage_strides` (of the stage outputs), `has_aux`, and the input it expects
  (`input_transform`: None for the data pipeline's BGR mean-subtracted images, else a module that converts
  them, e.g. for weights trained on RGB images scaled by the ImageNet mean and std).
- `SegmentationNetwork`: a backbone (`pretrained.*`), a head (`head.*`) and an optional aux head
  (`auxlayer.*`): the layout of the CIRKD / HWD checkpoints.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn


class SegmentationOutput(tuple):
    """`(logits, aux, features)` or `(logits, features)`, with the fields by name (see the module docstring)."""

    def __new__(cls, logits, features, aux=None, stages=None):
        items = (logits, features) if aux is None else (logits, aux, features)
        out = super().__new__(cls, items)
        out.logits = logits
        out.aux = aux
        out.features = features
        out.stages = stages
        return out

    def __getnewargs__(self):
        return (self.logits, self.features, self.aux, self.stages)

    def map(self, fn):
        """The same output with `fn` applied to every tensor (e.g. `lambda t: t.detach()`)."""
        stages = None if self.stages is None else [fn(s) for s in self.stages]
        aux = None if self.aux is None else fn(self.aux)
        return SegmentationOutput(fn(self.logits), fn(self.features), aux, stages)

    def detach(self):
        return self.map(torch.Tensor.detach)


@dataclass(frozen=True)
class NetworkSpec:
    """What a network states about itself, without its weights: what a distillation method reads to size its
    modules (adapters, generators, projections) and to align a student with its teacher."""
    model: str
    backbone: str
    num_class: int
    output_stride: int
    feature_channels: int
    stage_channels: tuple
    stage_strides: tuple
    has_aux: bool

    @property
    def family(self):
        return 'transformer' if self.model == 'segformer' else 'cnn'


class SegmentationModel(nn.Module):
    """Base class of the networks (see the module docstring). Subclasses set the attributes in `__init__`
    and implement `forward(x, return_stages=False)`."""

    model_name = ''
    backbone_name = ''
    num_class = 0
    output_stride = 8
    feature_channels = 0
    stage_channels = ()
    stage_strides = ()
    has_aux = False

    def __init__(self):
        super().__init__()
        # None: the network takes the pipeline's input as it is (an instance attribute, so that assigning a
        # module registers it)
        self.input_transform = None

    def spec(self):
        return NetworkSpec(self.model_name, self.backbone_name, int(self.num_class), int(self.output_stride),
                           int(self.feature_channels), tuple(self.stage_channels), tuple(self.stage_strides),
                           bool(self.has_aux))

    def head_parameter_names(self):
        """Names of the parameters that `--head-lr-mult` scales (the decoder and the aux head)."""
        return [name for name, _ in self.named_parameters() if not name.startswith('pretrained.')]

    def imagenet_target(self):
        """(module, keys) an ImageNet backbone file loads into: the file's keys (after its layout is converted)
        are `module`'s state-dict names, and `keys` are those counted for its coverage."""
        raise NotImplementedError

    def imagenet_layouts(self):
        """The ImageNet file layouts this network's backbone reads, in the order they are tried: a sequence of
        (name, convert) where convert(state, expected) returns the state in `imagenet_target()`'s names (expected:
        that module's state dict), or None when the file is not in that layout."""
        return ()

    def prepare_input(self, x):
        return x if self.input_transform is None else self.input_transform(x)


class InputTransform(nn.Module):
    """Converts the data pipeline's input (BGR, minus `pipeline_mean_bgr`, no scaling) to the input a network's
    weights were trained on: channels in `order` ('rgb' or 'bgr'), minus `mean`, divided by `std` (both in that
    order). A per-channel affine map; its constants are not part of the state dict."""

    def __init__(self, pipeline_mean_bgr, order, mean, std):
        super().__init__()
        if order not in ('rgb', 'bgr'):
            raise ValueError(f'order must be rgb or bgr, got {order!r}')
        pipeline_mean = list(pipeline_mean_bgr)
        self.flip = order == 'rgb'
        if self.flip:
            pipeline_mean = pipeline_mean[::-1]
        # (x + pipeline_mean - mean) / std = x * scale + shift, computed in Python floats (also on the meta device)
        scale = [1.0 / s for s in std]
        shift = [(p - m) / s for p, m, s in zip(pipeline_mean, mean, std, strict=True)]
        self.register_buffer('scale', torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('shift', torch.tensor(shift).view(1, 3, 1, 1), persistent=False)
        self.description = f'{order.upper()}, mean {tuple(mean)}, std {tuple(std)}'

    def forward(self, x):
        if self.flip:
            x = x.flip(1)
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))

    def extra_repr(self):
        return self.description


class SegmentationNetwork(SegmentationModel):
    """A backbone (`pretrained`), a head (`head`) and an optional aux head (`auxlayer`).

    The attribute names and their registration order give the state-dict layout of the released checkpoints:
    `pretrained.*`, then `head.*`, then `auxlayer.*`. The backbone returns its stage outputs (a list); the head
    takes them all and returns `(logits, features)`; the aux head takes the stage `aux_stage` (c3 of a ResNet).
    """

    def __init__(self, backbone, head, auxlayer=None, aux_stage=-2, model='', backbone_name='', num_class=0):
        super().__init__()
        self.pretrained = backbone
        self.head = head
        if auxlayer is not None:
            self.auxlayer = auxlayer
        self.has_aux = auxlayer is not None
        self.aux_stage = aux_stage
        self.model_name = model
        self.backbone_name = backbone_name
        self.num_class = num_class
        self.stage_channels = tuple(backbone.out_channels)
        self.stage_strides = tuple(backbone.out_strides)
        self.feature_channels = head.feature_channels
        self.output_stride = head.output_stride

    def forward(self, x, return_stages=False):
        stages = self.pretrained(self.prepare_input(x))
        logits, features = self.head(stages)
        aux = self.auxlayer(stages[self.aux_stage]) if self.has_aux else None
        return SegmentationOutput(logits, features, aux, list(stages) if return_stages else None)

    def imagenet_target(self):
        root = self.pretrained.checkpoint_root
        return root, [key for key in root.state_dict() if not key.endswith('num_batches_tracked')]

    def imagenet_layouts(self):
        return tuple(getattr(self.pretrained, 'imagenet_layouts', ()))

    def extra_repr(self):
        return (f'model={self.model_name}, backbone={self.backbone_name}, num_class={self.num_class}, '
                f'aux={self.has_aux}, output_stride={self.output_stride}, feature_channels={self.feature_channels}')
