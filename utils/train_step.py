"""One training iteration, apart from everything around it (set-up, logging, saving, validation).

- `TrainStep`: the student and the method in one module (so that DDP synchronises the gradients of both): the
  task loss (+0.4 x the aux head's), the method's terms, the student's outputs;
- `Stepper.step(micro_batches, iteration)`: the poly learning rate, the micro-batches of the iteration (each
  seeded from `--seed`, the iteration and its place in the global batch), one backward each with the
  gradients all-reduced once, the method's gradient clipping, the optimizer step (with the fp16 loss scaler
  under `--amp`), then the method's own optimizers on the iteration's detached outputs. It returns the loss
  terms (still on the device) and is what `bench/bench_train.py` times against the whole loop;
- `LossMeter`: the terms summed on the device between log / validation points, with the first non-finite
  iteration remembered, so the loop never waits for the GPU in between.
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.distributed import average_gradients, broadcast_tensors
from utils.errors import UserError
from utils.optim import poly_lr, set_learning_rate
from utils.seeding import step_seed

AUX_WEIGHT = 0.4
# Stream of torch's global generator (dropout, drop-path) in utils.seeding.step_seed.
DROPOUT_STREAM = 'torch'


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite; nothing was saved after it."""


class TrainStep(nn.Module):
    """Student + method in one module. `forward(images, labels, t_outputs)` -> (loss terms, student outputs)."""

    def __init__(self, student, method, task_criterion, aux, return_stages=False):
        super().__init__()
        self.student = student
        self.method = method
        self.task_criterion = task_criterion
        self.aux = aux
        self.return_stages = return_stages

    def forward(self, images, labels, t_outputs=None):
        s_outputs = self.student(images, return_stages=self.return_stages)
        task = self.task_criterion(s_outputs.logits, labels)
        if self.aux:
            task = task + AUX_WEIGHT * self.task_criterion(s_outputs.aux, labels)
        terms = {'Task Loss': task}
        if self.method is not None:
            terms.update(self.method(s_outputs, t_outputs, labels))
        return terms, s_outputs


class Stepper:
    """Runs iterations of a built run (see the module docstring).

    `train_module`: the TrainStep, or DDP around it; `synchronised_buffers`: the buffers every process must hold
    alike (BatchNorm statistics), broadcast from process 0 before every forward as DDP would (DDP itself is
    told not to, so that a method's memories, equal on every process by construction, are never sent).
    """

    def __init__(self, train_module, step_module, teacher, optimizer, own_optimizers, method, args, ctx,
                 autocast_dtype=None, scaler=None, synchronised_buffers=()):
        self.train_module = train_module
        self.step_module = step_module
        self.teacher = teacher
        self.optimizer = optimizer
        self.own_optimizers = own_optimizers
        self.method = method
        self.args = args
        self.ctx = ctx
        self.device = ctx.device
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.synchronised_buffers = list(synchronised_buffers)
        self.logged_only = set(method.logged_only) if method is not None else set()
        self.return_stages = step_module.return_stages

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def seed_micro_batch(self, iteration, position):
        """Seed dropout and the method's generators for micro-batch `position` (of this process) of the
        iteration: its place in the global batch decides, not the process that runs it."""
        args = self.args
        place = self.ctx.rank * args.grad_accum + position
        torch.manual_seed(step_seed(args.seed, DROPOUT_STREAM, iteration, place))
        if self.method is not None:
            for name, (generator, shared) in self.method.generators().items():
                generator.manual_seed(step_seed(args.seed, name, iteration, position if shared else place))

    def step(self, micro_batches, iteration, seed=True):
        """One iteration on its micro-batches (a list of (images, labels, names)); returns {term: value}."""
        args = self.args
        count = len(micro_batches)
        set_learning_rate(self.optimizer, poly_lr(args.lr, iteration - 1, args.max_iterations))
        self.optimizer.zero_grad(set_to_none=True)
        kept = []
        totals = {}
        for position, (images, labels, _) in enumerate(micro_batches):
            if seed:
                self.seed_micro_batch(iteration, position)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True).long()
            if self.synchronised_buffers:
                broadcast_tensors(self.synchronised_buffers)
            last = position == count - 1
            # Gradients are all-reduced once, in the backward pass of the last micro-batch.
            sync = contextlib.nullcontext() if last or not self.ctx.distributed else self.train_module.no_sync()
            with sync:
                with self._autocast():
                    t_outputs = None
                    if self.teacher is not None:
                        with torch.no_grad():  # frozen teacher; its outputs may be saved for backward
                            t_outputs = self.teacher(images, return_stages=self.return_stages)
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
                kept.append((s_outputs.detach(), t_outputs, labels))
        self._clip_gradients()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        for name, own in self.own_optimizers.items():
            totals.update(self._own_step(name, own, kept, iteration))
        return totals

    def _clip_gradients(self):
        """The method's gradient clipping, on the averaged and (under --amp) unscaled gradients."""
        clipping = self.method.gradient_clipping() if self.method is not None else ()
        if not clipping:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # the step then skips a second unscale
        for module, max_norm in clipping:
            torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)

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
