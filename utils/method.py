"""The contract between a distillation method and the shared training loop.

A method script builds a `DistillationMethod` (an `nn.Module`) from what the networks state (`nets.student`,
`nets.teacher`: `models.segmentation.NetworkSpec`s with output stride, feature channels, stage channels) and
hands it to `run_training`. The networks' outputs reach it as `models.segmentation.SegmentationOutput`s: read
`.logits`, `.features`, `.aux` and (with `uses_stages = True`) `.stages` by name. A student and a teacher of
different families differ in output stride and channels: the losses resize the student's maps to the
teacher's (losses/align.py) and a method's own modules map the channels. The loop does everything else: data,
the frozen teacher, the student's optimizer and schedule, DDP, gradient accumulation, logging, validation,
checkpoints and exact resume. A method can own:

- **terms of the student's loss**: `forward(s_outputs, t_outputs, labels)` returns {log name: weighted
  scalar}; the loop adds them to the task loss and back-propagates the sum once. Names listed in
  `logged_only` are logged but not added (diagnostics).
- **modules trained with the student** (an adapter, a generator, a projection head): any submodule. Their
  parameters join the student's optimizer (by default one group with the student's lr schedule, momentum and
  weight decay, as the original; `param_groups()` may declare several, each with an `lr_mult` and a
  `weight_decay`), and DDP synchronises their gradients.
- **optimizers of its own** (the SKD/IFVD discriminator): `add_optimizer(name, module, make, lr)`. That
  module's parameters are never touched by the student's optimizer or backward pass (run it inside
  `frozen(module)` when the student's loss goes through it), nor by DDP. After the student's step the loop
  calls `own_loss(name, s_outputs, t_outputs, labels)` with the detached outputs of that iteration, back-
  propagates the loss, averages the gradients over the processes and steps the optimizer, with the lr
  `lr x (1 - (i - 1) / max_iterations) ^ 0.9`. Its logged terms join the log line.
- **buffers that change during training and are equal on every process by construction** (CIRKD's class
  memories): a submodule lists their names in a class attribute `local_buffers`; DDP does not broadcast
  them and the resume file holds them once.
- **gradient clipping of its own modules** (Af-DCD clips its loss module's gradient): `clip_gradients(module,
  max_norm)`; after the iteration's backward passes (the gradients averaged over the processes, unscaled under
  `--amp`) and before the student's step, the loop clips that module's gradient to `max_norm` (L2 norm).
- **random generators**: `add_generator(name, shared=False)` gives a CPU `torch.Generator` that the loop
  seeds before every micro-batch from `--seed`, the iteration and the micro-batch's place in the global
  batch (`shared=True`: the same seed on every process, for state that must stay equal everywhere).

Everything a method owns (modules, buffers, optimizer states, generator states) is in the resume file and
comes back on resume.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class OwnOptimizer:
    """An optimizer a method steps itself after the student's step (see the module docstring)."""
    name: str
    module: nn.Module
    make: Callable          # make(parameters, lr) -> torch.optim.Optimizer
    lr: float
    optimizer: torch.optim.Optimizer = None


@contextlib.contextmanager
def frozen(module):
    """Run `module` without recording gradients for its parameters (the gradient still flows through it to
    its inputs): for a module the student's loss passes through but the student's optimizer must not train."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield module
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class DistillationMethod(nn.Module):
    """Base class of what a method script hands to `run_training` (see the module docstring)."""

    logged_only = ()
    # True: the loop asks both networks for their backbone stages (`outputs.stages`), e.g. for attention maps.
    uses_stages = False

    def __init__(self):
        super().__init__()
        self._generators = {}
        self._own_optimizers = {}
        self._clipped = []

    # ---------------------------------------------------------------- what a method declares

    def add_generator(self, name, shared=False):
        """A CPU generator the loop seeds before every micro-batch; `shared`: the same seed on every process."""
        generator = torch.Generator()
        self._generators[name] = (generator, bool(shared))
        return generator

    def add_optimizer(self, name, module, make, lr):
        """Train `module` (a submodule of this method) with `make(parameters, lr)`, stepped after the
        student's step on the loss `own_loss(name, ...)` returns."""
        self._own_optimizers[name] = OwnOptimizer(name, module, make, float(lr))

    def clip_gradients(self, module, max_norm):
        """Clip the gradient of `module` (a submodule trained with the student) to L2 norm `max_norm` before
        every step of the student's optimizer."""
        if not max_norm > 0:
            raise ValueError(f'clip_gradients: max_norm must be positive, got {max_norm}')
        self._clipped.append((module, float(max_norm)))

    def forward(self, s_outputs, t_outputs, labels):
        """{log name: weighted scalar} added to the student's loss; s_outputs / t_outputs are the networks'
        SegmentationOutputs (`.logits`, `.features`, ...), labels N x H x W (ignore -1)."""
        raise NotImplementedError

    def own_loss(self, name, s_outputs, t_outputs, labels):
        """(loss, {log name: value}) of the optimizer `name`, on the detached outputs of the iteration."""
        raise NotImplementedError(f'{type(self).__name__} declares optimizer {name!r} but no own_loss')

    # ---------------------------------------------------------------- what the loop reads

    def generators(self):
        """{name: (generator, shared)}."""
        return dict(self._generators)

    def own_optimizers(self):
        """{name: OwnOptimizer}."""
        return dict(self._own_optimizers)

    def gradient_clipping(self):
        """[(module, max_norm)] declared with `clip_gradients`."""
        return list(self._clipped)

    def _own_names(self):
        """Fully qualified names of the parameters and buffers of the modules with optimizers of their own."""
        names = set()
        for own in self._own_optimizers.values():
            prefix = next(n for n, m in self.named_modules() if m is own.module)
            prefix = prefix + '.' if prefix else ''
            names.update(prefix + n for n, _ in own.module.named_parameters())
            names.update(prefix + n for n, _ in own.module.named_buffers())
        return names

    def student_parameters(self):
        """Parameters trained with the student (all but those of the modules with optimizers of their own)."""
        own = self._own_names()
        return [p for n, p in self.named_parameters() if n not in own and p.requires_grad]

    def param_groups(self):
        """The groups of the student's optimizer this method's modules train in: a list of dicts with 'params'
        and optionally 'name', 'lr_mult' (x the student's lr) and 'weight_decay'. Default: one group of
        `student_parameters()` with the student's lr and weight decay."""
        return [{'name': 'method', 'params': self.student_parameters()}]

    def own_modules(self):
        """The modules with optimizers of their own."""
        return [own.module for own in self._own_optimizers.values()]

    def unsynchronised_names(self):
        """Names of the parameters and buffers that are not broadcast from process 0: those of the modules with
        optimizers of their own, and the `local_buffers` of every submodule."""
        names = self._own_names()
        for prefix, module in self.named_modules():
            for local in getattr(module, 'local_buffers', ()):
                names.add(f'{prefix}.{local}' if prefix else local)
        return names

    def generator_states(self):
        return {name: generator.get_state() for name, (generator, _) in self._generators.items()}

    def load_generator_states(self, states):
        for name, (generator, _) in self._generators.items():
            if name in states:
                generator.set_state(states[name])
