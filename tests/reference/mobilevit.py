"""CIRKDv2's dilated MobileViT (winycg/CIRKD, models/base_models/mobilevit.py) and its PSP head
(models/psp_mobile.py) restated as plain functions of a state dict.

A yardstick for the tests, never for training. Nothing here calls the modules under test: convolutions are
F.conv2d on the state dict's tensors, batch and layer norms are written out, the 2x2 patches are gathered
with F.unfold / F.fold, and the attention is computed head by head from the rows q | k | v of
`in_proj_weight` as softmax(q k^T / sqrt(d_head)) v. The architecture is the table of MobileViT (Mehta and
Rastegari, ICLR 2022, https://arxiv.org/abs/2110.02178) with CIRKDv2's changes: stages 3 and 4 at stride 1,
their inverted residual's depthwise conv dilated 2 and 4; `conv_proj` without activation.
"""
import math

import torch
import torch.nn.functional as F

# Per arch: stem width, then ('mv2', out, stride, blocks, expand) or
# ('vit', out, stride, dim, ffn_dim, layers, expand, dilation).
ARCHS = {
    'xx_small': [('mv2', 16, 1, 1, 2), ('mv2', 24, 2, 3, 2), ('vit', 48, 2, 64, 128, 2, 2, 1),
                 ('vit', 64, 1, 80, 160, 4, 2, 2), ('vit', 80, 1, 96, 192, 3, 2, 4)],
    'x_small': [('mv2', 32, 1, 1, 4), ('mv2', 48, 2, 3, 4), ('vit', 64, 2, 96, 192, 2, 4, 1),
                ('vit', 80, 1, 120, 240, 4, 4, 2), ('vit', 96, 1, 144, 288, 3, 4, 4)],
    'small': [('mv2', 32, 1, 1, 4), ('mv2', 64, 2, 3, 4), ('vit', 96, 2, 144, 288, 2, 4, 1),
              ('vit', 128, 1, 192, 384, 4, 4, 2), ('vit', 160, 1, 240, 480, 3, 4, 4)],
}
STEM = 16
HEADS = 4
BN_EPS = 1e-5
LN_EPS = 1e-5


def expected_backbone_layout(arch):
    """[(key, shape)] of the backbone's state dict, in order, as CIRKDv2 names them."""
    out = []

    def bn(prefix, c):
        out.extend([(prefix + 'weight', (c,)), (prefix + 'bias', (c,)), (prefix + 'running_mean', (c,)),
                    (prefix + 'running_var', (c,)), (prefix + 'num_batches_tracked', ())])

    def conv_bn(prefix, shape):
        out.append((prefix + 'conv.weight', shape))
        bn(prefix + 'bn.', shape[0])

    def inverted_residual(prefix, cin, cout, expand):
        hidden = cin * expand
        conv_bn(prefix + 'conv.0.', (hidden, cin, 1, 1))
        conv_bn(prefix + 'conv.1.', (hidden, 1, 3, 3))
        conv_bn(prefix + 'conv.2.', (cout, hidden, 1, 1))

    conv_bn('stem.', (STEM, 3, 3, 3))
    cin = STEM
    for i, row in enumerate(ARCHS[arch]):
        if row[0] == 'mv2':
            _, cout, _, blocks, expand = row
            for j in range(blocks):
                inverted_residual(f'layers.{i}.{j}.', cin if j == 0 else cout, cout, expand)
        else:
            _, cout, _, dim, ffn, layers, expand, _ = row
            inverted_residual(f'layers.{i}.0.', cin, cout, expand)
            p = f'layers.{i}.1.'
            conv_bn(p + 'local_rep.0.', (cout, cout, 3, 3))
            out.append((p + 'local_rep.1.conv.weight', (dim, cout, 1, 1)))
            for j in range(layers):
                t = f'{p}global_rep.{j}.'
                out.extend([(t + 'ln1.weight', (dim,)), (t + 'ln1.bias', (dim,)),
                            (t + 'attn.attn.in_proj_weight', (3 * dim, dim)),
                            (t + 'attn.attn.in_proj_bias', (3 * dim,)),
                            (t + 'attn.attn.out_proj.weight', (dim, dim)), (t + 'attn.attn.out_proj.bias', (dim,)),
                            (t + 'ln2.weight', (dim,)), (t + 'ln2.bias', (dim,)),
                            (t + 'ffn.layers.0.0.weight', (ffn, dim)), (t + 'ffn.layers.0.0.bias', (ffn,)),
                            (t + 'ffn.layers.1.weight', (dim, ffn)), (t + 'ffn.layers.1.bias', (dim,))])
            out.extend([(f'{p}global_rep.{layers}.weight', (dim,)), (f'{p}global_rep.{layers}.bias', (dim,))])
            conv_bn(p + 'conv_proj.', (cout, dim, 1, 1))
            conv_bn(p + 'conv_fusion.', (cout, 2 * cout, 3, 3))
        cin = cout
    conv_bn('conv_1x1_exp.', (4 * cin, cin, 1, 1))
    return out


def swish(x):
    return x * torch.sigmoid(x)


def batch_norm(x, s, prefix):
    shape = (1, -1, 1, 1)
    scale = s[prefix + 'weight'] / torch.sqrt(s[prefix + 'running_var'] + BN_EPS)
    return (x - s[prefix + 'running_mean'].view(shape)) * scale.view(shape) + s[prefix + 'bias'].view(shape)


def conv_bn(x, s, prefix, stride=1, dilation=1, act=True):
    w = s[prefix + 'conv.weight']
    k = w.shape[-1]
    groups = x.shape[1] // w.shape[1]
    y = F.conv2d(x, w, None, stride, dilation * (k - 1) // 2, dilation, groups)
    y = batch_norm(y, s, prefix + 'bn.')
    return swish(y) if act else y


def layer_norm(x, s, prefix):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * s[prefix + 'weight'] + s[prefix + 'bias']


def attention(x, s, prefix):
    """x: (sequences, N, d). Multi-head self-attention from nn.MultiheadAttention's tensors, head by head."""
    d = x.shape[-1]
    hd = d // HEADS
    w, b = s[prefix + 'in_proj_weight'], s[prefix + 'in_proj_bias']
    q = x @ w[:d].T + b[:d]
    k = x @ w[d:2 * d].T + b[d:2 * d]
    v = x @ w[2 * d:].T + b[2 * d:]
    heads = []
    for h in range(HEADS):
        cols = slice(h * hd, (h + 1) * hd)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(hd)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    return torch.cat(heads, dim=-1) @ s[prefix + 'out_proj.weight'].T + s[prefix + 'out_proj.bias']


def to_sequences(x):
    """(B, d, H, W), H and W even -> (B*4, N, d): sequence b*4 + (2*row + col) holds pixel (row, col) of each
    2x2 patch, patches in row-major order."""
    b, d, h, w = x.shape
    cols = F.unfold(x, kernel_size=2, stride=2)          # (B, d*4, N), channel-major then kernel position
    cols = cols.view(b, d, 4, -1).permute(0, 2, 3, 1)   # (B, 4, N, d)
    return cols.reshape(b * 4, -1, d)


def from_sequences(seq, b, h, w):
    d = seq.shape[-1]
    cols = seq.view(b, 4, -1, d).permute(0, 3, 1, 2).reshape(b, d * 4, -1)
    return F.fold(cols, output_size=(h, w), kernel_size=2, stride=2)


def mobilevit_block(x, s, p, layers):
    y = conv_bn(x, s, p + 'local_rep.0.')
    y = F.conv2d(y, s[p + 'local_rep.1.conv.weight'])
    b, _, h, w = y.shape
    even = (h + h % 2, w + w % 2)
    if even != (h, w):
        y = F.interpolate(y, size=even, mode='bilinear', align_corners=False)
    seq = to_sequences(y)
    for j in range(layers):
        t = f'{p}global_rep.{j}.'
        seq = seq + attention(layer_norm(seq, s, t + 'ln1.'), s, t + 'attn.attn.')
        hidden = swish(layer_norm(seq, s, t + 'ln2.') @ s[t + 'ffn.layers.0.0.weight'].T + s[t + 'ffn.layers.0.0.bias'])
        seq = seq + hidden @ s[t + 'ffn.layers.1.weight'].T + s[t + 'ffn.layers.1.bias']
    seq = layer_norm(seq, s, f'{p}global_rep.{layers}.')
    y = from_sequences(seq, b, *even)
    if even != (h, w):
        y = F.interpolate(y, size=(h, w), mode='bilinear', align_corners=False)
    y = conv_bn(y, s, p + 'conv_proj.', act=False)
    return conv_bn(torch.cat([x, y], 1), s, p + 'conv_fusion.')


def inverted_residual(x, s, p, stride, dilation):
    y = conv_bn(x, s, p + 'conv.0.')
    y = conv_bn(y, s, p + 'conv.1.', stride=stride, dilation=dilation)
    y = conv_bn(y, s, p + 'conv.2.', act=False)
    return x + y if stride == 1 and x.shape == y.shape else y


def mobilevit_backbone(s, x, arch, prefix=''):
    """The backbone's output (conv_1x1_exp) for input x, from the state dict `s` (keys under `prefix`)."""
    s = {k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)}
    x = conv_bn(x, s, 'stem.', stride=2)
    for i, row in enumerate(ARCHS[arch]):
        if row[0] == 'mv2':
            for j in range(row[3]):
                x = inverted_residual(x, s, f'layers.{i}.{j}.', row[2] if j == 0 else 1, 1)
        else:
            x = inverted_residual(x, s, f'layers.{i}.0.', row[2], row[7])
            x = mobilevit_block(x, s, f'layers.{i}.1.', row[5])
    return conv_bn(x, s, 'conv_1x1_exp.')


def psp_head(s, x, prefix='head.'):
    """CIRKDv2's mobile PSP head: (logits, feature) for the backbone output x."""
    size = x.shape[-2:]
    branches = [x]
    for i, bins in enumerate((1, 2, 3, 6), start=1):
        p = f'{prefix}psp.conv{i}.'
        y = F.conv2d(F.adaptive_avg_pool2d(x, bins), s[p + '0.weight'])
        y = torch.relu(batch_norm(y, s, p + '1.'))
        branches.append(F.interpolate(y, size=size, mode='bilinear', align_corners=True))
    y = F.conv2d(torch.cat(branches, 1), s[prefix + 'block.0.weight'], padding=1)
    feature = torch.relu(batch_norm(y, s, prefix + 'block.1.'))
    return F.conv2d(feature, s[prefix + 'classifier.weight'], s[prefix + 'classifier.bias']), feature
