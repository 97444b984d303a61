"""SegFormer's forward in eval mode restated as plain functions over a state dict (the tests' yardstick).

From the description of the network in Xie et al., "SegFormer: Simple and Efficient Design for Semantic
Segmentation with Transformers" (NeurIPS 2021, https://arxiv.org/abs/2105.15203) and the layout of CIRKD's
models/segformer.py (winycg/CIRKD) / NVlabs' mix_transformer.py and segformer_head.py (NVlabs/SegFormer). It
reads the weights by name from a state dict and calls only torch.nn.functional and einsum, never the modules
under test; it is written for clarity, not speed (a loop over blocks and heads).
"""
import torch
import torch.nn.functional as F

NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)


def _layer_norm(tokens, state, name, eps):
    return F.layer_norm(tokens, tokens.shape[-1:], state[name + '.weight'], state[name + '.bias'], eps)


def _linear(tokens, state, name):
    # y = x W^T + b written as an einsum over the channel axis
    return torch.einsum('...i,oi->...o', tokens, state[name + '.weight']) + state[name + '.bias']


def _to_map(tokens, height, width):
    """(B, H*W, C) row-major tokens -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def _to_tokens(feature_map):
    return feature_map.flatten(2).transpose(1, 2)


def attention(tokens, height, width, state, name, num_heads, sr_ratio):
    """Multi-head attention whose keys and values come from the map reduced sr_ratio times per side."""
    channels = tokens.shape[-1]
    head_dim = channels // num_heads
    queries = _linear(tokens, state, name + '.q')
    context = tokens
    if sr_ratio > 1:
        reduced = F.conv2d(_to_map(tokens, height, width), state[name + '.sr.weight'], state[name + '.sr.bias'],
                           stride=sr_ratio)
        context = _layer_norm(_to_tokens(reduced), state, name + '.norm', 1e-5)
    key_values = _linear(context, state, name + '.kv')
    keys, values = key_values[..., :channels], key_values[..., channels:]
    heads = []
    for h in range(num_heads):
        own = slice(h * head_dim, (h + 1) * head_dim)
        scores = torch.einsum('bnd,bmd->bnm', queries[..., own], keys[..., own]) / head_dim ** 0.5
        heads.append(torch.einsum('bnm,bmd->bnd', scores.softmax(-1), values[..., own]))
    return _linear(torch.cat(heads, dim=-1), state, name + '.proj')


def mix_ffn(tokens, height, width, state, name):
    hidden = _linear(tokens, state, name + '.fc1')
    hidden_map = _to_map(hidden, height, width)
    hidden_map = F.conv2d(hidden_map, state[name + '.dwconv.dwconv.weight'], state[name + '.dwconv.dwconv.bias'],
                          padding=1, groups=hidden_map.shape[1])
    return _linear(F.gelu(_to_tokens(hidden_map)), state, name + '.fc2')


def mit_encoder(state, image, depths):
    """The stage outputs [c1, c2, c3, c4] of the MiT encoder."""
    x = image
    stages = []
    for stage in range(1, 5):
        stride, padding = (4, 3) if stage == 1 else (2, 1)
        embed = f'patch_embed{stage}'
        x = F.conv2d(x, state[embed + '.proj.weight'], state[embed + '.proj.bias'], stride=stride, padding=padding)
        height, width = x.shape[2:]
        tokens = _layer_norm(_to_tokens(x), state, embed + '.norm', 1e-5)
        for j in range(depths[stage - 1]):
            block = f'block{stage}.{j}'
            tokens = tokens + attention(_layer_norm(tokens, state, block + '.norm1', 1e-6), height, width, state,
                                        block + '.attn', NUM_HEADS[stage - 1], SR_RATIOS[stage - 1])
            tokens = tokens + mix_ffn(_layer_norm(tokens, state, block + '.norm2', 1e-6), height, width, state,
                                      block + '.mlp')
        x = _to_map(_layer_norm(tokens, state, f'norm{stage}', 1e-6), height, width)
        stages.append(x)
    return stages


def segformer_decoder(state, stages, bn_eps=1e-5):
    """(logits, fused feature) of the all-MLP decoder in eval mode (BN with its running statistics)."""
    size = stages[0].shape[2:]
    projected = []
    for stage in (4, 3, 2, 1):
        weight, bias = state[f'linear_c{stage}.proj.weight'], state[f'linear_c{stage}.proj.bias']
        mapped = torch.einsum('bchw,dc->bdhw', stages[stage - 1], weight) + bias.view(1, -1, 1, 1)
        projected.append(F.interpolate(mapped, size=size, mode='bilinear', align_corners=False))
    fused = F.conv2d(torch.cat(projected, dim=1), state['linear_fuse.0.weight'], state.get('linear_fuse.0.bias'))
    fused = F.batch_norm(fused, state['linear_fuse.1.running_mean'], state['linear_fuse.1.running_var'],
                         state['linear_fuse.1.weight'], state['linear_fuse.1.bias'], training=False, eps=bn_eps)
    fused = F.relu(fused)
    logits = F.conv2d(fused, state['linear_pred.weight'], state['linear_pred.bias'])
    return logits, fused


def segformer_forward(state, image, depths):
    """(logits, fused feature, [c1, c2, c3, c4]) of a SegFormer whose weights are `state` (CIRKD's names)."""
    stages = mit_encoder(state, image, depths)
    logits, fused = segformer_decoder(state, stages)
    return logits, fused, stages
