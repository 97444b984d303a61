"""CIRKDv2's terms (winycg/CIRKD losses/cirkd_channel.py and losses/cirkd_mini_batch.py) restated plainly,
loops and all.

A yardstick for the tests and the benchmark, never for training:
- `PlainChannelContrast`: the channel terms the original's way: 4 x 4 average pooling, the head, a loop over
  the N^2 ordered image pairs with log_softmax / softmax / kl_div, the sum kept in a 0-d tensor of
  `accumulator_dtype` (the original's float32; float64 for tight comparisons), the enqueue with explicit
  slices and the original's wrap rule, the contrast rows by a random permutation; both permutations are
  drawn with torch.randperm from its own generator, in the original's order;
- `original_minibatch_pair_loss_v2`: CIRKDv2's mini-batch pixel term, which pools 4 x 4 maps at least 256
  high and wide (the threshold is an argument here, so that small maps can test the rule) before CIRKD's pair
  loop.

CIRKDv2's memory pixel / region terms (losses/cirkd_memory.py) are CIRKD's (tests/reference/cirkd.py,
`PlainMemoryContrast`): the head Cs -> Ct -> Ct and queues Ct wide are what this project's CIRKD module
already takes from the networks, and the extra `predict` argument is only reshaped, never read.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference.cirkd import original_minibatch_pair_loss


def pool_4x4(features):
    return nn.AvgPool2d(kernel_size=(4, 4), stride=(4, 4), padding=0, ceil_mode=True)(features)


def original_minibatch_pair_loss_v2(feat_S, feat_T, temperature=0.1, accumulator_dtype=torch.float32,
                                    pool_from_size=256):
    height, width = feat_S.shape[2:]
    if height >= pool_from_size and width >= pool_from_size:
        feat_S, feat_T = pool_4x4(feat_S), pool_4x4(feat_T)
    return original_minibatch_pair_loss(feat_S, feat_T, temperature, accumulator_dtype)


class PlainChannelContrast:
    """The channel terms with their own copy of the queue and pointer (taken from a
    StudentSegChannelContrast) and a head. `__call__(feat_S, feat_T, gathered=None)` -> (batch_c2c,
    memory_c2c, channel_mse), enqueueing `gathered` (the teacher rows of every process, N*Ct x d in rank
    order) or, by default, this batch's teacher rows."""

    def __init__(self, module, head, generator=None, accumulator_dtype=torch.float32):
        self.head = head
        self.queue = module.teacher_channel_queue.clone()
        self.ptr = module.channel_queue_ptr.clone()
        self.update_size = module.update_size
        self.contrast_size = module.channel_contrast_size
        self.temperature = module.contrast_temperature
        self.kd_temperature = module.contrast_kd_temperature
        self.generator = generator
        self.accumulator_dtype = accumulator_dtype

    def enqueue(self, keys):
        memory_size = self.queue.shape[0]
        perm = torch.randperm(keys.shape[0], generator=self.generator)
        k = min(keys.shape[0], self.update_size)
        rows = F.normalize(keys[perm[:k]], p=2, dim=1).to(self.queue.dtype)
        ptr = int(self.ptr[0])
        if ptr + k >= memory_size:
            self.queue[-k:, :] = rows
            self.ptr[0] = 0
        else:
            self.queue[ptr:ptr + k, :] = rows
            self.ptr[0] = (ptr + k) % memory_size

    def __call__(self, feat_S, feat_T, gathered=None):
        feat_S = self.head(pool_4x4(feat_S))
        feat_T = pool_4x4(feat_T.detach())
        n, channels = feat_S.shape[:2]
        feat_S = F.normalize(feat_S.reshape(n, channels, -1), p=2, dim=-1)
        feat_T = F.normalize(feat_T.reshape(n, channels, -1), p=2, dim=-1)
        total = torch.tensor(0., dtype=self.accumulator_dtype)
        for i in range(n):
            for j in range(n):
                s_map = feat_S[i] @ feat_S[j].t()
                t_map = feat_T[i] @ feat_T[j].t()
                log_p_s = F.log_softmax(s_map / self.temperature, dim=1)
                p_t = F.softmax(t_map / self.temperature, dim=1)
                total = total + F.kl_div(log_p_s, p_t, reduction='batchmean').to(self.accumulator_dtype)
        batch_c2c = total / (n * n)
        feat_S = feat_S.reshape(n * channels, -1)
        feat_T = feat_T.reshape(n * channels, -1)
        channel_mse = ((feat_S - feat_T) ** 2).mean()
        self.enqueue(feat_T.clone() if gathered is None else gathered)
        index = torch.randperm(self.queue.shape[0], generator=self.generator)[:self.contrast_size]
        contrast = self.queue[index, :].to(feat_T.dtype)
        t_logits = (feat_T @ contrast.t()) / self.temperature
        s_logits = (feat_S @ contrast.t()) / self.temperature
        log_p_s = F.log_softmax(s_logits / self.kd_temperature, dim=1)
        p_t = F.softmax(t_logits / self.kd_temperature, dim=1)
        memory_c2c = F.kl_div(log_p_s, p_t, reduction='batchmean') * self.kd_temperature ** 2
        return batch_c2c, memory_c2c, channel_mse
