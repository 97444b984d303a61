"""Logging for the commands: every module logs to `logging.getLogger(__name__)`, and a command configures
the root logger once with `setup_logging`, so that the messages of the library (checkpoint loading, list
building, ...) reach the same console and log file as the training loop's.

Rank 0 prints to the console and appends to the log file; the other processes stay silent (their errors
still end the command through `utils.errors.run_main`).
"""
import logging
import os
import sys

LOG_FORMAT = '%(asctime)s %(name)s %(levelname)s: %(message)s'


def setup_logging(log_dir=None, rank=0, filename='log.txt', mode='a'):
    """Configure the root logger for this process: console (and `log_dir/filename`) on rank 0, nothing
    on the other ranks. Replaces the handlers an earlier call installed. Returns the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if rank > 0:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.WARNING)
        return root
    formatter = logging.Formatter(LOG_FORMAT)
    console = logging.StreamHandler(stream=sys.stdout)
    console.setFormatter(formatter)
    root.addHandler(console)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(log_dir, filename), mode=mode)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    return root
