"""The original SKD / IFVD building blocks (zju-SWJ/HWD, models/sagan_models.py, models/spectral.py,
losses/loss.py) restated plainly, loops and all.

A yardstick for the tests and the IFV benchmark, never for training: the discriminator with its own
spectral-norm wrapper whose power-iteration vectors are overwritten through `.data` (so a graph built by
an earlier call sees the later vectors), the pair-wise loss, the IFV loss with its Python loop over the
classes, and the hinge criteria.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _unit(x):
    return x / (x.norm() + 1e-12)


class OriginalSpectralNorm(nn.Module):
    """One power iteration per call; u and v replaced through `.data`, sigma built from u and v themselves."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        w = module.weight
        rows = w.shape[0]
        cols = w.reshape(rows, -1).shape[1]
        u = nn.Parameter(w.data.new(rows).normal_(0, 1), requires_grad=False)
        v = nn.Parameter(w.data.new(cols).normal_(0, 1), requires_grad=False)
        u.data = _unit(u.data)
        v.data = _unit(v.data)
        bar = nn.Parameter(w.data)
        del module._parameters['weight']
        module.register_parameter('weight_u', u)
        module.register_parameter('weight_v', v)
        module.register_parameter('weight_bar', bar)

    def forward(self, x):
        m = self.module
        u, v, w = m.weight_u, m.weight_v, m.weight_bar
        rows = w.shape[0]
        v.data = _unit(torch.mv(torch.t(w.view(rows, -1).data), u.data))
        u.data = _unit(torch.mv(w.view(rows, -1).data, v.data))
        sigma = u.dot(w.view(rows, -1).mv(v))
        m.weight = w / sigma.expand_as(w)
        return m.forward(x)


class OriginalSelfAttn(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, hh, ww = x.size()
        q = self.query_conv(x).view(b, -1, hh * ww).permute(0, 2, 1)
        k = self.key_conv(x).view(b, -1, hh * ww)
        attention = nn.Softmax(dim=-1)(torch.bmm(q, k))
        v = self.value_conv(x).view(b, -1, hh * ww)
        out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, hh, ww)
        return self.gamma * out + x, attention


class OriginalDiscriminator(nn.Module):
    def __init__(self, preprocess_GAN_mode, input_channel=19, image_size=64, conv_dim=64, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.imsize = image_size
        l1 = [OriginalSpectralNorm(nn.Conv2d(input_channel, conv_dim, 4, 2, 1)), nn.LeakyReLU(0.1)]
        l2 = [OriginalSpectralNorm(nn.Conv2d(conv_dim, conv_dim * 2, 4, 2, 1)), nn.LeakyReLU(0.1)]
        l3 = [OriginalSpectralNorm(nn.Conv2d(conv_dim * 2, conv_dim * 4, 4, 2, 1)), nn.LeakyReLU(0.1)]
        dim = conv_dim * 4
        if image_size == 64:
            self.l4 = nn.Sequential(OriginalSpectralNorm(nn.Conv2d(dim, dim * 2, 4, 2, 1)), nn.LeakyReLU(0.1))
            dim = dim * 2
        self.l1 = nn.Sequential(*l1)
        self.l2 = nn.Sequential(*l2)
        self.l3 = nn.Sequential(*l3)
        self.last = nn.Sequential(nn.Conv2d(dim, 1, 4))
        self.attn1 = OriginalSelfAttn(256)
        self.attn2 = OriginalSelfAttn(512)
        if preprocess_GAN_mode == 1:
            self.preprocess_additional = norm_layer(input_channel)
        elif preprocess_GAN_mode == 2:
            self.preprocess_additional = nn.Tanh()
        elif preprocess_GAN_mode == 3:
            self.preprocess_additional = lambda x: 2 * (x / 255 - 0.5)
        else:
            raise ValueError('preprocess_GAN_mode')

    def forward(self, x):
        out = self.l3(self.l2(self.l1(self.preprocess_additional(x))))
        out, _ = self.attn1(out)
        if self.imsize == 64:
            out = self.l4(out)
        out, _ = self.attn2(out)
        return self.last(out)


def original_pairwise(feat_S, feat_T):
    pool = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)
    f_S, f_T = pool(feat_S), pool(feat_T)

    def similarity(f):
        f = F.normalize(f, p=2, dim=1)
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return torch.einsum('icm,icn->imn', [f, f])

    err = (similarity(f_T) - similarity(f_S)) ** 2 / ((f_T.shape[-1] * f_T.shape[-2]) ** 2) / f_T.shape[0]
    return err.sum()


def original_ifv(feat_S, feat_T, target, classes):
    size = (feat_S.shape[2], feat_S.shape[3])
    small = nn.Upsample(size, mode='nearest')(target.unsqueeze(1).float())
    lab_S = small.expand(feat_S.size())
    lab_T = small.expand(feat_T.size())
    centre_S = feat_S.clone()
    centre_T = feat_T.clone()
    for k in range(classes):
        m_S = (lab_S == k).float()
        m_T = (lab_T == k).float()
        mean_S = (m_S * feat_S).sum(-1).sum(-1) / (m_S.sum(-1).sum(-1) + 1e-6)
        mean_T = (m_T * feat_T).sum(-1).sum(-1) / (m_T.sum(-1).sum(-1) + 1e-6)
        centre_S = (1 - m_S) * centre_S + m_S * mean_S.unsqueeze(-1).unsqueeze(-1)
        centre_T = (1 - m_T) * centre_T + m_T * mean_T.unsqueeze(-1).unsqueeze(-1)
    cos = nn.CosineSimilarity(dim=1)
    return nn.MSELoss()(cos(feat_S, centre_S), cos(feat_T, centre_T))


def original_class_centres(feat, target, classes):
    """The per-(image, class) centres of the loop above, N x C x classes (0 for an absent class)."""
    small = nn.Upsample((feat.shape[2], feat.shape[3]), mode='nearest')(target.unsqueeze(1).float())
    lab = small.expand(feat.size())
    centres = []
    for k in range(classes):
        m = (lab == k).float()
        centres.append((m * feat).sum(-1).sum(-1) / (m.sum(-1).sum(-1) + 1e-6))
    return torch.stack(centres, dim=-1)


def original_adv_for_g(d_out_S):
    return -d_out_S.mean()


def original_adv_hinge(d_out_S, d_out_T):
    assert d_out_S.shape == d_out_T.shape
    return nn.ReLU()(1.0 - d_out_T).mean() + nn.ReLU()(1.0 + d_out_S).mean()
