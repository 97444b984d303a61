"""The student's optimizer: SGD or AdamW over parameter groups that the network and the method declare, with the
poly learning-rate schedule.

- The network names its head's parameters (`head_parameter_names()`: the decoder and the aux head); with
  `--head-lr-mult M` they train with M x the learning rate (SegFormer's official recipe uses 10).
- `--no-decay-norm-bias`: no weight decay on the one-dimensional parameters (normalisation weights and
  biases, as timm's `param_groups_weight_decay`); the original scripts decay them too.
- A distillation method declares its own groups (`DistillationMethod.param_groups()`: modules trained with the
  student, each group with an optional `lr_mult` and `weight_decay`).

Every group carries `name`, `lr_mult` and `weight_decay`; `set_learning_rate` gives each group
`lr x lr_mult` before every step. The groups (names, sizes, multipliers) are part of the optimizer's state dict,
so the resume file holds them, and a resume file whose groups differ is refused.
"""
import torch

from utils.errors import UserError

POLY_POWER = 0.9
OPTIMIZERS = ('sgd', 'adamw')
SGD_MOMENTUM = 0.9


def poly_lr(base_lr, iteration, max_iterations, power=POLY_POWER):
    """lr of the 0-based iteration index: base_lr * (1 - i / max) ** power."""
    return base_lr * (1.0 - float(iteration) / max_iterations) ** power


def student_groups(student, head_lr_mult=1.0, no_decay_norm_bias=False, weight_decay=0.0):
    """The student's parameter groups: (backbone | head) x (decayed | not decayed), empty ones left out."""
    head = set(student.head_parameter_names()) if head_lr_mult != 1.0 else set()
    groups = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        in_head = name in head
        decayed = not (no_decay_norm_bias and param.ndim <= 1)
        key = ('student head' if in_head else 'student') + ('' if decayed else ' (no decay)')
        group = groups.setdefault(key, {'name': key, 'params': [], 'lr_mult': head_lr_mult if in_head else 1.0,
                                        'weight_decay': weight_decay if decayed else 0.0})
        group['params'].append(param)
    return list(groups.values())


def method_groups(method, weight_decay, no_decay_norm_bias=False):
    """The groups a method declares, completed with the defaults (lr_mult 1, the run's weight decay)."""
    if method is None:
        return []
    groups = []
    for index, declared in enumerate(method.param_groups()):
        params = [p for p in declared['params'] if p.requires_grad]
        if not params:
            continue
        name = declared.get('name', f'method {index}')
        group_decay = declared.get('weight_decay', weight_decay)
        if no_decay_norm_bias:
            flat = [p for p in params if p.ndim <= 1]
            params = [p for p in params if p.ndim > 1]
            if flat:
                groups.append({'name': f'{name} (no decay)', 'params': flat,
                               'lr_mult': declared.get('lr_mult', 1.0), 'weight_decay': 0.0})
        if params:
            groups.append({'name': name, 'params': params, 'lr_mult': declared.get('lr_mult', 1.0),
                           'weight_decay': group_decay})
    return groups


def build_optimizer(groups, args):
    """SGD (momentum `--momentum`) or AdamW (PyTorch's default betas and eps) over `groups`, at `--lr`."""
    for group in groups:
        group['lr'] = args.lr * group['lr_mult']
    if args.optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == 'adamw':
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    raise UserError(f'--optimizer {args.optimizer!r}: choose one of {", ".join(OPTIMIZERS)}')


def set_learning_rate(optimizer, lr):
    """Give every group `lr` x its `lr_mult`."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_mult', 1.0)


def describe_groups(optimizer):
    """[(name, tensors, parameters, lr_mult, weight_decay)] of the optimizer's groups, for the log and the flags."""
    return [(group.get('name', str(i)), len(group['params']), sum(p.numel() for p in group['params']),
             group.get('lr_mult', 1.0), group['weight_decay']) for i, group in enumerate(optimizer.param_groups)]
