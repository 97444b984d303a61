"""Cross-image relational knowledge distillation (CIRKD): the mini-batch pixel-pair term and the memory
terms (pixel-to-pixel and pixel-to-region against per-class queues of teacher embeddings).

Paper: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge Distillation
for Semantic Segmentation", CVPR 2022, https://arxiv.org/abs/2204.06986. The values are those of the
original zju-SWJ/HWD code (losses/loss.py and losses/memory_loss.py, taken from CIRKD); what differs:

- mini-batch term: the result is in the inputs' precision (the original summed the pairs into a float32
  tensor); no loop over the N^2 image pairs: all pairs are formed at once, a block of rows at a time, or,
  when an image's block is small (CIRKDv2's channels), each unordered pair once (half the products);
  `pool_from_size` gives CIRKDv2's version (winycg/CIRKD losses/cirkd_mini_batch.py), which first averages
  4 x 4 blocks of maps at least 256 high and wide;
- memory terms: the pixels enqueued for class k are drawn among the pixels of class k (the original drew
  positions of the whole image); every random draw comes from one generator and the teacher keys are
  gathered over all processes, so every rank holds the same queues; a batch without a labelled pixel
  gives 0 instead of NaN; CPU, float64 and one process without a process group work; the channel counts
  are arguments (the original fixed 128 -> 256); sizes are checked at construction.

Both terms compare softmaxes of similarity rows: student and teacher logits are formed a block of rows
at a time, and the gradient the backward pass needs (a constant times P_S - P_T against the columns) is
formed in the same pass, so neither log-softmax is materialised and nothing is recomputed.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .align import resize_like
from .channel import LossSettingError, autocast_disabled, loss_precision
from .checks import at_most, integer, integer_at_least, positive_number
from .hwd_loss import resize_labels_nearest

__all__ = ['CriterionMiniBatchCrossImagePair', 'StudentSegContrast']

# Bytes of one row-block workspace (three are live at once): large enough for efficient matrix
# products, small enough that the block stays in the last-level cache between the passes over it.
WORKSPACE_BYTES = 8 << 20


@torch.no_grad()
def relation_kl(s_rows, t_rows, s_cols, t_cols, group, scale, need_grad, symmetric=False):
    """sum over rows i and column groups g of KL(softmax(z_T[i, g]) || softmax(z_S[i, g])), where
    z_S = scale * s_rows s_cols^T and z_T = scale * t_rows t_cols^T, the columns split into consecutive
    groups of `group` columns, each with its own softmax. Returns (total, grad): grad is
    sum_i (P_S - P_T)[i] s_cols (rows x s channels), plus (P_S - P_T)^T s_rows when `symmetric` (s_cols is
    s_rows, so the logits are symmetric in the student's rows), or None unless need_grad. The gradient of
    `total` with respect to s_rows is scale * grad.

    Works a block of rows at a time with three reused workspaces; the KL uses
    KL = sum_j p_t,j (t'_j - s'_j) + log Z_S - log Z_T with t', s' the logits minus the group maximum and
    Z the partition sums (p_t sums to 1), so neither log-softmax is formed and exp runs once per logit."""
    rows, cols = s_rows.shape[0], s_cols.shape[0]
    if cols % group:
        raise ValueError(f'{cols} columns do not split into groups of {group}')
    dtype = s_rows.dtype
    total = torch.zeros((), dtype=dtype, device=s_rows.device)
    grad = torch.zeros_like(s_rows) if need_grad else None
    if rows == 0 or cols == 0:
        return total, grad
    block = max(1, min(rows, WORKSPACE_BYTES // (cols * s_rows.element_size())))
    work_s = s_rows.new_empty(block, cols)
    work_t = s_rows.new_empty(block, cols)
    work_p = s_rows.new_empty(block, cols)
    s_cols_t, t_cols_t = s_cols.t(), t_cols.t()
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        size = stop - start
        z_s, z_t, p_t = work_s[:size], work_t[:size], work_p[:size]
        torch.addmm(z_s, s_rows[start:stop], s_cols_t, beta=0, alpha=scale, out=z_s)
        torch.addmm(z_t, t_rows[start:stop], t_cols_t, beta=0, alpha=scale, out=z_t)
        s3, t3, p3 = (x.view(size, -1, group) for x in (z_s, z_t, p_t))
        t3.sub_(t3.amax(-1, keepdim=True))
        torch.exp(t3, out=p3)
        log_z_t = p3.sum(-1, keepdim=True)
        p3.div_(log_z_t)
        log_z_t.log_()
        s3.sub_(s3.amax(-1, keepdim=True))
        t3.sub_(s3)
        total += torch.dot(p_t.reshape(-1), z_t.reshape(-1))
        s3.exp_()
        log_z_s = s3.sum(-1, keepdim=True)
        s3.div_(log_z_s)
        total += log_z_s.log_().sub_(log_z_t).sum()
        if need_grad:
            diff = s3.sub_(p3).view(size, cols)  # P_S - P_T, d KL / d z_S
            grad[start:stop].addmm_(diff, s_cols)
            if symmetric:
                grad.addmm_(diff.t(), s_rows[start:stop])
    return total, grad


def _softmax_kl(z_s, z_t, dim, need_grad):
    """(sum of KL(softmax(z_t) || softmax(z_s)) along `dim`, P_S - P_T or None); z_s and z_t are left as
    they are. The KL as in relation_kl: sum_j p_t,j (t'_j - s'_j) + log Z_S - log Z_T."""
    t = z_t - z_t.amax(dim, keepdim=True)
    p_t = torch.exp(t)
    sum_t = p_t.sum(dim, keepdim=True)
    p_t.div_(sum_t)
    s = z_s - z_s.amax(dim, keepdim=True)
    total = torch.dot(p_t.reshape(-1), t.sub_(s).reshape(-1))
    p_s = s.exp_()
    sum_s = p_s.sum(dim, keepdim=True)
    total += sum_s.log().sub_(sum_t.log_()).sum()
    return total, (p_s.div_(sum_s).sub_(p_t) if need_grad else None)


@torch.no_grad()
def pair_relation_kl(s_rows, t_rows, group, scale, need_grad):
    """relation_kl(s_rows, t_rows, s_rows, t_rows, group, scale, need_grad, symmetric=True) for groups
    small enough that a group x group block fits the workspace (CIRKDv2's channels: 512 x 512): the same
    (total, grad), with about half the matrix products.

    The logits of the image pair (b, a) are those of (a, b) transposed (z_ba = z_ab^T, for the student and
    the teacher), so each unordered pair is formed once: the rows of image a against the columns of every
    image b > a give the KL of (a, b) with softmaxes along the columns and that of (b, a) along the rows,
    and the gradient E = D_ab + D_ba^T (D = P_S - P_T) serves both images: E s_b for a, E^T s_a for b.
    The pair (a, a) is a block of its own, with the gradient (D + D^T) s_a. A band of the rows of one image
    against a few images' columns at a time."""
    count = s_rows.shape[0] // group
    total = torch.zeros((), dtype=s_rows.dtype, device=s_rows.device)
    grad = torch.zeros_like(s_rows) if need_grad else None
    per_band = max(1, WORKSPACE_BYTES // (group * group * s_rows.element_size()))
    for a in range(count):
        rows = slice(a * group, (a + 1) * group)
        s_a, t_a = s_rows[rows], t_rows[rows]
        z_s = torch.mm(s_a, s_a.t()).mul_(scale)
        kl, diff = _softmax_kl(z_s, torch.mm(t_a, t_a.t()).mul_(scale), 1, need_grad)
        total += kl
        if need_grad:
            grad[rows].addmm_(diff + diff.t(), s_a)
        for first in range(a + 1, count, per_band):
            cols = slice(first * group, min(count, first + per_band) * group)
            z_s = torch.mm(s_a, s_rows[cols].t()).mul_(scale).view(group, -1, group)
            z_t = torch.mm(t_a, t_rows[cols].t()).mul_(scale).view(group, -1, group)
            kl_ab, diff_ab = _softmax_kl(z_s, z_t, 2, need_grad)  # rows of a, columns of each b
            kl_ba, diff_ba = _softmax_kl(z_s, z_t, 0, need_grad)  # rows of each b, columns of a (transposed)
            total += kl_ab + kl_ba
            if need_grad:
                both = diff_ab.add_(diff_ba).view(group, -1)
                grad[rows].addmm_(both, s_rows[cols])
                grad[cols].addmm_(both.t(), s_a)
    return total, grad


class _CrossImagePairKL(torch.autograd.Function):
    """sum over ordered image pairs (i, j) of batchmean KL over the M x M similarity maps, / N^2. Inputs:
    L2-normalised rows (N*M x D, image-major: M rows per image); the teacher is constant."""

    @staticmethod
    def forward(ctx, student, teacher, num_images, temperature):
        rows_per_image = student.shape[0] // num_images
        if 0 < rows_per_image ** 2 * student.element_size() <= WORKSPACE_BYTES:
            total, grad = pair_relation_kl(student, teacher, rows_per_image, 1.0 / temperature,
                                           ctx.needs_input_grad[0])
        else:
            total, grad = relation_kl(student, teacher, student, teacher, rows_per_image, 1.0 / temperature,
                                      ctx.needs_input_grad[0], symmetric=True)
        denominator = num_images * num_images * rows_per_image
        if grad is not None:
            ctx.save_for_backward(grad.mul_(1.0 / (temperature * denominator)))
        return total / denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def cross_image_relation_kl(student_rows, teacher_rows, num_images, temperature):
    """1/N^2 sum over ordered image pairs (i, j), i = j included, of
    1/M sum_rows KL(softmax(t_i t_j^T / tau) || softmax(s_i s_j^T / tau)), where s_i (M x D) are image i's
    rows of `student_rows` (N*M x D, image-major, L2-normalised) and t_i the teacher's; differentiable in
    the student's rows, never in the teacher's. CIRKD pairs pixels (rows: pixel vectors over channels),
    CIRKDv2 also channels (rows: channel vectors over pooled positions)."""
    return _CrossImagePairKL.apply(student_rows, teacher_rows.detach(), num_images, temperature)


class CriterionMiniBatchCrossImagePair(nn.Module):
    """Mini-batch cross-image pixel-to-pixel relation distillation of CIRKD.

    With f the L2-normalised feature vectors (along channels) of image i's M = h*w pixels,
    S_ij = f_S,i^T f_S,j and T_ij = f_T,i^T f_T,j (M x M, rows: pixels of image i), for every ordered pair
    (i, j) of the N images, i = j included:

        loss = 1/N^2 sum_{i,j} 1/M sum_rows KL(softmax(T_ij / tau) || softmax(S_ij / tau))

    (no tau^2 factor). Student and teacher channel counts may differ. Temporary memory is a few blocks of
    about WORKSPACE_BYTES, whatever N and M (the N^2 similarity maps are never held at once).

    CIRKDv2 (winycg/CIRKD losses/cirkd_mini_batch.py) first averages 4 x 4 blocks of both maps (ceil mode: a
    border block averages the positions it holds) when they are at least 256 high and wide, e.g. SegFormer's
    /4 features of a 1024 x 1024 crop; `pool_from_size=256` does that.

    Args:
        temperature (float): tau, positive.
        pool_from_size (int or None): maps at least this high and wide are 4 x 4 average-pooled first
            (CIRKDv2: 256); None (CIRKD): never.
    """

    def __init__(self, temperature=0.1, pool_from_size=None):
        super().__init__()
        self.temperature = positive_number('temperature', temperature)
        self.pool_from_size = None if pool_from_size is None else integer_at_least('pool_from_size',
                                                                                     pool_from_size, 1)

    def extra_repr(self):
        pooling = '' if self.pool_from_size is None else f', pool_from_size={self.pool_from_size}'
        return f'temperature={self.temperature}{pooling}'

    def forward(self, feat_S, feat_T):
        feat_S = resize_like(feat_S, feat_T)  # another family's stride (losses/align.py)
        if feat_S.dim() != 4 or feat_T.dim() != 4 or feat_S.shape[0] != feat_T.shape[0] \
                or feat_S.shape[2:] != feat_T.shape[2:]:
            raise ValueError('student and teacher features must be N x C x h x w with the same N, h and w, '
                             f'got {tuple(feat_S.shape)} and {tuple(feat_T.shape)}')
        n, _, h, w = feat_S.shape
        dtype = loss_precision(feat_S)
        with autocast_disabled(feat_S.device.type):
            feat_S, feat_T = feat_S.to(dtype), feat_T.detach().to(dtype)
            if self.pool_from_size is not None and min(h, w) >= self.pool_from_size:
                feat_S, feat_T = average_pool_4x4(feat_S), average_pool_4x4(feat_T)
            student = _pixel_rows(F.normalize(feat_S, p=2, dim=1))
            teacher = _pixel_rows(F.normalize(feat_T, p=2, dim=1))
            return cross_image_relation_kl(student, teacher, n, self.temperature)


def average_pool_4x4(features):
    """Means of 4 x 4 blocks (stride 4, ceil mode: a border block averages the positions it holds), as
    CIRKDv2's nn.AvgPool2d(4, 4, ceil_mode=True)."""
    return F.avg_pool2d(features, kernel_size=4, stride=4, padding=0, ceil_mode=True)


def _pixel_rows(features):
    """N x C x h x w -> (N*h*w) x C, pixels in (n, y, x) order."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class _QueueContrastKL(torch.autograd.Function):
    """batchmean KL(softmax(t X^T / (tau kd_T)) || softmax(s X^T / (tau kd_T))) * kd_T^2 over the V rows of s
    and t (V x D) against the negatives X (Q x D); X and t are constants."""

    @staticmethod
    def forward(ctx, student, teacher, negatives, temperature, kd_temperature):
        rows = student.shape[0]
        total, grad = relation_kl(student, teacher, negatives, negatives, negatives.shape[0],
                                  1.0 / (temperature * kd_temperature), ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad.mul_(kd_temperature / (temperature * rows)))
        return total * (kd_temperature ** 2 / rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def queue_relation_kl(student_rows, teacher_rows, negatives, temperature, kd_temperature):
    """kd_T^2 / V sum over the V rows of KL(softmax(t X^T / (tau kd_T)) || softmax(s X^T / (tau kd_T))): the
    rows of `student_rows` and `teacher_rows` (V x D, L2-normalised) against the memory's negatives X
    (Q x D); differentiable in the student's rows only."""
    return _QueueContrastKL.apply(student_rows, teacher_rows.detach(), negatives.detach(), temperature,
                                  kd_temperature)


def all_gather_rows(tensor):
    """The tensors of every process concatenated along dim 0 in rank order; the tensor itself in one
    process (or without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def _last_writes(slots):
    """Indices of the writes that survive when the writes go to `slots` in order (the last write to a
    slot wins), so that one index_put with unique indices gives the result of the sequential writes."""
    order = torch.sort(slots, stable=True).indices
    ordered = slots[order]
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


class StudentSegContrast(nn.Module):
    """Memory-based pixel-to-pixel and pixel-to-region distillation of CIRKD, with its projection head and
    the per-class queues of teacher embeddings.

    s = L2-normalise(project_head(s_feats)), t = L2-normalise(t_feats) along channels; labels are resized
    to h x w by nearest; the V labelled pixels (label != ignore_label) give the rows s_v, t_v (V x D).
    First the batch is enqueued (the teacher keys and labels of all processes, images in order, classes
    ascending): for class k in an image, the L2-normalised mean of its teacher vectors goes to the region
    queue at segment_queue_ptr[k] (which then advances by 1 modulo region_memory_size), and
    K = min(n_k, pixel_update_freq) of its n_k pixel vectors, drawn uniformly without replacement, go to the
    pixel queue: to slots ptr .. ptr+K-1 (ptr += K), or, if ptr + K >= pixel_memory_size, to the last K
    slots (ptr = 0). Then P slots drawn among the pixel_memory_size (the same for every class) give the
    negatives X (num_classes * P x D; likewise for the region queue), and with z = v X^T / tau:

        pixel_loss = kd_T^2 / V sum_rows KL(softmax(z_t / kd_T) || softmax(z_s / kd_T))

    (region_loss the same against the region negatives); tau = contrast_temperature,
    kd_T = contrast_kd_temperature. A batch without a labelled pixel gives 0 for both.

    The queues are equal on every process by construction: each enqueues the same gathered batch, and
    every random draw comes from `generator`, which the training loop seeds identically on every rank
    (`local_buffers` names that state, so that it is neither broadcast nor saved once per rank).

    Args:
        num_classes (int): number of classes, one queue per class.
        pixel_memory_size (int): pixel queue length per class, at least pixel_update_freq.
        region_memory_size (int): region queue length per class, at least 1.
        pixel_contrast_size (int): pixel negatives per class, 1 .. pixel_memory_size.
        region_contrast_size (int): region negatives per class, 1 .. region_memory_size.
        contrast_kd_temperature (float): kd_T, positive.
        contrast_temperature (float): tau, positive.
        ignore_label (int): label of the pixels that take no part.
        s_channels (int): student feature channels (the head's input).
        t_channels (int): teacher feature channels: the head's output and the width of the queues.
        pixel_update_freq (int): pixel vectors enqueued per class and image, at most.
        norm_layer (type): the head's normalisation layer.
        generator (torch.Generator or None): CPU generator of every random draw (None: torch's default).
    """

    local_buffers = ('teacher_segment_queue', 'segment_queue_ptr', 'teacher_pixel_queue', 'pixel_queue_ptr')

    def __init__(self, num_classes, pixel_memory_size=20000, region_memory_size=2000, pixel_contrast_size=216,
                 region_contrast_size=54, contrast_kd_temperature=1.0, contrast_temperature=0.1, ignore_label=-1,
                 s_channels=128, t_channels=256, pixel_update_freq=16, norm_layer=nn.BatchNorm2d, generator=None):
        super().__init__()
        self.num_classes = integer_at_least('num_classes', num_classes, 1)
        self.pixel_update_freq = integer_at_least('pixel_update_freq', pixel_update_freq, 1)
        self.pixel_memory_size = integer_at_least('pixel_memory_size', pixel_memory_size, self.pixel_update_freq,
                                                   ' (pixel_update_freq)')
        self.region_memory_size = integer_at_least('region_memory_size', region_memory_size, 1)
        self.pixel_contrast_size = integer_at_least('pixel_contrast_size', pixel_contrast_size, 1)
        self.region_contrast_size = integer_at_least('region_contrast_size', region_contrast_size, 1)
        # randperm(size)[:P] would silently give fewer negatives than asked for
        at_most('pixel_contrast_size', self.pixel_contrast_size, 'pixel_memory_size', self.pixel_memory_size)
        at_most('region_contrast_size', self.region_contrast_size, 'region_memory_size', self.region_memory_size)
        self.contrast_kd_temperature = positive_number('contrast_kd_temperature', contrast_kd_temperature)
        self.contrast_temperature = positive_number('contrast_temperature', contrast_temperature)
        self.ignore_label = integer('ignore_label', ignore_label)
        self.s_channels = integer_at_least('s_channels', s_channels, 1)
        self.t_channels = integer_at_least('t_channels', t_channels, 1)
        self.generator = check_generator(generator)

        # Built in the original's order: the head first, then the queues from the global generator.
        self.project_head = projection_head(self.s_channels, self.t_channels, norm_layer)
        segment_queue = _normalised_queue(self.num_classes, self.region_memory_size, self.t_channels)
        pixel_queue = _normalised_queue(self.num_classes, self.pixel_memory_size, self.t_channels)
        self.register_buffer('teacher_segment_queue', segment_queue)
        self.register_buffer('segment_queue_ptr', torch.zeros(self.num_classes, dtype=torch.long))
        self.register_buffer('teacher_pixel_queue', pixel_queue)
        self.register_buffer('pixel_queue_ptr', torch.zeros(self.num_classes, dtype=torch.long))

    def extra_repr(self):
        return (f'num_classes={self.num_classes}, pixel_memory_size={self.pixel_memory_size}, '
                f'region_memory_size={self.region_memory_size}, pixel_contrast_size={self.pixel_contrast_size}, '
                f'region_contrast_size={self.region_contrast_size}, '
                f'contrast_kd_temperature={self.contrast_kd_temperature}, '
                f'contrast_temperature={self.contrast_temperature}, ignore_label={self.ignore_label}, '
                f'pixel_update_freq={self.pixel_update_freq}')

    def forward(self, s_feats, t_feats, labels):
        s_feats = resize_like(s_feats, t_feats)  # another family's stride (losses/align.py)
        self._check_inputs(s_feats, t_feats, labels)
        n, _, h, w = s_feats.shape
        device = s_feats.device
        dtype = loss_precision(s_feats)
        projected = run_head(self.project_head, s_feats)
        with autocast_disabled(device.type):
            student = F.normalize(projected.to(dtype), p=2, dim=1)
            teacher = F.normalize(t_feats.detach().to(dtype), p=2, dim=1)
            small_labels = resize_labels_nearest(labels, (h, w)).long()
            self._check_label_values(small_labels)
            self._dequeue_and_enqueue(teacher.reshape(n, self.t_channels, h * w), small_labels.reshape(n, h * w))
            # Drawn even for a batch without a labelled pixel, so that the generator advances alike on
            # every process whatever its own batch holds.
            pixel_slots = torch.randperm(self.pixel_memory_size, generator=self.generator)[:self.pixel_contrast_size]
            region_slots = torch.randperm(self.region_memory_size,
                                          generator=self.generator)[:self.region_contrast_size]
            labelled = small_labels.reshape(-1) != self.ignore_label
            if not bool(labelled.any()):
                # 0 with a zero gradient for the head (the original gave NaN here)
                return (student * 0).sum(), (student * 0).sum()
            s_rows = _pixel_rows(student)[labelled]
            t_rows = _pixel_rows(teacher)[labelled]
            pixel_loss = queue_relation_kl(s_rows, t_rows,
                                           self._negatives(self.teacher_pixel_queue, pixel_slots, dtype),
                                           self.contrast_temperature, self.contrast_kd_temperature)
            region_loss = queue_relation_kl(s_rows, t_rows,
                                            self._negatives(self.teacher_segment_queue, region_slots, dtype),
                                            self.contrast_temperature, self.contrast_kd_temperature)
            return pixel_loss, region_loss

    def _check_inputs(self, s_feats, t_feats, labels):
        check_features(s_feats, t_feats, self.s_channels, self.t_channels)
        n = s_feats.shape[0]
        if labels.dim() != 3 or labels.shape[0] != n or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f'labels must be an integer N x H x W tensor with N = {n}, got {labels.dtype} '
                             f'{tuple(labels.shape)}')

    def _check_label_values(self, small_labels):
        # An out-of-range class id would be written into another class's queue (the enqueue needs the
        # label values on the host anyway, so this check costs no extra synchronisation that matters).
        bad = (small_labels != self.ignore_label) & ((small_labels < 0) | (small_labels >= self.num_classes))
        if bool(bad.any()):
            values = small_labels[bad].unique()[:10].tolist()
            raise ValueError(f'label values {values} are neither a class (0..{self.num_classes - 1}) nor the '
                             f'ignore label {self.ignore_label}')

    @staticmethod
    def _negatives(queue, slots, dtype):
        """The queue rows at `slots` of every class, class-major ((classes * P) x D), in `dtype`."""
        picked = queue.index_select(1, slots.to(queue.device))
        return picked.reshape(-1, queue.shape[-1]).to(dtype)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys, labels):
        """Enqueue the teacher keys (N x D x M, L2-normalised) of the pixels of every class, for the batch
        of all processes: the writes of the original's loop over images and classes, as a few tensor
        operations."""
        keys, labels = all_gather_rows(keys), all_gather_rows(labels)
        images, dim, pixels = keys.shape
        classes = self.num_classes
        device = keys.device
        labelled = labels != self.ignore_label
        # group = image * classes + class of every labelled pixel, in (image, pixel) order
        positions = labelled.reshape(-1).nonzero().squeeze(1)
        groups = (labels + classes * torch.arange(images, device=device).unsqueeze(1)).reshape(-1)[positions]
        if groups.numel() == 0:
            return
        counts = torch.bincount(groups, minlength=images * classes)
        vectors = keys.transpose(1, 2).reshape(-1, dim)  # (image, pixel) rows, a copy

        # Region queue: the j-th image (in order) holding class k writes at slot (ptr[k] + j) mod size.
        present = counts.view(images, classes) > 0
        sums = torch.zeros(images * classes, dim, dtype=keys.dtype, device=device)
        sums.index_add_(0, groups, vectors[positions])
        means = sums / counts.clamp(min=1).unsqueeze(1).to(keys.dtype)
        occurrence = present.long().cumsum(0) - 1
        region_slots = (self.segment_queue_ptr.unsqueeze(0) + occurrence) % self.region_memory_size
        class_ids = torch.arange(classes, device=device).expand(images, classes)
        written = present.reshape(-1).nonzero().squeeze(1)  # (image, class) order, the original's
        cls, slot = class_ids.reshape(-1)[written], region_slots.reshape(-1)[written]
        keep = _last_writes(cls * self.region_memory_size + slot)
        self.teacher_segment_queue[cls[keep], slot[keep]] = F.normalize(means[written[keep]], p=2, dim=1).to(
            self.teacher_segment_queue.dtype)
        self.segment_queue_ptr.add_(present.sum(0)).remainder_(self.region_memory_size)

        # Pixel queue: K = min(n_k, pixel_update_freq) pixels of the class drawn uniformly without
        # replacement (a random order within each group, its first K), written in pixel order.
        take = counts.clamp(max=self.pixel_update_freq)
        shuffled = torch.randperm(groups.numel(), generator=self.generator).to(device)
        shuffled = shuffled[torch.sort(groups[shuffled], stable=True).indices]  # grouped, random within
        group_start = counts.cumsum(0) - counts
        rank = torch.arange(groups.numel(), device=device) - group_start[groups[shuffled]]
        chosen = shuffled[rank < self.pixel_update_freq]
        # (group, pixel) order: sort on a key unique per chosen pixel
        chosen = chosen[torch.sort(groups[chosen] * groups.numel() + chosen).indices]
        chosen_groups = groups[chosen]
        # The first slot of every (image, class) write, with the original's wrap rule (`>=`: a write that
        # would end exactly at the end also goes to the last K slots and resets the pointer); a scan over
        # the gathered images on class-length tensors.
        size = self.pixel_memory_size
        take_per_image = take.view(images, classes)
        first_slot = torch.empty_like(take_per_image)
        pointer = self.pixel_queue_ptr.clone()
        for image in range(images):
            k = take_per_image[image]
            wrap = pointer + k >= size  # never true for an absent class (k = 0, pointer < size)
            first_slot[image] = torch.where(wrap, size - k, pointer)
            pointer = torch.where(wrap, torch.zeros_like(pointer), pointer + k)
        take_start = take.cumsum(0) - take
        slot = first_slot.reshape(-1)[chosen_groups] + (torch.arange(chosen.numel(), device=device)
                                                        - take_start[chosen_groups])
        cls = chosen_groups % classes
        keep = _last_writes(cls * size + slot)
        values = F.normalize(vectors[positions[chosen[keep]]], p=2, dim=1)
        self.teacher_pixel_queue[cls[keep], slot[keep]] = values.to(self.teacher_pixel_queue.dtype)
        self.pixel_queue_ptr.copy_(pointer)


def check_features(s_feats, t_feats, s_channels, t_channels):
    """A ValueError unless the student's features are N x s_channels x h x w and the teacher's
    N x t_channels x h x w."""
    if s_feats.dim() != 4 or s_feats.shape[1] != s_channels:
        raise ValueError(f'student features must be N x {s_channels} x h x w, got {tuple(s_feats.shape)}')
    n, _, h, w = s_feats.shape
    if tuple(t_feats.shape) != (n, t_channels, h, w):
        raise ValueError(f'teacher features must be {n} x {t_channels} x {h} x {w} (the student\'s N, h and w, '
                         f't_channels channels), got {tuple(t_feats.shape)}')


def _normalised_queue(*shape):
    """A tensor of N(0, 1) draws (the global generator) of `shape`, each row (last dimension) divided by
    max(norm, 1e-12) as F.normalize does, in place (the pixel queue is hundreds of megabytes)."""
    queue = torch.randn(*shape)
    return queue.div_(queue.norm(p=2, dim=-1, keepdim=True).clamp_(min=1e-12))


def check_generator(generator):
    """`generator` if it is a CPU torch.Generator or None (torch's default generator), else a LossSettingError."""
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != 'cpu'):
        raise LossSettingError(f'generator must be a CPU torch.Generator or None, got {generator!r}')
    return generator


def projection_head(s_channels, t_channels, norm_layer):
    """CIRKD's projection of the student's feature to the teacher's channels: 1x1 conv, norm, ReLU, 1x1 conv
    (no biases; keys 0.weight, 1.*, 3.weight)."""
    return nn.Sequential(nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False),
                         norm_layer(t_channels),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(t_channels, t_channels, kernel_size=1, bias=False))


def run_head(head, features):
    """`head(features)`: the head is a network layer, so under autocast it runs as autocast decides, otherwise
    in the precision of its parameters."""
    if not torch.is_autocast_enabled(features.device.type):
        features = features.to(head[0].weight.dtype)
    return head(features)
