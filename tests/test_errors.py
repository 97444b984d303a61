"""User errors reach the user as one line naming what to fix, also when raised in a DataLoader worker."""
import os
import subprocess
import sys

from dataset.toy import make_toy_dataset
from utils.errors import UserError, user_message

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_message_of_a_plain_error():
    assert user_message(UserError('set DATA_CS in settings.py')) == 'error: set DATA_CS in settings.py'


def test_user_message_unwraps_an_error_reraised_from_a_worker():
    folded = ('Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n'
              '  File "x.py", line 1, in f\n    raise DataError(...)\n'
              'dataset.errors.DataError: image a.png cannot be decoded')

    class DataError(UserError):
        pass

    assert user_message(DataError(folded)) == 'error: image a.png cannot be decoded'


def test_corrupt_training_image_read_by_a_worker_is_one_clear_line(tmp_path):
    root = make_toy_dataset('citys', tmp_path / 'data', num_train=2, num_val=1, size=(48, 96), seed=1)
    image = sorted((root / 'leftImg8bit' / 'train').rglob('*.png'))[0]
    image.write_bytes(image.read_bytes()[:200])  # truncated PNG
    proc = subprocess.run(
        [sys.executable, 'train_baseline.py', '--no-cuda', '--data', str(root), '--pretrained-base', 'None',
         '--batch-size', '2', '--crop-size', '48,48', '--max-iterations', '2', '--workers', '1', '--skip-val',
         '--save-dir', str(tmp_path / 'ckpt'), '--log-dir', str(tmp_path / 'logs')],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: image ') and image.name in last and 'cannot be decoded' in last
