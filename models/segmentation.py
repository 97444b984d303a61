"""The one segmentation network: a backbone (`pretrained`), a head (`head`), an optional aux head.

The attribute names and their registration order give the state dict layout of the released
checkpoints: `pretrained.*`, then `head.*`, then `auxlayer.*`.
"""
import torch.nn as nn


class SegmentationNetwork(nn.Module):
    """`forward(x)` -> `[logits, aux_logits, features]` with an aux head, else `[logits, features]`.

    Logits stay at the backbone's resolution (1/8 of the input); callers upsample.
    """

    def __init__(self, backbone, head, auxlayer=None, name=''):
        super().__init__()
        self.pretrained = backbone
        self.head = head
        if auxlayer is not None:
            self.auxlayer = auxlayer
        self.aux = auxlayer is not None
        self.name = name

    def forward(self, x):
        stages = self.pretrained(x)
        logits, features = self.head(stages[-1])
        if self.aux:
            return [logits, self.auxlayer(stages[-2]), features]
        return [logits, features]

    def extra_repr(self):
        return self.name
