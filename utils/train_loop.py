"""The one training loop behind every training script.

A method plugs in through `run_training(args, method, build_method)`:

- `method`: the short name used in file names (`hwd` -> `hwd_deeplabv3_resnet18_citys.pth`);
- `build_method(nets)`: called once the networks exist (`nets.student`, `nets.teacher`, `nets.num_class`,
  `nets.device`, `nets.norm_layer`, `nets.feature_channels(net)`); returns a
  `utils.method.DistillationMethod` (its docstring is the contract: loss terms, modules trained with the
  student, optimizers of its own, buffers, random generators). `None`: no distillation, no teacher.

Scripts with teacher flags (`--teacher-model`, ...) get a frozen teacher in eval mode, run without
gradient. Everything else is here once: data, sampler, networks, SGD with poly learning rate, gradient
accumulation, DDP, logging, validation (with a check of the teacher), checkpoints, exact resume, SIGTERM,
the non-finite loss stop.

Every random draw is seeded from `--seed` and its place in the run (`utils.seeding`): the samples' draws
by the sampler, and before every micro-batch torch's global generator (dropout) and the method's
generators. A resumed run therefore repeats, bit for bit on the CPU, what the uninterrupted run computes.
"""
import contextlib
import datetime
import logging
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from dataset import build_dataset, dataset_info
from losses import SegCrossEntropyLoss
from models.model_zoo import get_segmentation_model
from utils.checkpointing import (
    RESUME_FORMAT,
    BackgroundWriter,
    ResumeError,
    check_resume_matches,
    checkpoint_paths,
    checkpoint_stem,
    cpu_copy,
    flags_for_resume,
    load_resume_state,
    plain_state_dict,
)
from utils.distributed import average_gradients, broadcast_object, cleanup, init_distributed
from utils.errors import StopCommand, UserError
from utils.evaluation import ShardSampler, evaluate
from utils.logger import setup_logging
from utils.metric import format_iou_table, format_summary
from utils.options import student_names
from utils.results import FLAGS_SUFFIX, HISTORY_SUFFIX, metrics_record, read_history, write_history, write_json
from utils.samplers import IterationSampler
from utils.seeding import derive_seed, step_seed

logger = logging.getLogger(__name__)

AUX_WEIGHT = 0.4
POLY_POWER = 0.9
# Exit status after a SIGTERM: the run is not finished (128 + signal number, as a shell reports it).
EXIT_TERMINATED = 128 + signal.SIGTERM
# Stream of torch's global generator (dropout) in utils.seeding.step_seed.
DROPOUT_STREAM = 'torch'


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite; nothing was saved after it."""


class TrainingTerminated(StopCommand):
    """SIGTERM received: the resume file was written and the run stopped."""

    exit_status = EXIT_TERMINATED

    def __init__(self, iteration, resume_path):
        super().__init__(f'stopped by SIGTERM after iteration {iteration}; resume file {resume_path}; '
                         'continue with --resume auto')
        self.iteration = iteration
        self.resume_path = resume_path


def poly_lr(base_lr, iteration, max_iterations, power=POLY_POWER):
    """lr of the 0-based iteration index: base_lr * (1 - i / max) ** power."""
    return base_lr * (1.0 - float(iteration) / max_iterations) ** power


# ---------------------------------------------------------------- networks

class Networks:
    """What a method's `build_method` gets to see."""

    def __init__(self, student, teacher, num_class, device, norm_layer):
        self.student = student
        self.teacher = teacher
        self.num_class = num_class
        self.device = device
        # The student's BatchNorm (SyncBatchNorm in distributed GPU runs): modules a method trains with the
        # student use the same, as the original's feature adapters and heads do.
        self.norm_layer = norm_layer

    @torch.no_grad()
    def feature_channels(self, net):
        """Channels of the network's `features` output (its last output), from one tiny forward pass."""
        was_training = net.training
        net.eval()
        probe = torch.zeros(1, 3, 64, 64, device=self.device)
        channels = net(probe)[-1].shape[1]
        net.train(was_training)
        return int(channels)


class TrainStep(nn.Module):
    """Student + method in one module, so that DDP synchronises the gradients of both.
    Returns the loss terms and the student's outputs."""

    def __init__(self, student, method, task_criterion, aux):
        super().__init__()
        self.student = student
        self.method = method
        self.task_criterion = task_criterion
        self.aux = aux

    def forward(self, images, labels, t_outputs=None):
        s_outputs = self.student(images)
        task = self.task_criterion(s_outputs[0], labels)
        if self.aux:
            task = task + AUX_WEIGHT * self.task_criterion(s_outputs[1], labels)
        terms = {'Task Loss': task}
        if self.method is not None:
            terms.update(self.method(s_outputs, t_outputs, labels))
        return terms, s_outputs


# ---------------------------------------------------------------- SIGTERM, agreed by all processes

class StopSignal:
    """Sets a flag on SIGTERM; `poll()` tells every process the same answer at the same iteration.

    With several processes the flags are combined by an all-reduce (MAX) on a CPU gloo group, started
    at one poll and read at the next, so the loop never waits for it and never syncs the GPU.
    """

    def __init__(self, group=None, distributed=False):
        self.requested = False
        self.group = group
        self.distributed = distributed
        self._pending = None
        self._buffer = None
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def poll(self):
        if not self.distributed:
            return self.requested
        agreed = False
        if self._pending is not None:
            self._pending.wait()
            agreed = bool(self._buffer.item())
        self._buffer = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self):
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------- loss bookkeeping without per-iteration sync

class LossMeter:
    """Sums the loss terms on the device per window ('log': since the last log line, 'val': since the last
    validation) and remembers the first iteration each term became non-finite.

    Nothing leaves the device until `check`/`summary` (log, save and validation points), so the loop
    does not wait for the GPU every iteration.
    """

    NEVER = torch.iinfo(torch.int64).max
    WINDOWS = ('log', 'val')

    def __init__(self, device):
        self.device = device
        self.names = None
        self.sums = {}
        self.counts = dict.fromkeys(self.WINDOWS, 0)
        self.first_bad = None

    def add(self, terms, iteration):
        values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
        if self.names is None:
            self.names = list(terms.keys())
            self.sums = {window: torch.zeros_like(values) for window in self.WINDOWS}
            self.first_bad = torch.full(values.shape, self.NEVER, dtype=torch.int64, device=values.device)
        bad = ~torch.isfinite(values)
        self.first_bad = torch.where(bad & (self.first_bad == self.NEVER),
                                     torch.full_like(self.first_bad, iteration), self.first_bad)
        for window in self.WINDOWS:
            self.sums[window] += values
            self.counts[window] += 1

    def check(self):
        """Raise NonFiniteLossError (on every process alike) if any term was NaN/inf on any process."""
        if self.first_bad is None:
            return
        first_bad = self.first_bad.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        first_bad = first_bad.tolist()
        worst = min(first_bad)
        if worst != self.NEVER:
            names = [name for name, at in zip(self.names, first_bad, strict=True) if at == worst]
            raise NonFiniteLossError(
                f'the loss became non-finite at iteration {worst} ({", ".join(names)}); training stopped and '
                'nothing was saved after it (the best checkpoint is untouched). Lower --lr, check the '
                'data and the method\'s flags, then restart or --resume from the last resume file.')

    def summary(self, window='log'):
        """Mean of each term over the window's iterations and over all processes; resets the window."""
        if self.names is None:
            return {}
        sums = self.sums[window].clone()
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            world = dist.get_world_size()
        means = (sums / (max(self.counts[window], 1) * world)).tolist()
        self.sums[window].zero_()
        self.counts[window] = 0
        return dict(zip(self.names, means, strict=True))


def _detach(outputs):
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outputs]


def _chunks(iterable, size):
    """Consecutive lists of `size` items (the micro-batches of one iteration)."""
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, args, method_name, build_method, ctx):
        self.args = args
        self.method_name = method_name
        self.ctx = ctx
        self.device = ctx.device
        self.is_cuda = self.device.type == 'cuda'
        self.model_name, self.backbone, self.pretrained_base, self.pretrained = student_names(args)
        self.stem = checkpoint_stem(method_name, self.model_name, self.backbone, args.dataset)
        self.paths = checkpoint_paths(args.save_dir, self.stem)
        self.writer = BackgroundWriter()
        setup_logging(args.log_dir, ctx.rank, filename=f'{self.stem}_log.txt')
        # A CPU group for the small control messages (the stop flag), apart from NCCL.
        self.cpu_group = None
        if ctx.distributed:
            self.cpu_group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD

        # The same initial weights (and method state) on every process, a function of --seed only.
        torch.manual_seed(derive_seed(args.seed, 'init'))
        self._build_data()
        self._build_networks(build_method)
        self.start_iteration = 0
        self.best_miou = 0.0
        self.teacher_metrics = None
        self.history = []
        self._resume()
        self._build_loaders()

    # ---------------------------------------------------------------- set-up

    def _build_data(self):
        args = self.args
        self.train_set = build_dataset(args.dataset, 'train', data_root=args.data,
                                       max_iters=args.max_iterations * args.batch_size,
                                       crop_size=tuple(args.crop_size), scale=True, mirror=True,
                                       ignore_label=args.ignore_label)
        info = dataset_info(args.dataset, args.data)
        self.num_class = info.num_class
        self.class_names = list(info.class_names)
        self.val_set = None
        if not args.skip_val:
            self.val_set = build_dataset(args.dataset, 'val', data_root=args.data, ignore_label=args.ignore_label)

    def _build_networks(self, build_method):
        args, ctx = self.args, self.ctx
        # SyncBatchNorm exists for GPUs only; on the CPU each process keeps its own batch statistics.
        norm_layer = nn.SyncBatchNorm if (ctx.distributed and self.is_cuda) else nn.BatchNorm2d
        micro_batch = args.batch_size // (ctx.world_size * args.grad_accum)
        if micro_batch < 2 and norm_layer is nn.BatchNorm2d:
            # The pooled ASPP / PSP branches see one value per channel: BatchNorm cannot train on that.
            raise UserError(f'--batch-size {args.batch_size} over {ctx.world_size} process(es) and --grad-accum '
                            f'{args.grad_accum} leaves {micro_batch} image per micro-batch; unsynchronised BatchNorm '
                            f'(CPU or one process) needs at least 2: use --batch-size '
                            f'{2 * ctx.world_size * args.grad_accum} or more, or a smaller --grad-accum')
        self.aux = self.backbone.startswith('resnet')
        student = get_segmentation_model(self.model_name, self.backbone, self.num_class, self.aux, norm_layer,
                                         self.pretrained, self.pretrained_base).to(self.device)
        teacher = None
        if hasattr(args, 'teacher_model'):
            teacher = get_segmentation_model(args.teacher_model, args.teacher_backbone, self.num_class, True,
                                             nn.BatchNorm2d, args.teacher_pretrained, 'None')
            teacher = teacher.to(self.device).eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
        self.teacher = teacher
        self.student = student

        nets = Networks(student, teacher, self.num_class, self.device, norm_layer)
        method = build_method(nets) if build_method is not None else None
        if method is not None:
            method = method.to(self.device)
        self.method = method
        self.logged_only = set(method.logged_only) if method is not None else set()
        self.step_module = TrainStep(student, method, SegCrossEntropyLoss(ignore_index=args.ignore_label), self.aux)
        groups = [{'params': list(student.parameters())}]
        if method is not None and method.student_parameters():
            groups.append({'params': method.student_parameters()})  # one group, as the original
        self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        self.own_optimizers = method.own_optimizers() if method is not None else {}
        for own in self.own_optimizers.values():
            own.optimizer = own.make([p for p in own.module.parameters() if p.requires_grad], own.lr)
        self.autocast_dtype = None
        self.scaler = None
        if args.amp and self.is_cuda:
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if self.autocast_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler('cuda')
        if ctx.distributed:
            if method is not None:
                ignored = ['method.' + name for name in method.unsynchronised_names()]
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.step_module, ignored)
            device_ids = [self.device.index] if self.is_cuda else None
            self.train_module = nn.parallel.DistributedDataParallel(self.step_module, device_ids=device_ids)
        else:
            self.train_module = self.step_module

    def _resume(self):
        args, ctx = self.args, self.ctx
        path = args.resume
        if path is None:
            return
        if path == 'auto':
            path = self.paths['resume']
            found = broadcast_object(os.path.isfile(path))
            if not found:
                logger.info(f'--resume auto: no resume file {path} yet; starting from iteration 0')
                return
        if not os.path.isfile(path):
            raise ResumeError(f'--resume {path}: the file is not visible on this process (rank {ctx.rank}); '
                              '--save-dir must be on a file system shared by all nodes')
        state = load_resume_state(path)
        check_resume_matches(state, path, self.method_name, args)
        try:
            self.student.load_state_dict(state['student'])
            if self.method is not None:
                self.method.load_state_dict(state['method_state'])
                self.method.load_generator_states(state['generators'])
            self.optimizer.load_state_dict(state['optimizer'])
            for name, own in self.own_optimizers.items():
                own.optimizer.load_state_dict(state['own_optimizers'][name])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ResumeError(f'--resume {path} does not fit this run\'s networks: {error}') from None
        if self.scaler is not None and 'scaler' in state:
            self.scaler.load_state_dict(state['scaler'])
        self.start_iteration = int(state['iteration'])
        self.best_miou = float(state['best_miou'])
        self.teacher_metrics = state.get('teacher_metrics')
        saved_world = state.get('world_size')
        if saved_world is not None and saved_world != ctx.world_size:
            logger.warning(f'the resume file was written by {saved_world} process(es) and this run has '
                           f'{ctx.world_size}: the samples are the same, but BatchNorm statistics and summation '
                           'order differ, so the run will not repeat the uninterrupted one exactly')
        logger.info(f'Resumed from {path}: iteration {self.start_iteration}/{args.max_iterations}, '
                    f'best mIoU {self.best_miou * 100:.3f}')

    def _build_loaders(self):
        args, ctx = self.args, self.ctx
        micro_batch = args.batch_size // (ctx.world_size * args.grad_accum)
        sampler = IterationSampler(len(self.train_set), args.max_iterations, args.batch_size, rank=ctx.rank,
                                   world_size=ctx.world_size, seed=args.seed, start_iteration=self.start_iteration)
        self.train_loader = DataLoader(self.train_set, batch_size=micro_batch, sampler=sampler,
                                       num_workers=args.workers, pin_memory=self.is_cuda, drop_last=False)
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = DataLoader(self.val_set, batch_size=1, sampler=ShardSampler(self.val_set),
                                         num_workers=args.workers, pin_memory=self.is_cuda)

    # ---------------------------------------------------------------- records and saving

    def _json_dirs(self):
        """Folders of the flags and history files: the log folder and, when it differs, the save folder."""
        folders = [self.args.log_dir]
        if os.path.abspath(self.args.save_dir) != os.path.abspath(self.args.log_dir):
            folders.append(self.args.save_dir)
        return folders

    def _write_flags(self):
        record = {'method': self.method_name, 'model': self.model_name, 'backbone': self.backbone,
                  'dataset': self.args.dataset, 'seed': self.args.seed, 'world_size': self.ctx.world_size,
                  'flags': flags_for_resume(self.args)}
        for folder in self._json_dirs():
            write_json(os.path.join(folder, self.stem + FLAGS_SUFFIX), record)

    def _load_history(self):
        """The validation history of this run up to the start iteration (later records belong to a part of
        the run that is being repeated)."""
        path = os.path.join(self.args.log_dir, self.stem + HISTORY_SUFFIX)
        records = read_history(path) if self.start_iteration else []
        return [r for r in records if r.get('iteration', 0) <= self.start_iteration]

    def _write_history(self):
        for folder in self._json_dirs():
            write_history(os.path.join(folder, self.stem + HISTORY_SUFFIX), self.history)

    def _save(self, iteration, is_best, wait=False):
        """Latest (and best) student weights and the resume file, written by rank 0 in the background.

        The state is copied here, at the end of `iteration`, so training can go on while the files are
        written. State that differs between processes is not saved: every random stream is re-seeded from
        --seed and the iteration, and the method's buffers are equal on every process by construction.
        """
        if not self.ctx.is_main:
            return
        weights = plain_state_dict(self.student)
        files = [(weights, self.paths['latest'])]
        if is_best:
            files.append((weights, self.paths['best']))
        state = {
            'format': RESUME_FORMAT,
            'method': self.method_name,
            'iteration': int(iteration),
            'max_iterations': int(self.args.max_iterations),
            'world_size': self.ctx.world_size,
            'best_miou': float(self.best_miou),
            'teacher_metrics': self.teacher_metrics,
            'student': weights,
            'method_state': {},
            'optimizer': cpu_copy(self.optimizer.state_dict()),
            'own_optimizers': {name: cpu_copy(own.optimizer.state_dict()) for name, own in self.own_optimizers.items()},
            'generators': {},
            'args': flags_for_resume(self.args),
        }
        if self.method is not None:
            state['method_state'] = plain_state_dict(self.method)
            state['generators'] = cpu_copy(self.method.generator_states())
        if self.scaler is not None:
            state['scaler'] = cpu_copy(self.scaler.state_dict())
        files.append((state, self.paths['resume']))
        self.writer.submit(files)
        if wait:
            self.writer.wait()

    # ---------------------------------------------------------------- validation

    def _evaluate(self, net):
        matrix = evaluate(net, self.val_loader, self.num_class, self.device)
        return matrix.compute() + (matrix,)

    def _check_teacher(self, student_miou):
        """Evaluate the teacher once (first validation of a distillation run) and warn when it is near chance
        or below the student: an untrained teacher or a file saved from another run."""
        if self.teacher_metrics is None:
            logger.info('Evaluating the teacher once on the validation set')
            pix_acc, miou, _, matrix = self._evaluate(self.teacher)
            counts = matrix.mat.sum(dim=1).double()
            present = int((counts > 0).sum())
            # mIoU of predicting the most frequent class everywhere, the floor any trained network must clear
            constant = float(counts.max() / counts.sum()) / max(present, 1) if counts.sum() > 0 else 0.0
            chance = max(2 * constant, 1 / self.num_class)
            self.teacher_metrics = {'pixAcc': pix_acc, 'mIoU': miou, 'chance_mIoU': chance,
                                    'warned_below_student': False}
            logger.info('Teacher validation pixAcc: {:.3f}, mIoU: {:.3f}'.format(pix_acc * 100, miou * 100))
            if not math.isnan(miou) and miou < self.teacher_metrics['chance_mIoU']:
                logger.warning('the teacher scores near chance (mIoU {:.3f}, below {:.3f}): is --teacher-pretrained '
                               'a trained network for this data set?'.format(miou * 100,
                                                                            self.teacher_metrics['chance_mIoU'] * 100))
        metrics = self.teacher_metrics
        if not metrics['warned_below_student'] and student_miou > metrics['mIoU']:
            metrics['warned_below_student'] = True
            logger.warning('the student (mIoU {:.3f}) scores above its teacher (mIoU {:.3f}): check '
                           '--teacher-pretrained'.format(student_miou * 100, metrics['mIoU'] * 100))

    def _validate(self, iteration, meter):
        logger.info(f'Start validation at iteration {iteration}, total samples: {len(self.val_set)}')
        pix_acc, miou, iou, _ = self._evaluate(self.student)
        logger.info(format_summary(pix_acc, miou))
        logger.info('Per-class IoU:\n' + format_iou_table(iou, self.class_names))
        record = {'iteration': iteration, **metrics_record(pix_acc, miou, iou, self.class_names),
                  'losses': {name: round(value, 6) for name, value in meter.summary('val').items()}}
        if self.teacher is not None:
            first = self.teacher_metrics is None
            self._check_teacher(miou)
            if first:
                record['teacher'] = {'pixAcc': round(self.teacher_metrics['pixAcc'] * 100, 6),
                                     'mIoU': round(self.teacher_metrics['mIoU'] * 100, 6)}
        is_best = not math.isnan(miou) and miou > self.best_miou
        if is_best:
            self.best_miou = miou
            logger.info('New best validation mIoU: {:.3f}'.format(miou * 100))
        if self.ctx.is_main:
            self.history.append(record)
            self._write_history()
        return is_best

    # ---------------------------------------------------------------- training

    def _log_line(self, iteration, means, start_time, done):
        elapsed = time.time() - start_time
        eta = elapsed / max(done, 1) * (self.args.max_iterations - iteration)
        parts = [f'Iters: {iteration:d}/{self.args.max_iterations:d}',
                 f"Lr: {self.optimizer.param_groups[0]['lr']:.6f}"]
        parts += [f'{name}: {value:.4f}' for name, value in means.items()]
        parts += [f'Cost Time: {datetime.timedelta(seconds=int(elapsed))}',
                  f'Estimated Time: {datetime.timedelta(seconds=int(eta))}']
        return ' || '.join(parts)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast('cuda', dtype=self.autocast_dtype)

    def train(self):
        args, ctx = self.args, self.ctx
        max_iterations = args.max_iterations
        logger.info(f'Using {ctx.world_size} process(es) on {self.device}; {args.batch_size // ctx.world_size} '
                    f'images per process' + (f' in {args.grad_accum} micro-batches' if args.grad_accum > 1 else ''))
        logger.info(args)
        if args.amp and not self.is_cuda:
            logger.info('--amp is for GPUs; training in float32 on the CPU')
        if ctx.is_main:
            self._write_flags()
            self.history = self._load_history()
        logger.info(f'Start training, Total Iterations {max_iterations:d}'
                    + (f', from iteration {self.start_iteration + 1}' if self.start_iteration else ''))
        meter = LossMeter(self.device)
        stop = StopSignal(self.cpu_group, ctx.distributed)
        progress = None
        redirect = contextlib.nullcontext()
        if ctx.is_main and sys.stdout.isatty():
            from tqdm import tqdm  # only on a terminal
            from tqdm.contrib.logging import logging_redirect_tqdm
            progress = tqdm(total=max_iterations, initial=self.start_iteration, dynamic_ncols=True, leave=False)
            redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])  # log lines above the bar
        self.train_module.train()
        start_time = time.time()
        try:
            with redirect:
                self._iterate(meter, stop, progress, start_time)
        except BaseException:
            # Files already submitted are finished even when the run stops with an error (they were
            # checked before submission); the first error is the one reported.
            self.writer.wait(quiet=True)
            raise
        finally:
            stop.close()
            if progress is not None:
                progress.close()
        self.writer.wait()
        if self.start_iteration == max_iterations:
            logger.info(f'Nothing to do: the resume file is already at iteration {max_iterations}')
        total = time.time() - start_time
        done = max(max_iterations - self.start_iteration, 1)
        logger.info(f'Total training time: {datetime.timedelta(seconds=int(total))} ({total / done:.4f}s / it)')
        if not args.skip_val:
            logger.info('Best validation mIoU: {:.3f}'.format(self.best_miou * 100))
        return self.student

    def _iterate(self, meter, stop, progress, start_time):
        max_iterations = self.args.max_iterations
        iteration = self.start_iteration
        batches = _chunks(self.train_loader, self.args.grad_accum)
        for iteration, micro_batches in enumerate(batches, start=self.start_iteration + 1):
            if stop.poll():
                meter.check()
                self._save(iteration - 1, is_best=False, wait=True)
                logger.info(f'SIGTERM: saved the resume file at iteration {iteration - 1}; '
                            'stopping (continue with --resume auto)')
                raise TrainingTerminated(iteration - 1, self.paths['resume'])
            self._step(micro_batches, iteration, meter)
            if progress is not None:
                progress.update(1)
            self._after_step(iteration, meter, start_time)
        if iteration != max_iterations:
            raise UserError(f'the training set gave {iteration - self.start_iteration} batches instead of '
                            f'{max_iterations - self.start_iteration}: the data set did not honour max_iters')

    def _seed_micro_batch(self, iteration, position):
        """Seed dropout and the method's generators for micro-batch `position` (of this process) of the
        iteration: its place in the global batch decides, not the process that runs it."""
        args = self.args
        place = self.ctx.rank * args.grad_accum + position
        torch.manual_seed(step_seed(args.seed, DROPOUT_STREAM, iteration, place))
        if self.method is not None:
            for name, (generator, shared) in self.method.generators().items():
                generator.manual_seed(step_seed(args.seed, name, iteration, position if shared else place))

    def _step(self, micro_batches, iteration, meter):
        args = self.args
        count = len(micro_batches)
        lr = poly_lr(args.lr, iteration - 1, args.max_iterations)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        self.optimizer.zero_grad(set_to_none=True)
        kept = []
        totals = {}
        for position, (images, labels, _) in enumerate(micro_batches):
            self._seed_micro_batch(iteration, position)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True).long()
            last = position == count - 1
            # Gradients are all-reduced once, in the backward pass of the last micro-batch.
            sync = contextlib.nullcontext() if last or not self.ctx.distributed else self.train_module.no_sync()
            with sync:
                with self._autocast():
                    t_outputs = None
                    if self.teacher is not None:
                        with torch.no_grad():  # frozen teacher; its outputs may be saved for backward
                            t_outputs = self.teacher(images)
                    terms, s_outputs = self.train_module(images, labels, t_outputs)
                    loss = sum(value for name, value in terms.items() if name not in self.logged_only)
                    if count > 1:
                        loss = loss / count
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            for name, value in terms.items():
                value = value.detach() / count
                totals[name] = totals[name] + value if name in totals else value
            if self.own_optimizers:
                kept.append((_detach(s_outputs), t_outputs, labels))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        for name, own in self.own_optimizers.items():
            totals.update(self._own_step(name, own, kept, iteration))
        meter.add(totals, iteration)

    def _own_step(self, name, own, kept, iteration):
        """One step of a method's own optimizer on the detached outputs of the iteration's micro-batches."""
        lr = poly_lr(own.lr, iteration - 1, self.args.max_iterations)
        for group in own.optimizer.param_groups:
            group['lr'] = lr
        own.optimizer.zero_grad(set_to_none=True)
        logged = {}
        for s_outputs, t_outputs, labels in kept:
            loss, values = self.method.own_loss(name, s_outputs, t_outputs, labels)
            (loss / len(kept)).backward()
            for key, value in values.items():
                value = value.detach() / len(kept)
                logged[key] = logged[key] + value if key in logged else value
        average_gradients(own.module.parameters())
        own.optimizer.step()
        return logged

    def _after_step(self, iteration, meter, start_time):
        args = self.args
        last = iteration == args.max_iterations
        log_now = iteration % args.log_iter == 0 or last
        at_val = iteration % args.val_per_iters == 0
        save_now = iteration % args.save_per_iters == 0 or at_val or last
        if log_now or save_now:
            meter.check()  # before anything is written, so no checkpoint ever holds a diverged network
        if log_now:
            means = meter.summary('log')
            if self.ctx.is_main:
                logger.info(self._log_line(iteration, means, start_time, iteration - self.start_iteration))
        if not save_now:
            return
        is_best = False
        if at_val and not args.skip_val:
            is_best = self._validate(iteration, meter)
        self._save(iteration, is_best)


def run_training(args, method_name, build_method=None):
    """Set up the processes, train, clean up; returns the trained student (unwrapped) of this process."""
    ctx = init_distributed(args)
    try:
        trainer = Trainer(args, method_name, build_method, ctx)
        return trainer.train()
    finally:
        cleanup()
