"""What a run costs: wall time per training iteration, throughput, peak memory, device-hours, and the environment
that produced the numbers.

Papers in this field compare methods whose compute differs; these numbers go into every validation record of the
history (`seconds_per_iteration`, `images_per_second`, `peak_memory_mb`), the flags file (`environment`) and the
run's last log lines, and `utils.compare` shows them per row.

- peak memory: on a GPU the CUDA allocator's peak of allocated memory, on the CPU the process's peak resident set
  size; the largest over the processes;
- device-hours: processes x wall hours of training (validation excluded), summed over the parts of a resumed run.
"""
import os
import platform
import resource
import sys
import time

import torch
import torchvision

from utils.distributed import all_reduce_max


def peak_memory_mb(device):
    """This process's peak memory in MB (see the module docstring)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS
    scale = 1 if sys.platform == 'darwin' else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def global_peak_memory_mb(device):
    """The largest peak memory over the processes (every process must call it)."""
    return all_reduce_max(peak_memory_mb(device))


def device_name(device):
    """The GPU's name, or the CPU's model name (Linux's /proc/cpuinfo) with its number of cores."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or 'cpu'
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as handle:
            models = [line.split(':', 1)[1].strip() for line in handle if line.startswith('model name')]
        if models:
            name = models[0]
    except OSError:
        pass
    return f'{name} ({os.cpu_count()} cores)'


def environment(device, world_size, amp):
    """The `environment` object of the flags file."""
    return {
        'device_type': device.type,
        'device_name': device_name(device),
        'processes': int(world_size),
        'torch': torch.__version__,
        'torchvision': torchvision.__version__,
        'cuda': torch.version.cuda if device.type == 'cuda' else None,
        'amp': bool(amp and device.type == 'cuda'),
        'cpu_threads': torch.get_num_threads(),
        'python': platform.python_version(),
    }


class IterationClock:
    """Wall time of training iterations, validation (and anything else paused) excluded.

    `start()` at the beginning of training; `pause()` / `resume()` around validation; `window()` returns the
    (seconds, iterations) since the previous call and starts a new window; `total` is the training time so
    far, including `previous` seconds (the earlier parts of a resumed run).
    """

    def __init__(self, previous=0.0, synchronize=None):
        self.previous = float(previous)
        self.synchronize = synchronize or (lambda: None)
        self.running_since = None
        self.accumulated = 0.0
        self.window_seconds = 0.0
        self.window_iterations = 0

    def start(self):
        self.running_since = time.perf_counter()

    def pause(self):
        if self.running_since is None:
            return
        self.synchronize()
        elapsed = time.perf_counter() - self.running_since
        self.accumulated += elapsed
        self.window_seconds += elapsed
        self.running_since = None

    def resume(self):
        if self.running_since is None:
            self.running_since = time.perf_counter()

    def count(self, iterations=1):
        self.window_iterations += iterations

    def window(self):
        """(seconds, iterations) of training since the previous window; the clock keeps running."""
        running = self.running_since is not None
        self.pause()
        seconds, iterations = self.window_seconds, self.window_iterations
        self.window_seconds, self.window_iterations = 0.0, 0
        if running:
            self.resume()
        return seconds, iterations

    @property
    def total(self):
        extra = time.perf_counter() - self.running_since if self.running_since is not None else 0.0
        return self.previous + self.accumulated + extra


def cost_record(seconds, iterations, batch_size, peak_mb):
    """The cost fields of a history record."""
    per_iteration = seconds / iterations if iterations else None
    return {
        'seconds_per_iteration': round(per_iteration, 6) if per_iteration else None,
        'images_per_second': round(batch_size / per_iteration, 3) if per_iteration else None,
        'peak_memory_mb': round(peak_mb, 1),
    }


def format_hours(seconds):
    return f'{seconds / 3600:.3f}'
