"""Building a training run from its flags: the student, the method, the teacher (only when the method has
terms to distil), the optimizer over the declared parameter groups, mixed precision and DDP. Nothing here
steps; `utils.train_step.Stepper` does.

`build_method(nets)` (a script's factory) sees `nets.student` and `nets.teacher` as `NetworkSpec`s (what the
networks state: output stride, feature and stage channels), `nets.num_class`, `nets.device` and
`nets.norm_layer`. It returns a `utils.method.DistillationMethod`, or None when the run has nothing to distil:
then no teacher is built or read at all.
"""
import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from losses import SegCrossEntropyLoss
from models.model_zoo import build_network, describe_network, has_aux_head, read_network_file
from models.segmentation import NetworkSpec
from utils.errors import UserError
from utils.method import DistillationMethod, frozen
from utils.optim import build_optimizer, describe_groups, method_groups, student_groups
from utils.options import student_names
from utils.train_step import Stepper, TrainStep

logger = logging.getLogger(__name__)


@dataclass
class Networks:
    """What a method's `build_method` gets to see."""
    student: NetworkSpec
    teacher: NetworkSpec
    num_class: int
    device: torch.device
    # The student's BatchNorm (SyncBatchNorm in distributed GPU runs): modules a method trains with the
    # student use the same, as the original's feature adapters and heads do.
    norm_layer: type = nn.BatchNorm2d


@dataclass
class BuiltRun:
    """Everything a run trains with."""
    student: nn.Module
    teacher: nn.Module
    method: DistillationMethod
    step_module: TrainStep
    train_module: nn.Module
    optimizer: torch.optim.Optimizer
    own_optimizers: dict
    stepper: Stepper
    scaler: object = None
    aux: bool = False
    groups: list = field(default_factory=list)


def student_norm_layer(ctx):
    """SyncBatchNorm for distributed GPU runs; on the CPU each process keeps its own batch statistics."""
    return nn.SyncBatchNorm if (ctx.distributed and ctx.device.type == 'cuda') else nn.BatchNorm2d


def check_micro_batch(args, ctx, norm_layer):
    micro_batch = args.batch_size // (ctx.world_size * args.grad_accum)
    if micro_batch < 2 and norm_layer is nn.BatchNorm2d:
        # The pooled ASPP / PSP branches see one value per channel: BatchNorm cannot train on that.
        raise UserError(f'--batch-size {args.batch_size} over {ctx.world_size} process(es) and --grad-accum '
                        f'{args.grad_accum} leaves {micro_batch} image per micro-batch; unsynchronised BatchNorm '
                        f'(CPU or one process) needs at least 2: use --batch-size '
                        f'{2 * ctx.world_size * args.grad_accum} or more, or a smaller --grad-accum')
    return micro_batch


def _mixed_precision(args, device):
    """(autocast dtype or None, fp16 grad scaler or None) for --amp: bf16 where the GPU supports it."""
    if not (args.amp and device.type == 'cuda'):
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype, (torch.amp.GradScaler('cuda') if dtype == torch.float16 else None)


def _synchronised_buffers(step_module, method):
    """Buffers every process must hold alike: all but a method's local buffers and its own modules'."""
    skipped = {'method.' + name for name in method.unsynchronised_names()} if method is not None else set()
    return [buffer for name, buffer in step_module.named_buffers() if name not in skipped]


def build_run(args, ctx, num_class, build_method):
    """The student, the method, the teacher, the optimizer, AMP and DDP of a run (see the module docstring)."""
    device = ctx.device
    norm_layer = student_norm_layer(ctx)
    check_micro_batch(args, ctx, norm_layer)
    model, backbone, pretrained_base, pretrained = student_names(args)
    aux = has_aux_head(model, backbone)  # the student trains its aux head where it has one, as the original
    student = build_network(model, backbone, num_class, aux, norm_layer, pretrained=pretrained,
                            pretrained_base=pretrained_base, head_width=getattr(args, 'head_width', None))
    student = student.to(device)

    method = None
    teacher = None
    if build_method is not None:
        teacher_file = None
        teacher_spec = None
        if hasattr(args, 'teacher_model'):
            teacher_file = read_network_file(args.teacher_pretrained, args.teacher_model, args.teacher_backbone)
            teacher_spec = describe_network(args.teacher_model, args.teacher_backbone, num_class,
                                            teacher_file.has_aux, teacher_file.head_width)
        method = build_method(Networks(student.spec(), teacher_spec, num_class, device, norm_layer))
        if method is not None:
            method = method.to(device)
            if teacher_file is not None:
                # frozen, in eval mode, with its own BatchNorm (never synchronised: it does not train)
                teacher = build_network(args.teacher_model, args.teacher_backbone, num_class, teacher_file.has_aux,
                                        nn.BatchNorm2d, network_file=teacher_file).to(device).eval()
                for param in teacher.parameters():
                    param.requires_grad_(False)
        elif teacher_file is not None:
            logger.info('no distillation term has a weight: the teacher is not built')

    uses_stages = method is not None and method.uses_stages
    step_module = TrainStep(student, method, SegCrossEntropyLoss(ignore_index=args.ignore_label), aux,
                            return_stages=uses_stages)
    groups = student_groups(student, args.head_lr_mult, args.no_decay_norm_bias, args.weight_decay)
    groups += method_groups(method, args.weight_decay, args.no_decay_norm_bias)
    optimizer = build_optimizer(groups, args)
    own_optimizers = method.own_optimizers() if method is not None else {}
    for own in own_optimizers.values():
        own.optimizer = own.make([p for p in own.module.parameters() if p.requires_grad], own.lr)
    autocast_dtype, scaler = _mixed_precision(args, device)

    train_module = step_module
    synchronised = []
    if ctx.distributed:
        # The modules with optimizers of their own are frozen while DDP is built, so DDP leaves their parameters
        # alone; buffers are broadcast by the Stepper (only those that must be equal), not by DDP.
        device_ids = [device.index] if device.type == 'cuda' else None
        own_modules = method.own_modules() if method is not None else []
        with contextlib.ExitStack() as stack:
            for module in own_modules:
                stack.enter_context(frozen(module))
            train_module = nn.parallel.DistributedDataParallel(step_module, device_ids=device_ids,
                                                               broadcast_buffers=False)
        synchronised = _synchronised_buffers(step_module, method)
    stepper = Stepper(train_module, step_module, teacher, optimizer, own_optimizers, method, args, ctx,
                      autocast_dtype, scaler, synchronised)
    return BuiltRun(student, teacher, method, step_module, train_module, optimizer, own_optimizers, stepper,
                    scaler, aux, describe_groups(optimizer))
