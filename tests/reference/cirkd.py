"""The original CIRKD terms (zju-SWJ/HWD, losses/loss.py and losses/memory_loss.py) restated plainly, loops
and all.

A yardstick for the tests and the benchmark, never for training:
- `original_minibatch_pair_loss`: the original's loop over the N^2 ordered image pairs, two M x M maps per
  pair, the sum kept in a 0-d float32 tensor (its `accumulator_dtype`; float64 for tight comparisons);
- `PlainMemoryContrast`: the memory terms with the fixes this project makes (the pixels enqueued for a
  class are drawn among that class's pixels and written in pixel order, 0 instead of NaN for a batch
  without a labelled pixel, any device and precision), computed the original's way: a loop over images
  and classes for the enqueue, a loop over classes to gather the negatives, log_softmax / softmax /
  kl_div for the loss.
"""
import torch
import torch.nn.functional as F


def original_minibatch_pair_loss(feat_S, feat_T, temperature=0.1, accumulator_dtype=torch.float32):
    """1/N^2 sum over ordered pairs (i, j) of batchmean KL(softmax(T_ij / tau) || log_softmax(S_ij / tau))."""
    n = feat_S.shape[0]
    feat_S = F.normalize(feat_S, p=2, dim=1)
    feat_T = F.normalize(feat_T, p=2, dim=1)
    total = torch.tensor(0., dtype=accumulator_dtype, device=feat_S.device)
    for i in range(n):
        for j in range(n):
            s_map = feat_S[i].reshape(feat_S.shape[1], -1).t() @ feat_S[j].reshape(feat_S.shape[1], -1)
            t_map = feat_T[i].reshape(feat_T.shape[1], -1).t() @ feat_T[j].reshape(feat_T.shape[1], -1)
            log_p_s = F.log_softmax(s_map / temperature, dim=1)
            p_t = F.softmax(t_map / temperature, dim=1)
            total = total + F.kl_div(log_p_s, p_t, reduction='batchmean').to(accumulator_dtype)
    return total / (n * n)


class PlainMemoryContrast:
    """The memory terms with their own copy of the queues and pointers (taken from a StudentSegContrast)
    and of its head. `__call__(s_feats, t_feats, labels)` -> (pixel_loss, region_loss), enqueueing first."""

    def __init__(self, module, head, generator=None):
        self.head = head
        self.segment_queue = module.teacher_segment_queue.clone()
        self.segment_ptr = module.segment_queue_ptr.clone()
        self.pixel_queue = module.teacher_pixel_queue.clone()
        self.pixel_ptr = module.pixel_queue_ptr.clone()
        self.num_classes = module.num_classes
        self.pixel_update_freq = module.pixel_update_freq
        self.pixel_contrast_size = module.pixel_contrast_size
        self.region_contrast_size = module.region_contrast_size
        self.kd_temperature = module.contrast_kd_temperature
        self.temperature = module.contrast_temperature
        self.ignore_label = module.ignore_label
        self.generator = generator

    def enqueue(self, keys, labels):
        pixel_size = self.pixel_queue.shape[1]
        region_size = self.segment_queue.shape[1]
        for image in range(keys.shape[0]):
            feats = keys[image].reshape(keys.shape[1], -1)
            label = labels[image].reshape(-1)
            for k in torch.unique(label).tolist():
                if k == self.ignore_label:
                    continue
                where = (label == k).nonzero().squeeze(1)
                mean = feats[:, where].mean(dim=1)
                ptr = int(self.segment_ptr[k])
                self.segment_queue[k, ptr] = F.normalize(mean, p=2, dim=0).to(self.segment_queue.dtype)
                self.segment_ptr[k] = (ptr + 1) % region_size
                count = where.numel()
                take = min(count, self.pixel_update_freq)
                picked = where[torch.randperm(count, generator=self.generator)[:take].sort().values]
                vectors = F.normalize(feats[:, picked].t(), p=2, dim=1).to(self.pixel_queue.dtype)
                ptr = int(self.pixel_ptr[k])
                if ptr + take >= pixel_size:
                    self.pixel_queue[k, pixel_size - take:] = vectors
                    self.pixel_ptr[k] = 0
                else:
                    self.pixel_queue[k, ptr:ptr + take] = vectors
                    self.pixel_ptr[k] = ptr + take

    def negatives(self, queue, contrast_size, dtype):
        index = torch.randperm(queue.shape[1], generator=self.generator)[:contrast_size]
        rows = []
        for k in range(queue.shape[0]):
            rows.append(queue[k, index])
        return torch.cat(rows).to(dtype)

    def kd(self, s_logits, t_logits):
        log_p_s = F.log_softmax(s_logits / self.kd_temperature, dim=1)
        p_t = F.softmax(t_logits / self.kd_temperature, dim=1)
        return F.kl_div(log_p_s, p_t, reduction='batchmean') * self.kd_temperature ** 2

    def __call__(self, s_feats, t_feats, labels):
        dtype = t_feats.dtype
        t = F.normalize(t_feats.detach(), p=2, dim=1)
        s = F.normalize(self.head(s_feats).to(dtype), p=2, dim=1)
        small = F.interpolate(labels.unsqueeze(1).float(), s.shape[2:], mode='nearest').squeeze(1).long()
        self.enqueue(t.clone(), small)
        flat = small.reshape(-1)
        keep = flat != self.ignore_label
        s_rows = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])[keep]
        t_rows = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])[keep]
        if keep.sum() == 0:
            return (s * 0).sum(), (s * 0).sum()
        results = []
        for queue, size in ((self.pixel_queue, self.pixel_contrast_size),
                            (self.segment_queue, self.region_contrast_size)):
            x = self.negatives(queue, size, dtype)
            t_logits = (t_rows @ x.t()) / self.temperature
            s_logits = (s_rows @ x.t()) / self.temperature
            results.append(self.kd(s_logits, t_logits.detach()))
        return tuple(results)
