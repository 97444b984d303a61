"""The one training loop behind train_baseline.py, train_hwd.py, train_cwd.py and any new method.

A method plugs in through `run_training(args, method, build_distill)`:

- `method`: the short name used in file names (`hwd` -> `hwd_deeplabv3_resnet18_citys.pth`);
- `build_distill(nets)`: called once the networks exist (`nets.student`, `nets.teacher`,
  `nets.num_class`, `nets.device`, `nets.feature_channels(net)`); returns an `nn.Module` whose
  `forward(s_outputs, t_outputs, labels)` returns a dict {log name: weighted scalar loss}, e.g.
  `{'HWD Loss': 3.0 * hwd(s_outputs[0], t_outputs[0], labels)}`. The terms are added to the task loss
  and logged under their names. Parameters of that module (e.g. CWD's feature adapter) are trained
  with the student, synchronised by DDP and saved in the resume file. `None`: no distillation, no
  teacher (the baseline).

Scripts with teacher flags (`--teacher-model`, ...) get a frozen teacher in eval mode, run without
gradient. Everything else is here once: data, sampler, networks, SGD with poly learning rate, DDP,
logging, validation, checkpoints, resume, SIGTERM, the non-finite loss stop.
"""
import contextlib
import datetime
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

from utils.checkpointing import (BackgroundWriter, ResumeError, capture_rng_state, check_resume_matches,
                                 checkpoint_paths, checkpoint_stem, load_resume_state, make_resume_state,
                                 plain_state_dict, restore_rng_state)
from utils.distributed import broadcast_object, cleanup, init_distributed
from utils.errors import UserError, user_message
from utils.logger import setup_logger
from utils.options import student_names
from utils.samplers import IterationSampler

AUX_WEIGHT = 0.4
POLY_POWER = 0.9
LOGGER_NAME = 'semantic_segmentation'
# Exit status after a SIGTERM: the run is not finished (128 + signal number, as a shell reports it).
EXIT_TERMINATED = 128 + signal.SIGTERM


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite; nothing was saved after it."""


class TrainingTerminated(Exception):
    """SIGTERM received: the resume file was written and the run stopped."""

    def __init__(self, iteration, resume_path):
        super().__init__(f'stopped by SIGTERM after iteration {iteration}; resume file {resume_path}; '
                         'continue with --resume auto')
        self.iteration = iteration
        self.resume_path = resume_path


def poly_lr(base_lr, iteration, max_iterations, power=POLY_POWER):
    """lr of the 0-based iteration index: base_lr * (1 - i / max) ** power."""
    return base_lr * (1.0 - float(iteration) / max_iterations) ** power


def run_script(main, argv=None):
    """Top level of a script: UserError -> 'error: ...' on stderr, exit status 2; SIGTERM -> 143."""
    try:
        main(argv)
    except UserError as error:
        print(user_message(error), file=sys.stderr)
        return 2
    except TrainingTerminated as stop:
        print(str(stop), file=sys.stderr)
        return EXIT_TERMINATED
    return 0


# ---------------------------------------------------------------- networks

class Networks:
    """What a method's `build_distill` gets to see."""

    def __init__(self, student, teacher, num_class, device, args):
        self.student = student
        self.teacher = teacher
        self.num_class = num_class
        self.device = device
        self.args = args

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
    """Student + method in one module, so that DDP synchronises the gradients of both."""

    def __init__(self, student, distill, task_criterion, aux):
        super().__init__()
        self.student = student
        self.distill = distill
        self.task_criterion = task_criterion
        self.aux = aux

    def forward(self, images, labels, t_outputs=None):
        s_outputs = self.student(images)
        task = self.task_criterion(s_outputs[0], labels)
        if self.aux:
            task = task + AUX_WEIGHT * self.task_criterion(s_outputs[1], labels)
        terms = {'Task Loss': task}
        if self.distill is not None:
            terms.update(self.distill(s_outputs, t_outputs, labels))
        return terms


def _build_network(model, backbone, num_class, aux, norm_layer, pretrained, pretrained_base, local_rank):
    from models.model_zoo import get_segmentation_model
    return get_segmentation_model(model=model, backbone=backbone, num_class=num_class, aux=aux,
                                  norm_layer=norm_layer, pretrained=pretrained, pretrained_base=pretrained_base,
                                  local_rank=local_rank)


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
    """Sums the loss terms on the device and remembers the first iteration each became non-finite.

    Nothing leaves the device until `check`/`summary` (log, save and validation points), so the loop
    does not wait for the GPU every iteration.
    """

    NEVER = torch.iinfo(torch.int64).max

    def __init__(self, device):
        self.device = device
        self.names = None
        self.sums = None
        self.count = 0
        self.first_bad = None

    def add(self, terms, iteration):
        values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
        if self.names is None:
            self.names = list(terms.keys())
            self.sums = torch.zeros_like(values)
            self.first_bad = torch.full(values.shape, self.NEVER, dtype=torch.int64, device=values.device)
        bad = ~torch.isfinite(values)
        self.first_bad = torch.where(bad & (self.first_bad == self.NEVER),
                                     torch.full_like(self.first_bad, iteration), self.first_bad)
        self.sums += values
        self.count += 1

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
            names = [name for name, at in zip(self.names, first_bad) if at == worst]
            raise NonFiniteLossError(
                f'the loss became non-finite at iteration {worst} ({", ".join(names)}); training stopped and '
                'nothing was saved after it (the best checkpoint is untouched). Lower --lr, check the '
                'data and the method\'s flags, then restart or --resume from the last resume file.')

    def summary(self):
        """Mean of each term over the iterations since the last summary and over all processes."""
        sums = self.sums.clone()
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            world = dist.get_world_size()
        means = (sums / (max(self.count, 1) * world)).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.names, means))


# ---------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, args, method, build_distill, ctx):
        self.args = args
        self.method = method
        self.ctx = ctx
        self.device = ctx.device
        self.is_cuda = self.device.type == 'cuda'
        self.model_name, self.backbone, self.pretrained_base, self.pretrained = student_names(args)
        self.stem = checkpoint_stem(method, self.model_name, self.backbone, args.dataset)
        self.paths = checkpoint_paths(args.save_dir, self.stem)
        self.writer = BackgroundWriter()
        self.logger = setup_logger(LOGGER_NAME, args.log_dir, ctx.rank, filename=f'{self.stem}_log.txt')
        # A CPU group for the small control messages (stop flag, random states), apart from NCCL.
        self.cpu_group = None
        if ctx.distributed:
            self.cpu_group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD

        _seed_everything(args.seed)
        self._build_data()
        self._build_networks(build_distill)
        self.start_iteration = 0
        self.best_miou = 0.0
        self._resume()
        # Different augmentations per process; the student's initialisation (above) is the same everywhere
        # (DDP also broadcasts rank 0's weights).
        if not self._rng_restored:
            _seed_everything(args.seed + 1000003 * ctx.rank + self.start_iteration)
        self._build_loaders()

    # ---------------------------------------------------------------- set-up

    def _build_data(self):
        from dataset import build_dataset
        args = self.args
        self.train_set = build_dataset(args.dataset, 'train', data_root=args.data,
                                       max_iters=args.max_iterations * args.batch_size,
                                       crop_size=tuple(args.crop_size), scale=True, mirror=True,
                                       ignore_label=args.ignore_label)
        self.num_class = int(self.train_set.num_class)
        self.val_set = None
        if not args.skip_val:
            self.val_set = build_dataset(args.dataset, 'val', data_root=args.data, ignore_label=args.ignore_label)
        try:
            from dataset import DATASET_INFO
            self.class_names = list(DATASET_INFO[args.dataset].class_names)
        except Exception:
            self.class_names = [str(i) for i in range(self.num_class)]

    def _build_networks(self, build_distill):
        args, ctx = self.args, self.ctx
        # SyncBatchNorm exists for GPUs only; on the CPU each process keeps its own batch statistics.
        norm_layer = nn.SyncBatchNorm if (ctx.distributed and self.is_cuda) else nn.BatchNorm2d
        per_process = args.batch_size // ctx.world_size
        if per_process < 2 and norm_layer is nn.BatchNorm2d:
            # The pooled ASPP / PSP branches see one value per channel: BatchNorm cannot train on that.
            raise UserError(f'--batch-size {args.batch_size} over {ctx.world_size} process(es) leaves '
                            f'{per_process} image per process; unsynchronised BatchNorm (CPU or one process) '
                            f'needs at least 2: use --batch-size {2 * ctx.world_size} or more')
        self.aux = self.backbone.startswith('resnet')
        student = _build_network(self.model_name, self.backbone, self.num_class, self.aux, norm_layer,
                                 self.pretrained, self.pretrained_base, ctx.local_rank).to(self.device)
        teacher = None
        if hasattr(args, 'teacher_model'):
            teacher = _build_network(args.teacher_model, args.teacher_backbone, self.num_class, True,
                                     nn.BatchNorm2d, args.teacher_pretrained, 'None', ctx.local_rank)
            teacher = teacher.to(self.device).eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
        self.teacher = teacher
        self.student = student

        nets = Networks(student, teacher, self.num_class, self.device, args)
        distill = build_distill(nets) if build_distill is not None else None
        if distill is not None:
            distill = distill.to(self.device)
        self.distill = distill
        from losses import SegCrossEntropyLoss
        self.step_module = TrainStep(student, distill, SegCrossEntropyLoss(ignore_index=args.ignore_label), self.aux)
        self.optimizer = torch.optim.SGD(self.step_module.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        self.autocast_dtype = None
        self.scaler = None
        if args.amp and self.is_cuda:
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if self.autocast_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler('cuda')
        if ctx.distributed:
            device_ids = [self.device.index] if self.is_cuda else None
            self.train_module = nn.parallel.DistributedDataParallel(self.step_module, device_ids=device_ids)
        else:
            self.train_module = self.step_module

    def _resume(self):
        args, ctx = self.args, self.ctx
        self._rng_restored = False
        path = args.resume
        if path is None:
            return
        if path == 'auto':
            path = self.paths['resume']
            found = broadcast_object(os.path.isfile(path))
            if not found:
                self.logger.info(f'--resume auto: no resume file {path} yet; starting from iteration 0')
                return
        if not os.path.isfile(path):
            raise ResumeError(f'--resume {path}: the file is not visible on this process (rank {ctx.rank}); '
                              '--save-dir must be on a file system shared by all nodes')
        state = load_resume_state(path)
        check_resume_matches(state, path, self.method, self.model_name, self.backbone, args)
        try:
            self.student.load_state_dict(state['student'])
            if self.distill is not None:
                self.distill.load_state_dict(state['extra'])
            self.optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ResumeError(f'--resume {path} does not fit this run\'s networks: {error}')
        if self.scaler is not None and 'scaler' in state:
            self.scaler.load_state_dict(state['scaler'])
        self.start_iteration = int(state['iteration'])
        self.best_miou = float(state['best_miou'])
        rng = state.get('rng') or []
        if len(rng) == ctx.world_size:
            restore_rng_state(rng[ctx.rank])
            self._rng_restored = True
        self.logger.info(f'Resumed from {path}: iteration {self.start_iteration}/{args.max_iterations}, '
                         f'best mIoU {self.best_miou * 100:.3f}')

    def _build_loaders(self):
        args, ctx = self.args, self.ctx
        per_process = args.batch_size // ctx.world_size
        sampler = IterationSampler(len(self.train_set), args.max_iterations, args.batch_size, rank=ctx.rank,
                                   world_size=ctx.world_size, seed=args.seed, start_iteration=self.start_iteration)
        generator = torch.Generator()
        generator.manual_seed(args.seed * 7919 + ctx.rank * 104729 + self.start_iteration)
        self.train_loader = DataLoader(self.train_set, batch_size=per_process, sampler=sampler,
                                       num_workers=args.workers, pin_memory=self.is_cuda, drop_last=False,
                                       worker_init_fn=_seed_worker, generator=generator)
        self.val_loader = None
        if self.val_set is not None:
            from utils.evaluation import ShardSampler
            self.val_loader = DataLoader(self.val_set, batch_size=1, sampler=ShardSampler(self.val_set),
                                         num_workers=args.workers, pin_memory=self.is_cuda)

    # ---------------------------------------------------------------- saving

    def _gather_rng(self):
        state = capture_rng_state()
        if not self.ctx.distributed:
            return [state]
        states = [None] * self.ctx.world_size
        dist.all_gather_object(states, state, group=self.cpu_group)
        return states

    def _save(self, iteration, is_best, wait=False):
        """Latest (and best) student weights and the resume file, written by rank 0 in the background.

        All processes take part (their random states are gathered). The state is copied here, at the
        end of `iteration`, so training can go on while the files are written.
        """
        rng = self._gather_rng()
        if self.ctx.is_main:
            weights = plain_state_dict(self.student)
            files = [(weights, self.paths['latest'])]
            if is_best:
                files.append((weights, self.paths['best']))
            state = make_resume_state(self.method, iteration, weights, self.distill, self.optimizer,
                                      self.best_miou, rng, self.args, self.scaler)
            files.append((state, self.paths['resume']))
            self.writer.submit(files)
            if wait:
                self.writer.wait()

    # ---------------------------------------------------------------- validation

    def _validate(self, iteration):
        from utils.evaluation import evaluate
        from utils.metric import format_iou_table, format_summary
        self.logger.info(f'Start validation at iteration {iteration}, total samples: {len(self.val_set)}')
        matrix = evaluate(self.student, self.val_loader, self.num_class, self.device)
        self.student.train()
        pix_acc, miou, iou = matrix.compute()
        self.logger.info(format_summary(pix_acc, miou))
        self.logger.info('Per-class IoU:\n' + format_iou_table(iou, self.class_names))
        is_best = not math.isnan(miou) and miou > self.best_miou
        if is_best:
            self.best_miou = miou
            self.logger.info('New best validation mIoU: {:.3f}'.format(miou * 100))
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
        self.logger.info(f'Using {ctx.world_size} process(es) on {self.device}; '
                         f'{args.batch_size // ctx.world_size} images per process')
        self.logger.info(args)
        if args.amp and not self.is_cuda:
            self.logger.info('--amp is for GPUs; training in float32 on the CPU')
        self.logger.info(f'Start training, Total Iterations {max_iterations:d}'
                         + (f', from iteration {self.start_iteration + 1}' if self.start_iteration else ''))
        meter = LossMeter(self.device)
        stop = StopSignal(self.cpu_group, ctx.distributed)
        progress = None
        redirect = contextlib.nullcontext()
        if ctx.is_main and sys.stdout.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            progress = tqdm(total=max_iterations, initial=self.start_iteration, dynamic_ncols=True, leave=False)
            redirect = logging_redirect_tqdm(loggers=[self.logger])  # log lines above the bar, not through it
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
            self.logger.info(f'Nothing to do: the resume file is already at iteration {max_iterations}')
        total = time.time() - start_time
        done = max(max_iterations - self.start_iteration, 1)
        self.logger.info(f'Total training time: {datetime.timedelta(seconds=int(total))} ({total / done:.4f}s / it)')
        if not args.skip_val:
            self.logger.info('Best validation mIoU: {:.3f}'.format(self.best_miou * 100))
        return self.student

    def _iterate(self, meter, stop, progress, start_time):
        max_iterations = self.args.max_iterations
        iteration = self.start_iteration
        for iteration, (images, labels, _) in enumerate(self.train_loader, start=self.start_iteration + 1):
            if stop.poll():
                meter.check()
                self._save(iteration - 1, is_best=False, wait=True)
                self.logger.info(f'SIGTERM: saved the resume file at iteration {iteration - 1}; '
                                 'stopping (continue with --resume auto)')
                raise TrainingTerminated(iteration - 1, self.paths['resume'])
            self._step(images, labels, iteration, meter)
            if progress is not None:
                progress.update(1)
            self._after_step(iteration, meter, start_time)
        if iteration != max_iterations:
            raise UserError(f'the training set gave {iteration - self.start_iteration} batches instead of '
                            f'{max_iterations - self.start_iteration}: the data set did not honour max_iters')

    def _step(self, images, labels, iteration, meter):
        lr = poly_lr(self.args.lr, iteration - 1, self.args.max_iterations)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True).long()
        with self._autocast():
            t_outputs = None
            if self.teacher is not None:
                with torch.inference_mode():  # frozen teacher: no autograd bookkeeping at all
                    t_outputs = self.teacher(images)
            terms = self.train_module(images, labels, t_outputs)
            loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        meter.add(terms, iteration)

    def _after_step(self, iteration, meter, start_time):
        args = self.args
        last = iteration == args.max_iterations
        log_now = iteration % args.log_iter == 0 or last
        at_val = iteration % args.val_per_iters == 0
        save_now = iteration % args.save_per_iters == 0 or at_val or last
        if log_now or save_now:
            meter.check()  # before anything is written, so no checkpoint ever holds a diverged network
        if log_now:
            means = meter.summary()
            if self.ctx.is_main:
                self.logger.info(self._log_line(iteration, means, start_time, iteration - self.start_iteration))
        if not save_now:
            return
        is_best = False
        if at_val and not args.skip_val:
            is_best = self._validate(iteration)
        self._save(iteration, is_best)


# ---------------------------------------------------------------- helpers

def _seed_everything(seed):
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _seed_worker(worker_id):
    # torch seeds each worker from the loader's generator; numpy and random follow that seed.
    import random
    import numpy as np
    seed = torch.initial_seed() % (2 ** 32)
    np.random.seed(seed)
    random.seed(seed)


def run_training(args, method, build_distill=None):
    """Set up the processes, train, clean up; returns the trained student (unwrapped) of this process."""
    ctx = init_distributed(args)
    try:
        trainer = Trainer(args, method, build_distill, ctx)
        return trainer.train()
    finally:
        cleanup()
