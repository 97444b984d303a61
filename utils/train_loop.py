"""The one training loop behind every training script.

A method plugs in through `run_training(args, method, build_method)`:

- `method`: the short name used in file names (`hwd` -> `hwd_deeplabv3_resnet18_citys.pth`);
- `build_method(nets)`: called once the student exists, with what the networks state (`nets.student`,
  `nets.teacher`: NetworkSpecs; `nets.num_class`, `nets.device`, `nets.norm_layer`); returns a
  `utils.method.DistillationMethod` (its docstring is the contract) or None (no distillation: no teacher).

The rooms of the loop:
- `utils/train_build.py` builds the networks, the method, the optimizer over the declared parameter groups,
  AMP and DDP;
- `utils/train_step.py` runs one iteration (`Stepper.step`) and keeps the loss sums (`LossMeter`);
- `utils/train_state.py` is what is saved and restored (`RunState`);
- `utils/run_folders.py` checks, before anything is written, that the run overwrites no other run's files, and
  holds the run's lock;
- this module drives them: data and loaders, the iterations, logging, validation with the teacher check,
  checkpoints and the records of the run (flags with the environment, history with the cost), exact resume,
  SIGTERM and SIGINT (Ctrl-C), the non-finite loss stop, and errors met by one process stopping all of them
  with one message.

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
from torch.utils.data import DataLoader

from dataset import build_dataset, canonical_name, dataset_info
from utils.checkpointing import (
    BackgroundWriter,
    ResumeError,
    check_resume_matches,
    checkpoint_paths,
    flags_for_resume,
    load_resume_state,
)
from utils.cost import IterationClock, cost_record, environment, format_hours, global_peak_memory_mb
from utils.distributed import (
    PeerLost,
    agree_on_error,
    broadcast_object,
    cleanup,
    cpu_fallback_warning,
    init_distributed,
    is_lost_peer,
)
from utils.errors import StopCommand, UserError
from utils.evaluation import ShardSampler, evaluate
from utils.logger import setup_logging
from utils.metric import format_iou_table, format_summary
from utils.options import student_names
from utils.results import FLAGS_SUFFIX, HISTORY_SUFFIX, metrics_record, read_history, write_history, write_json
from utils.run_folders import LOG_SUFFIX, claim_run_folders, run_stem
from utils.samplers import IterationSampler
from utils.seeding import derive_seed
from utils.train_build import build_run, check_micro_batch, student_norm_layer
from utils.train_state import RunState
from utils.train_step import LossMeter

logger = logging.getLogger(__name__)

# The signals that stop a run cleanly: the resume file is written and the exit status is 128 + the signal's
# number, as a shell reports a process ended by it (SIGTERM 143: a cluster's pre-emption; SIGINT 130: Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_TERMINATED = 128 + signal.SIGTERM
# A second SIGINT this long after the first aborts at once (Ctrl-C twice); one sooner is the same Ctrl-C passed on
# by the launcher (torchrun forwards the signal it receives to its workers, which got it from the terminal too).
SECOND_INTERRUPT_SECONDS = 1.0


class TrainingTerminated(StopCommand):
    """SIGTERM or SIGINT received: the resume file was written and the run stopped."""

    def __init__(self, signum, iteration, resume_path):
        name = signal.Signals(signum).name
        super().__init__(f'stopped by {name} after iteration {iteration}; resume file {resume_path}; '
                         'continue with --resume auto')
        self.exit_status = 128 + signum
        self.iteration = iteration
        self.resume_path = resume_path


# ---------------------------------------------------------------- stop signals and errors, agreed by all processes

class StopSignal:
    """Notes SIGTERM and SIGINT; `poll(failed)` tells every process, at the same iteration, whether to stop and
    whether a process failed to read its batch.

    With several processes the flags are combined by one small all-reduce (MAX) per iteration on a CPU gloo group:
    it waits only for the other processes to reach the same iteration (never for the GPU), and it must, so that a
    process whose batch failed does not leave the others waiting in the step's collectives. A second Ctrl-C, more
    than SECOND_INTERRUPT_SECONDS after the first, aborts at once (KeyboardInterrupt) without saving.
    """

    def __init__(self, group=None, distributed=False, announce=True):
        self.signum = 0
        self.received_at = 0.0
        self.group = group
        self.distributed = distributed
        self.announce = announce
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self.signum == signal.SIGINT and signum == signal.SIGINT \
                and now - self.received_at > SECOND_INTERRUPT_SECONDS:
            raise KeyboardInterrupt
        if self.signum:
            return
        self.signum, self.received_at = int(signum), now
        if self.announce:
            again = ' (Ctrl-C again to abort without saving)' if signum == signal.SIGINT else ''
            note = (f'\n{signal.Signals(signum).name} received: the run stops at the next iteration and writes its '
                    f'resume file{again}\n')
            try:
                os.write(2, note.encode())  # stderr's descriptor: safe inside a signal handler, unlike logging
            except OSError:
                pass

    def poll(self, failed=False):
        """(signal number or 0, whether any process failed), the same on every process."""
        if not self.distributed:
            return self.signum, bool(failed)
        flags = torch.tensor([self.signum, int(bool(failed))], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    def close(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def ignore_interrupts(worker_id):
    """DataLoader workers ignore Ctrl-C: the terminal sends SIGINT to them too, and a worker that ended would stop
    the training process before it reaches the agreed stop and writes its resume file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def is_out_of_memory(error):
    """Whether `error` is an allocation that failed (CUDA or CPU; also as re-raised from a loader worker)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or 'out of memory' in text.lower())


def out_of_memory_error(args, ctx, where):
    micro_batch = args.batch_size // (ctx.world_size * args.grad_accum)
    height, width = args.crop_size
    return UserError(f'out of memory while {where} ({micro_batch} crops of {height}x{width} per process and '
                     f'micro-batch, on {ctx.device}): lower --crop-size or --batch-size, or raise --grad-accum')


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
        self.model_name, self.backbone, _, _ = student_names(args)
        self.stem = run_stem(args, method_name)
        self.paths = checkpoint_paths(args.save_dir, self.stem)
        self.writer = BackgroundWriter()
        setup_logging(args.log_dir, ctx.rank, filename=self.stem + LOG_SUFFIX)
        warning = cpu_fallback_warning(args, self.device)
        if warning:
            logger.warning(warning)
        # A CPU group for the small control messages (the stop flag), apart from NCCL.
        self.cpu_group = None
        if ctx.distributed:
            self.cpu_group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD

        # The same initial weights (and method state) on every process, a function of --seed only.
        torch.manual_seed(derive_seed(args.seed, 'init'))
        self._build_data()
        self.built = build_run(args, ctx, self.num_class, build_method)
        self.student = self.built.student
        self.teacher = self.built.teacher
        self.state = RunState(self.built, method_name, args, ctx.world_size)
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
        saved = load_resume_state(path)
        check_resume_matches(saved, path, self.method_name, args)
        self.state.load_state_dict(saved, path)
        saved_world = saved.get('world_size')
        if saved_world is not None and saved_world != ctx.world_size:
            logger.warning(f'the resume file was written by {saved_world} process(es) and this run has '
                           f'{ctx.world_size}: the samples are the same, but BatchNorm statistics and summation '
                           'order differ, so the run will not repeat the uninterrupted one exactly')
        best = f'{self.state.best_miou * 100:.3f}' if self.state.has_best else 'none yet'
        logger.info(f'Resumed from {path}: iteration {self.state.iteration}/{args.max_iterations}, best mIoU {best}')

    def _build_loaders(self):
        args, ctx = self.args, self.ctx
        micro_batch = args.batch_size // (ctx.world_size * args.grad_accum)
        sampler = IterationSampler(len(self.train_set), args.max_iterations, args.batch_size, rank=ctx.rank,
                                   world_size=ctx.world_size, seed=args.seed, start_iteration=self.state.iteration)
        self.train_loader = DataLoader(self.train_set, batch_size=micro_batch, sampler=sampler,
                                       num_workers=args.workers, pin_memory=self.is_cuda, drop_last=False,
                                       worker_init_fn=ignore_interrupts)
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = DataLoader(self.val_set, batch_size=1, sampler=ShardSampler(self.val_set),
                                         num_workers=args.workers, pin_memory=self.is_cuda,
                                         worker_init_fn=ignore_interrupts)

    # ---------------------------------------------------------------- records and saving

    def _json_dirs(self):
        """Folders of the flags and history files: the log folder and, when it differs, the save folder."""
        folders = [self.args.log_dir]
        if os.path.abspath(self.args.save_dir) != os.path.abspath(self.args.log_dir):
            folders.append(self.args.save_dir)
        return folders

    def _write_flags(self):
        args = self.args
        record = {'method': self.method_name, 'model': self.model_name, 'backbone': self.backbone,
                  'dataset': canonical_name(args.dataset), 'seed': args.seed, 'world_size': self.ctx.world_size,
                  'environment': environment(self.device, self.ctx.world_size, args.amp),
                  'parameter_groups': [{'name': name, 'tensors': tensors, 'parameters': count, 'lr_mult': mult,
                                        'weight_decay': decay}
                                       for name, tensors, count, mult, decay in self.built.groups],
                  'teacher_built': self.teacher is not None,
                  'flags': flags_for_resume(args)}
        for folder in self._json_dirs():
            write_json(os.path.join(folder, self.stem + FLAGS_SUFFIX), record)

    def _load_history(self):
        """The validation history of this run up to the start iteration (later records belong to a part of
        the run that is being repeated)."""
        path = os.path.join(self.args.log_dir, self.stem + HISTORY_SUFFIX)
        start = self.state.iteration
        records = read_history(path) if start else []
        return [r for r in records if r.get('iteration', 0) <= start]

    def _write_history(self):
        for folder in self._json_dirs():
            write_history(os.path.join(folder, self.stem + HISTORY_SUFFIX), self.history)

    def _save(self, is_best, wait=False):
        """Latest (and best) student weights and the resume file, written by rank 0 in the background; the state
        is copied here, so training goes on while the files are written."""
        if not self.ctx.is_main:
            return
        self.state.train_seconds = self.clock.total
        snapshot = self.state.state_dict()
        files = [(snapshot['student'], self.paths['latest'])]
        if is_best:
            files.append((snapshot['student'], self.paths['best']))
        files.append((snapshot, self.paths['resume']))
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
        if self.state.teacher_metrics is None:
            logger.info('Evaluating the teacher once on the validation set')
            pix_acc, miou, _, matrix = self._evaluate(self.teacher)
            chance = matrix.chance_miou()
            self.state.teacher_metrics = {'pixAcc': pix_acc, 'mIoU': miou, 'chance_mIoU': chance,
                                          'warned_below_student': False}
            logger.info('Teacher validation pixAcc: {:.3f}, mIoU: {:.3f}'.format(pix_acc * 100, miou * 100))
            if not math.isnan(miou) and miou < chance:
                logger.warning('the teacher scores near chance (mIoU {:.3f}, below {:.3f}): is --teacher-pretrained '
                               'a trained network for this data set?'.format(miou * 100, chance * 100))
        metrics = self.state.teacher_metrics
        if not metrics['warned_below_student'] and student_miou > metrics['mIoU']:
            metrics['warned_below_student'] = True
            logger.warning('the student (mIoU {:.3f}) scores above its teacher (mIoU {:.3f}): check '
                           '--teacher-pretrained'.format(student_miou * 100, metrics['mIoU'] * 100))

    def _validate(self, iteration, meter):
        """Validate the student (and, the first time, the teacher) and append the history record; returns
        whether this is the best checkpoint so far (the first validation always is, even at 0 mIoU)."""
        seconds, iterations = self.clock.window()
        self.clock.pause()
        peak = global_peak_memory_mb(self.device)
        logger.info(f'Start validation at iteration {iteration}, total samples: {len(self.val_set)}')
        pix_acc, miou, iou, _ = self._evaluate(self.student)
        logger.info(format_summary(pix_acc, miou))
        logger.info('Per-class IoU:\n' + format_iou_table(iou, self.class_names))
        record = {'iteration': iteration, **metrics_record(pix_acc, miou, iou, self.class_names),
                  'losses': {name: round(value, 6) for name, value in meter.summary('val').items()},
                  **cost_record(seconds, iterations, self.args.batch_size, peak)}
        if self.teacher is not None:
            first = self.state.teacher_metrics is None
            self._check_teacher(miou)
            if first:
                record['teacher'] = {'pixAcc': round(self.state.teacher_metrics['pixAcc'] * 100, 6),
                                     'mIoU': round(self.state.teacher_metrics['mIoU'] * 100, 6)}
        score = 0.0 if math.isnan(miou) else miou
        is_best = score > self.state.best_miou
        if is_best:
            self.state.best_miou = score
            logger.info('New best validation mIoU: {:.3f}'.format(score * 100))
        if self.ctx.is_main:
            self.history.append(record)
            self._write_history()
        self.clock.resume()
        return is_best

    # ---------------------------------------------------------------- training

    def _log_line(self, iteration, means):
        elapsed = time.time() - self.start_time
        done = max(iteration - self.start_iteration, 1)
        # the rate of training alone (validation excluded) times what is left
        eta = (self.clock.total - self.state.train_seconds) / done * (self.args.max_iterations - iteration)
        parts = [f'Iters: {iteration:d}/{self.args.max_iterations:d}',
                 f"Lr: {self.built.optimizer.param_groups[0]['lr']:.6f}"]
        parts += [f'{name}: {value:.4f}' for name, value in means.items()]
        parts += [f'Cost Time: {datetime.timedelta(seconds=int(elapsed))}',
                  f'Estimated Time: {datetime.timedelta(seconds=int(eta))}']
        return ' || '.join(parts)

    def train(self):
        args, ctx = self.args, self.ctx
        max_iterations = args.max_iterations
        self.start_iteration = self.state.iteration
        logger.info(f'Using {ctx.world_size} process(es) on {self.device}; {args.batch_size // ctx.world_size} '
                    f'images per process' + (f' in {args.grad_accum} micro-batches' if args.grad_accum > 1 else ''))
        logger.info(args)
        for name, tensors, count, mult, decay in self.built.groups:
            logger.info(f'parameter group {name!r}: {tensors} tensors, {count / 1e6:.2f}M parameters, lr x {mult:g}, '
                        f'weight decay {decay:g} ({args.optimizer})')
        if args.amp and not self.is_cuda:
            logger.info('--amp is for GPUs; training in float32 on the CPU')
        if ctx.is_main:
            self._write_flags()
            self.history = self._load_history()
        logger.info(f'Start training, Total Iterations {max_iterations:d}'
                    + (f', from iteration {self.start_iteration + 1}' if self.start_iteration else ''))
        meter = LossMeter(self.device)
        stop = StopSignal(self.cpu_group, ctx.distributed, announce=ctx.is_main)
        progress = None
        redirect = contextlib.nullcontext()
        if ctx.is_main and sys.stdout.isatty():
            from tqdm import tqdm  # only on a terminal
            from tqdm.contrib.logging import logging_redirect_tqdm
            progress = tqdm(total=max_iterations, initial=self.start_iteration, dynamic_ncols=True, leave=False)
            redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])  # log lines above the bar
        synchronize = torch.cuda.synchronize if self.is_cuda else None
        self.clock = IterationClock(self.state.train_seconds, synchronize)
        self.built.train_module.train()
        self.start_time = time.time()
        self.clock.start()
        try:
            with redirect:
                self._iterate(meter, stop, progress)
        except BaseException:
            # Files already submitted are finished even when the run stops with an error (they were
            # checked before submission); the first error is the one reported.
            self.writer.wait(quiet=True)
            raise
        finally:
            stop.close()
            if progress is not None:
                progress.close()
        self.clock.pause()
        self.writer.wait()
        self._log_totals()
        return self.student

    def _log_totals(self):
        args = self.args
        if self.start_iteration == args.max_iterations:
            logger.info(f'Nothing to do: the resume file is already at iteration {args.max_iterations}')
        total = self.clock.total
        peak = global_peak_memory_mb(self.device)
        done = max(args.max_iterations - self.start_iteration, 1)
        this_part = total - self.state.train_seconds if self.start_iteration else total
        logger.info(f'Total training time: {datetime.timedelta(seconds=int(total))} '
                    f'({this_part / done:.4f}s / it{" in this part" if self.start_iteration else ""}, '
                    'validation excluded)')
        logger.info(f'Device-hours: {format_hours(total * self.ctx.world_size)} ({self.ctx.world_size} process(es) '
                    f'on {self.device.type}); peak memory: {peak:.0f} MB '
                    f'({"CUDA allocated" if self.is_cuda else "resident"}, largest process)')
        if not args.skip_val and self.state.has_best:
            logger.info('Best validation mIoU: {:.3f}'.format(self.state.best_miou * 100))

    def _next_batches(self, batches):
        """(the next iteration's micro-batches or None at the end, the StopCommand met while reading them or None)."""
        try:
            return next(batches, None), None
        except StopCommand as error:  # bad data: a corrupt image, a label that does not fit
            return None, error
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            return None, out_of_memory_error(self.args, self.ctx, 'reading a batch')

    def _iterate(self, meter, stop, progress):
        max_iterations = self.args.max_iterations
        iteration = self.start_iteration
        batches = _chunks(self.train_loader, self.args.grad_accum)
        while True:
            micro_batches, error = self._next_batches(batches)
            # one agreement per iteration: a process that could not read its batch stops every process here
            # (before the step's collectives), and a signal stops all of them at the same iteration
            signum, failed = stop.poll(failed=error is not None)
            if failed:
                agree_on_error(error, self.cpu_group, failed=True)
            if micro_batches is None:
                break
            iteration += 1
            if signum:
                meter.check()
                self.state.iteration = iteration - 1
                self._save(is_best=False, wait=True)
                logger.info(f'{signal.Signals(signum).name}: saved the resume file at iteration {iteration - 1}; '
                            'stopping (continue with --resume auto)')
                raise TrainingTerminated(signum, iteration - 1, self.paths['resume'])
            try:
                meter.add(self.built.stepper.step(micro_batches, iteration), iteration)
            except (RuntimeError, MemoryError) as failure:
                if not is_out_of_memory(failure):
                    raise
                raise out_of_memory_error(self.args, self.ctx, f'training iteration {iteration}') from None
            self.clock.count()
            if progress is not None:
                progress.update(1)
            self._after_step(iteration, meter)
        if iteration != max_iterations:
            raise UserError(f'the training set gave {iteration - self.start_iteration} batches instead of '
                            f'{max_iterations - self.start_iteration}: the data set did not honour max_iters')

    def _after_step(self, iteration, meter):
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
                logger.info(self._log_line(iteration, means))
        if not save_now:
            return
        self.state.iteration = iteration
        is_best = False
        if at_val and not args.skip_val:
            is_best = self._validate(iteration, meter)
        self._save(is_best)


def run_training(args, method_name, build_method=None):
    """Set up the processes, claim the run's folders, train, clean up; returns the trained student (unwrapped) of
    this process."""
    ctx = init_distributed(args)
    lock = None
    try:
        check_micro_batch(args, ctx, student_norm_layer(ctx))  # a user error: refused before any folder is made
        lock = claim_run_folders(args, method_name, ctx)
        trainer = Trainer(args, method_name, build_method, ctx)
        if lock is not None:  # now that the log is set up
            for warning in lock.warnings:
                logger.warning(warning)
            if lock.removed:
                logger.info('--overwrite: removed the files of the earlier run: ' + ', '.join(lock.removed))
        return trainer.train()
    except Exception as error:
        if ctx.distributed and is_lost_peer(error):
            raise PeerLost(ctx.rank) from None
        raise
    finally:
        if lock is not None:
            lock.release()
        cleanup()
