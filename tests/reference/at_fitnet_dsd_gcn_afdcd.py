"""The original AT, FitNet, DSD and GCN (winycg/CIRKD, losses/at.py, fitnet.py, dsd.py, gcn.py) and Af-DCD
(OSVAI/Af-DCD, losses/ocmgd.py) restated plainly, the way the originals compute them.

A yardstick for the tests and the benchmark, never for training:
- `original_at_loss`, `original_fitnet_loss`: the one-line losses;
- `original_psd_loss`: a loop over the pairs of maps, the pair terms summed into a 0-d tensor of
  `accumulator_dtype` (the original's float32; the original also moved it to the GPU, left out here);
  `original_csd_loss`;
- `OriginalGCN`: the explicit h*w x h*w affinity (bmm, softmax, bmm), the original's parameter names;
- `OriginalOmniContrastive`: Af-DCD with the original's parameter names (`align` only for unequal channels,
  `projetor`, `adpator_*`), the mask from a uniform draw (torch's default generator unless the draw is
  passed), the CamVid crop to 44 x 44, and the contrastive term with the original's boolean-mask gathers of the
  positive and the negatives (samples cut with F.unfold here).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def original_attention(feat):
    return F.normalize(feat.pow(2).mean(1).view(feat.size(0), -1))


def original_at_loss(feat_S, feat_T):
    return (original_attention(feat_S) - original_attention(feat_T)).pow(2).mean()


def original_fitnet_loss(weight, feat_S, feat_T):
    """weight: the 1x1 convolution's Ct x Cs x 1 x 1 weight (no bias)."""
    return ((F.conv2d(feat_S, weight) - feat_T) ** 2).mean()


def original_psd_loss(s_list, t_list, accumulator_dtype=torch.float32):
    s_att = [original_attention(f) for f in s_list]
    t_att = [original_attention(f) for f in t_list]
    s_res, t_res = [], []
    for first in range(len(s_att) - 1):
        for second in range(first + 1, len(s_att)):
            s_res.append(F.normalize(s_att[second] - s_att[first]))
            t_res.append(F.normalize(t_att[second] - t_att[first]))
    total = torch.tensor(0., dtype=accumulator_dtype, device=s_list[0].device)
    for s, t in zip(s_res, t_res, strict=True):
        total += (F.normalize(s) - F.normalize(t)).pow(2).mean()
    return total / len(s_res)


def _class_similarity(logits, tau):
    pooled = nn.AvgPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)(logits)
    b, c, _, _ = pooled.shape
    p = F.softmax(pooled.reshape(b, c, -1) / tau, dim=-1)
    return torch.bmm(p, p.transpose(1, 2))


def original_csd_loss(logits_S, logits_T, tau=4.0):
    return ((_class_similarity(logits_S, tau) - _class_similarity(logits_T, tau)) ** 2).mean()


class OriginalGCN(nn.Module):
    """The original block; the affinity N x hw x hw is formed and kept."""

    def __init__(self, plane, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inner = plane // 2
        self.node_k = nn.Conv2d(plane, inner, kernel_size=1, bias=False)
        self.node_v = nn.Conv2d(plane, inner, kernel_size=1, bias=False)
        self.node_q = nn.Conv2d(plane, inner, kernel_size=1, bias=False)
        self.conv1 = nn.Sequential(nn.Conv2d(inner, plane, kernel_size=1, bias=False), norm_layer(plane), nn.ReLU())
        self.out_conv = nn.Sequential(nn.Conv2d(plane * 2, plane, kernel_size=1, bias=False), norm_layer(plane),
                                      nn.ReLU())

    def forward(self, x):
        k, v, q = self.node_k(x), self.node_v(x), self.node_q(x)
        b, c, h, w = k.shape
        q = q.view(b, c, -1).permute(0, 2, 1)
        affinity = torch.softmax(torch.bmm(q * c ** -0.5, k.view(b, c, -1)), dim=-1)
        gathered = torch.bmm(affinity, v.view(b, c, -1).permute(0, 2, 1))
        gathered = self.conv1(gathered.transpose(1, 2).contiguous().view(b, c, h, w))
        return self.out_conv(torch.cat([x, gathered], dim=1))


class OriginalEnhancedProjector(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.adpator_1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adpator_2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x_1 = self.block_1(x)
        x_2 = self.block_2(x_1)
        return (self.adpator_1(x_1) + self.adpator_2(x_2)) / 2.


def original_mask(uniform, mask_ratio):
    """int64: 0 where u > 1 - ratio, 1 elsewhere."""
    return torch.where(uniform > 1 - mask_ratio, 0, 1)


def _unfold_samples(x, groups, patch_size):
    """(N * patches) x (pixels * groups) x (C / groups), pixel major, group minor."""
    n, c, _, _ = x.shape
    pixels = patch_size[0] * patch_size[1]
    columns = F.unfold(x, kernel_size=patch_size, stride=patch_size)  # N x (C * pixels) x patches
    columns = columns.view(n, groups, c // groups, pixels, -1)
    return columns.permute(0, 4, 3, 1, 2).reshape(-1, pixels * groups, c // groups)


def original_contrastive_term(preds, targets, groups=16, patch_size=(4, 4), tau=0.07, pool_size=4,
                              dataset='citys'):
    """The contrastive term as the original forms it, before its division by the batch size."""
    if dataset == 'camvid':
        preds, targets = preds[:, :, :44, :44], targets[:, :, :44, :44]
    elif pool_size != 0:
        preds, targets = F.max_pool2d(preds, pool_size), F.max_pool2d(targets, pool_size)
    n, _, h, w = preds.shape
    samples = patch_size[0] * patch_size[1] * groups
    similarity = -torch.cdist(_unfold_samples(preds, groups, patch_size), _unfold_samples(targets, groups, patch_size),
                              p=1)
    positive_mask = torch.eye(samples, dtype=torch.bool, device=preds.device).repeat(similarity.shape[0], 1, 1)
    group_of = torch.arange(groups, device=preds.device).repeat(patch_size[0] * patch_size[1])
    negative_mask = (group_of.unsqueeze(0) != group_of.unsqueeze(1)).repeat(similarity.shape[0], 1, 1)
    positives = similarity[positive_mask].view(n * h * w * groups, -1)
    negatives = similarity[negative_mask].view(n * h * w * groups, -1)
    logits = torch.cat([positives, negatives], dim=1) / tau
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=preds.device)
    return nn.CrossEntropyLoss(reduction='sum')(logits, labels) / (h * w)


def original_feature_terms(rebuilt, teacher, **contrast):
    """(dis_loss, ctr_loss) of the projector's output and the teacher's feature."""
    n = teacher.shape[0]
    dis_loss = nn.MSELoss(reduction='sum')(rebuilt, teacher) / n
    return dis_loss, original_contrastive_term(rebuilt, teacher, **contrast) / n


class OriginalOmniContrastive(nn.Module):
    def __init__(self, student_channels, teacher_channels, tau_ocd=0.07, M_ocd=16, pool_size=4, patch_size=(4, 4),
                 rand_mask=True, mask_ratio=0.75, enhance_projector=False, dataset='citys'):
        super().__init__()
        self.contrast = dict(groups=M_ocd, patch_size=patch_size, tau=tau_ocd, pool_size=pool_size, dataset=dataset)
        self.rand_mask = rand_mask
        self.mask_ratio = mask_ratio
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        if enhance_projector:
            self.projetor = OriginalEnhancedProjector(teacher_channels)
        else:
            self.projetor = nn.Sequential(nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
                                          nn.ReLU(inplace=True),
                                          nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1))

    def forward(self, feat_S, feat_T, uniform=None):
        feat_S = self.align(feat_S)  # an AttributeError for equal channel counts, as the original
        n, _, h, w = feat_T.shape
        if self.rand_mask:
            if uniform is None:
                uniform = torch.rand((n, 1, h, w))
            mask = original_mask(uniform, self.mask_ratio).to(feat_S.device)
        else:
            mask = torch.ones((n, 1, h, w), device=feat_S.device)
            mask[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3] = 0
        return original_feature_terms(self.projetor(feat_S * mask), feat_T, **self.contrast)
