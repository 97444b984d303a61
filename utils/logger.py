"""Logging to the console and a file, from the main process only."""
import logging
import os
import sys

# Loggers of the library code (models: checkpoint loading; dataset: list building). A script's logger
# shares its handlers with them, so their messages reach the same console and log file.
LIBRARY_LOGGERS = ('hwd', 'dataset')


def _reset(logger, handlers):
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        logger.addHandler(handler)


def setup_logger(name, save_dir=None, distributed_rank=0, filename='log.txt', mode='a'):
    """A logger that prints on rank 0 (and writes `save_dir/filename` there); silent on other ranks.
    The library loggers (LIBRARY_LOGGERS) are routed to the same place."""
    if distributed_rank > 0:
        handlers = [logging.NullHandler()]
    else:
        formatter = logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s')
        console = logging.StreamHandler(stream=sys.stdout)
        console.setFormatter(formatter)
        handlers = [console]
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            file_handler = logging.FileHandler(os.path.join(save_dir, filename), mode=mode)
            file_handler.setFormatter(formatter)
            handlers.append(file_handler)
    logger = logging.getLogger(name)
    _reset(logger, handlers)
    for library in LIBRARY_LOGGERS:
        if library != name:
            _reset(logging.getLogger(library), handlers)
    return logger
