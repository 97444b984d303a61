"""Logging to the console and a file, from the main process only."""
import logging
import os
import sys


def setup_logger(name, save_dir=None, distributed_rank=0, filename='log.txt', mode='a'):
    """A logger that prints on rank 0 (and writes `save_dir/filename` there); silent on other ranks."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if distributed_rank > 0:
        logger.addHandler(logging.NullHandler())
        return logger
    formatter = logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s')
    console = logging.StreamHandler(stream=sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(save_dir, filename), mode=mode)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger
