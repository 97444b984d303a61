"""Process-group set-up and reductions, for every launcher users type.

- `python -m torch.distributed.launch --nproc_per_node=K` passes `--local-rank=N` (current PyTorch) or
  `--local_rank N` (old PyTorch) and sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
- `torchrun` sets LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (also across nodes);
- SLURM's `srun` starts one task per process and sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, which are
  read when RANK is absent; MASTER_ADDR / MASTER_PORT come from the environment (the sbatch script exports
  them, see the README);
- plain `python script.py` runs one process without a process group.

NCCL on GPUs, gloo on the CPU (`--no-cuda`, or no GPU present).

When one process stops with an error the user can fix (bad data), the others must not wait in a collective
for it and then die with a traceback of their own: `agree_on_error` is called by every process at the points
where such errors arise (reading a batch, validation), and `PeerLost` turns a collective that failed because
another process is gone into one line.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import PeerStopped, RelayedError, StopCommand, UserError


def add_launcher_args(parser):
    """The device flags of the original scripts, plus both spellings of the launcher's local rank."""
    group = parser.add_argument_group('device and launcher')
    group.add_argument('--gpu-id', type=str, default=None,
                       help='GPU ids to use, comma separated (one process per GPU when distributed; default: the '
                            "process's local rank, GPU 0 in one process)")
    group.add_argument('--no-cuda', action='store_true', default=False,
                       help='run on the CPU (gloo backend when distributed)')
    group.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                       help='set by torch.distributed.launch; torchrun passes LOCAL_RANK instead')
    return group


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(name, default=None):
    value = os.environ.get(name)
    if value is None or value == '':
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f'environment variable {name}={value!r} is not an integer; '
                        'it is normally set by torchrun or torch.distributed.launch') from None


def launcher_environment():
    """(rank, world_size, local_rank or None, launcher name) from the environment: torchrun /
    torch.distributed.launch (RANK, WORLD_SIZE, LOCAL_RANK) or, when RANK is absent, SLURM's srun
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, None, 'none') for a plain `python script.py`."""
    if os.environ.get('RANK') is None and os.environ.get('SLURM_PROCID') is not None \
            and os.environ.get('SLURM_NTASKS') is not None:
        return (_env_int('SLURM_PROCID', 0), _env_int('SLURM_NTASKS', 1), _env_int('SLURM_LOCALID'), 'slurm')
    world_size = _env_int('WORLD_SIZE', 1)
    return _env_int('RANK', 0), world_size, _env_int('LOCAL_RANK'), 'torchrun' if world_size > 1 else 'none'


def init_distributed(args):
    """Set up the process group (when launched with more than one process) and the device.

    Stores `rank`, `world_size`, `local_rank`, `distributed` and `device` on `args` and returns a
    DistContext with the same values.
    """
    rank, world_size, local_rank, launcher = launcher_environment()
    if local_rank is None:
        local_rank = args.local_rank if getattr(args, 'local_rank', None) is not None else 0
    use_cuda = torch.cuda.is_available() and not getattr(args, 'no_cuda', False)
    distributed = world_size > 1

    if use_cuda:
        gpu_id = getattr(args, 'gpu_id', None)
        gpu_ids = [g.strip() for g in ('' if gpu_id is None else str(gpu_id)).split(',') if g.strip() != '']
        try:
            gpu_ids = [int(g) for g in gpu_ids]
        except ValueError:
            raise UserError(f'--gpu-id {args.gpu_id!r}: expected comma-separated integers such as 0,1,2,3') from None
        count = torch.cuda.device_count()
        if distributed or len(gpu_ids) == 0:
            # One process per GPU: the local rank picks the GPU, among --gpu-id when given enough ids.
            index = gpu_ids[local_rank] if local_rank < len(gpu_ids) else local_rank
        else:
            index = gpu_ids[0]
        if index >= count:
            asked = f'--gpu-id {gpu_id}, ' if gpu_id is not None else ''
            raise UserError(f'GPU {index} was asked for ({asked}local rank {local_rank}) but this machine has '
                            f'{count} GPU(s)')
        torch.cuda.set_device(index)
        device = torch.device('cuda', index)
        backend = 'nccl'
    else:
        device = torch.device('cpu')
        backend = 'gloo'

    if distributed and not dist.is_initialized():
        if 'MASTER_ADDR' not in os.environ or 'MASTER_PORT' not in os.environ:
            if launcher == 'slurm':
                raise UserError(f'SLURM started {world_size} tasks but MASTER_ADDR/MASTER_PORT are not set: export '
                                'them in the sbatch script (the first node of the allocation and a free port; see '
                                'the README)')
            raise UserError('WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun '
                            'or python -m torch.distributed.launch')
        kwargs = dict(backend=backend, init_method='env://', world_size=world_size, rank=rank)
        if use_cuda:
            kwargs['device_id'] = device
        dist.init_process_group(**kwargs)

    ctx = DistContext(rank=rank, world_size=world_size, local_rank=local_rank,
                      distributed=distributed, device=device)
    for key in ('rank', 'world_size', 'local_rank', 'distributed', 'device'):
        setattr(args, key, getattr(ctx, key))
    return ctx


def cpu_fallback_warning(args, device):
    """The warning for a run given --gpu-id that runs on the CPU because no GPU is available, or None."""
    if getattr(args, 'gpu_id', None) is None or device.type == 'cuda' or getattr(args, 'no_cuda', False):
        return None
    return (f'--gpu-id {args.gpu_id}: no GPU is available here (torch.cuda.is_available() is False); the run uses '
            'the CPU')


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum of `tensor` over all processes (in place; returns it)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(parameters):
    """Average the gradients of `parameters` over all processes, in one all-reduce (no-op in one process).
    For modules outside DDP (a method's own optimizer)."""
    if not is_dist():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_tensors(tensors, src=0):
    """Overwrite `tensors` (in place) with process `src`'s values, one collective per dtype."""
    if not is_dist():
        return
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for tensor in group:
            tensor.data.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def all_reduce_max(value):
    """The largest of a number over all processes (the number itself in one process)."""
    if not is_dist():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == 'nccl':
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _flag_device(group):
    """The device of a collective's tensors: the GPU for NCCL, the CPU for gloo."""
    backend = dist.get_backend(group)
    return torch.device('cuda', torch.cuda.current_device()) if backend == 'nccl' else torch.device('cpu')


def any_process(flag, group=None):
    """Whether `flag` is true on any process (every process must call it; `flag` itself in one process)."""
    if not is_dist():
        return bool(flag)
    tensor = torch.tensor([int(bool(flag))], dtype=torch.int32, device=_flag_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


def agree_on_error(error, group=None, failed=None):
    """Called by every process at the same point with the StopCommand it met there, or None. When any process met
    one, every process raises: rank 0 its own error, or else the first failing process's message (RelayedError:
    printed once, by rank 0), and the other ranks PeerStopped (silent), all with the same exit status.

    `failed`: whether any process failed, when the caller has already reduced it (one collective less)."""
    if not is_dist():
        if error is not None:
            raise error
        return
    if failed is None:
        failed = any_process(error is not None, group)
    if not failed:
        return
    mine = None if error is None else (error.describe(), error.exit_status)
    reports = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, mine, group=group)
    text, status = next(report for report in reports if report is not None)
    if dist.get_rank() != 0:
        raise PeerStopped(status)
    if error is not None:
        raise error
    raise RelayedError(text, status)


# What a collective raises when a process it waits for has gone (gloo's wording; NCCL's arrive as DistError).
_LOST_PEER_MARKERS = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe')


def is_lost_peer(error):
    """Whether `error` is a collective failing because another process of the run is gone."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _LOST_PEER_MARKERS)


class PeerLost(StopCommand):
    """A collective failed because another process stopped (its own message says why): one line, no traceback."""

    def __init__(self, rank):
        super().__init__(f'error: process {rank} stops: another process of the run has stopped (its messages '
                         'say why)')


def broadcast_object(obj, src=0):
    """The value of `obj` on process `src`, on every process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup():
    if is_dist():
        dist.destroy_process_group()
