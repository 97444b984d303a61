"""CIRKDv2's channel terms: channel-to-channel relations across the images of the mini-batch and against a
memory of teacher channel vectors, and the MSE between the student's and the teacher's channel vectors.

Paper: C. Yang, Y. Zhao, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "CIRKD v2: Cross-Image Relational Knowledge
Distillation with Contextual Modeling for Efficient Semantic Segmentation" (the journal version of "Cross-Image
Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022, https://arxiv.org/abs/2204.06986).
The values are those of the original winycg/CIRKD code (losses/cirkd_channel.py); what differs:

- the mini-batch term is in the inputs' precision (the original summed the N^2 image pairs into a float32
  tensor on the GPU) and is computed without a loop over the pairs, a block of rows at a time (the same
  computation as CIRKD's mini-batch pixel term, losses/cirkd.py, with channels in place of pixels);
- every process holds the same queue at every iteration by construction: the teacher rows of all processes
  are enqueued (gathered when a process group is running) and the random draws come from `generator`, which
  the training loop seeds alike on every rank; the queue and its pointer are `local_buffers`, so DDP does not
  overwrite them with rank 0's (the original's DDP wrapper did, at every forward);
- the projection head's norm comes from the caller (the original fixed SyncBatchNorm); the update size is
  an argument (fixed at 256); CPU, float64 and one process without a process group work (no `.cuda()`);
- sizes are checked: an update larger than the memory, a contrast set larger than the memory, or features
  whose pooled size is not `dim` are refused with a message naming the setting (the original failed with a
  shape error, or silently drew fewer contrast rows).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import resize_like
from .channel import autocast_disabled, loss_precision
from .checks import at_most, integer_at_least, positive_number
from .cirkd import (
    _normalised_queue,
    all_gather_rows,
    average_pool_4x4,
    check_features,
    check_generator,
    cross_image_relation_kl,
    projection_head,
    queue_relation_kl,
    run_head,
)

__all__ = ['StudentSegChannelContrast']


def pooled_positions(height, width):
    """Positions left by CIRKDv2's 4 x 4 average pooling (ceil mode) of a height x width map: the `dim` of
    StudentSegChannelContrast."""
    return math.ceil(height / 4) * math.ceil(width / 4)


class StudentSegChannelContrast(nn.Module):
    """Channel-to-channel distillation of CIRKDv2, with its projection head and the memory of teacher channel
    vectors.

    Both features are average-pooled over 4 x 4 blocks (ceil mode) to d = ceil(h/4) * ceil(w/4) positions; the
    student's then goes through the head (1x1 conv Cs -> Ct, norm, ReLU, 1x1 conv Ct -> Ct). Each channel
    becomes a row: s_i, t_i (Ct x d per image i), L2-normalised along the d positions. Then, with
    tau = contrast_temperature and kd_T = contrast_kd_temperature:

        batch_c2c  = 1/N^2 sum_{i,j} 1/Ct sum_rows KL(softmax(t_i t_j^T / tau) || softmax(s_i s_j^T / tau))
        channel_mse = mean over N*Ct*d of (s - t)^2
        memory_c2c = kd_T^2 / (N*Ct) sum_rows KL(softmax(t X^T / (tau kd_T)) || softmax(s X^T / (tau kd_T)))

    where X are `channel_contrast_size` rows of the memory, drawn after this batch is enqueued: the N*Ct
    teacher rows of every process (rank order) are gathered, K = min(rows, update_size) of them drawn by a
    random permutation and written, L2-normalised, to slots ptr .. ptr+K-1 (ptr += K), or, if
    ptr + K >= channel_memory_size, to the last K slots (ptr = 0). The draws, in the original's order:
    torch.randperm(rows, generator=self.generator) for the enqueue, then
    torch.randperm(channel_memory_size, generator=self.generator) whose first channel_contrast_size slots
    give X.

    The memory starts as N(0, 1) draws of torch's default generator at construction (rows L2-normalised), as
    the original: the training loop seeds that generator alike on every process before building the
    method, so the queues start equal. `generator` (an attribute; None: torch's default generator) is set
    by the method to a generator the loop seeds alike on every process before every micro-batch.

    The student's feature is resized to the teacher's spatial size first (losses/align.py), so a student of
    another family (another output stride) works; `dim` follows from the teacher's size.

    Args:
        s_channels (int): student feature channels (the head's input).
        t_channels (int): teacher feature channels (the head's output).
        dim (int): pooled positions of the teacher's feature, ceil(h/4) * ceil(w/4) (Cityscapes' 512 x 1024
            crops with a stride-8 teacher: 16 x 32 = 512); the width of the memory.
        channel_memory_size (int): rows of the memory, at least update_size.
        channel_contrast_size (int): memory rows each forward contrasts against, 1 .. channel_memory_size.
        contrast_kd_temperature (float): kd_T, positive.
        contrast_temperature (float): tau, positive.
        update_size (int): teacher rows enqueued per forward, at most (the original's 256).
        norm_layer (type): the head's normalisation layer (nn.SyncBatchNorm when distributed, as the student's).
    """

    local_buffers = ('teacher_channel_queue', 'channel_queue_ptr')

    def __init__(self, s_channels, t_channels, dim, channel_memory_size=10000, channel_contrast_size=2048,
                 contrast_kd_temperature=1.0, contrast_temperature=0.1, update_size=256, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.s_channels = integer_at_least('s_channels', s_channels, 1)
        self.t_channels = integer_at_least('t_channels', t_channels, 1)
        self.dim = integer_at_least('dim', dim, 1)
        self.update_size = integer_at_least('update_size', update_size, 1)
        self.channel_memory_size = integer_at_least('channel_memory_size', channel_memory_size, 1)
        at_most('update_size', self.update_size, 'channel_memory_size', self.channel_memory_size,
                 ': a write must fit in the memory')
        self.channel_contrast_size = integer_at_least('channel_contrast_size', channel_contrast_size, 1)
        # randperm(size)[:P] would silently give fewer contrast rows than asked for
        at_most('channel_contrast_size', self.channel_contrast_size, 'channel_memory_size', self.channel_memory_size)
        self.contrast_kd_temperature = positive_number('contrast_kd_temperature', contrast_kd_temperature)
        self.contrast_temperature = positive_number('contrast_temperature', contrast_temperature)
        self.generator = None

        # Built in the original's order: the head first, then the queue from the global generator.
        self.project_head = projection_head(self.s_channels, self.t_channels, norm_layer)
        self.register_buffer('teacher_channel_queue', _normalised_queue(self.channel_memory_size, self.dim))
        self.register_buffer('channel_queue_ptr', torch.zeros(1, dtype=torch.long))

    @property
    def generator(self):
        """The CPU torch.Generator of the random draws (None: torch's default generator)."""
        return self._generator

    @generator.setter
    def generator(self, generator):
        self._generator = check_generator(generator)

    def extra_repr(self):
        return (f's_channels={self.s_channels}, t_channels={self.t_channels}, dim={self.dim}, '
                f'channel_memory_size={self.channel_memory_size}, channel_contrast_size={self.channel_contrast_size}, '
                f'contrast_kd_temperature={self.contrast_kd_temperature}, '
                f'contrast_temperature={self.contrast_temperature}, update_size={self.update_size}')

    def forward(self, feat_S, feat_T):
        """(batch_c2c, memory_c2c, channel_mse) of the student's (N x s_channels x h' x w') and the teacher's
        (N x t_channels x h x w) features, in the student's precision (float32 for half precisions)."""
        feat_S = resize_like(feat_S, feat_T)  # another family's stride (losses/align.py)
        self._check_inputs(feat_S, feat_T)
        n = feat_S.shape[0]
        device = feat_S.device
        dtype = loss_precision(feat_S)
        projected = run_head(self.project_head, average_pool_4x4(feat_S))
        with autocast_disabled(device.type):
            student = F.normalize(projected.to(dtype).reshape(n * self.t_channels, self.dim), p=2, dim=1)
            teacher = average_pool_4x4(feat_T.detach().to(dtype)).reshape(n * self.t_channels, self.dim)
            teacher = F.normalize(teacher, p=2, dim=1)
            batch_c2c = cross_image_relation_kl(student, teacher, n, self.contrast_temperature)
            channel_mse = (student - teacher).square().mean()
            self._dequeue_and_enqueue(teacher)
            slots = torch.randperm(self.channel_memory_size, generator=self.generator)[:self.channel_contrast_size]
            negatives = self.teacher_channel_queue.index_select(0, slots.to(device)).to(dtype)
            memory_c2c = queue_relation_kl(student, teacher, negatives, self.contrast_temperature,
                                           self.contrast_kd_temperature)
            return batch_c2c, memory_c2c, channel_mse

    def _check_inputs(self, feat_S, feat_T):
        check_features(feat_S, feat_T, self.s_channels, self.t_channels)
        h, w = feat_S.shape[2:]
        if pooled_positions(h, w) != self.dim:
            raise ValueError(f'dim is {self.dim}, but features of {h} x {w} pool 4 x 4 to ceil({h}/4) x ceil({w}/4) = '
                             f'{pooled_positions(h, w)} positions: build the module with dim = that number (the '
                             'training crop and the crop dim was computed from must agree)')

    @torch.no_grad()
    def _dequeue_and_enqueue(self, rows):
        """Write a random draw of the teacher rows (N*Ct x d, L2-normalised) of every process to the memory."""
        rows = all_gather_rows(rows)
        order = torch.randperm(rows.shape[0], generator=self.generator).to(rows.device)
        count = min(rows.shape[0], self.update_size)
        size = self.channel_memory_size
        pointer = self.channel_queue_ptr
        # the original's wrap rule: a write that would reach the end (`>=`, even exactly) goes to the last
        # `count` slots and the pointer restarts at 0 (computed on the device: no synchronisation)
        wrap = pointer + count >= size
        slots = torch.where(wrap, size - count, pointer) + torch.arange(count, device=pointer.device)
        values = F.normalize(rows[order[:count]], p=2, dim=1)
        self.teacher_channel_queue.index_copy_(0, slots, values.to(self.teacher_channel_queue.dtype))
        pointer.copy_(torch.where(wrap, 0, pointer + count))
