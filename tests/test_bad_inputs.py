"""Bad inputs end in one line naming the flag or file, and the data set check names every bad file: the toy data
set never writes over files it did not write; output folders that are files or not writable (training, eval.py,
dataset.make_lists, with no `.partial` file left); a crop whose batch alone exceeds the memory; running out of
memory during training names --crop-size; a list file with a byte-order mark; a blank line in classes.txt;
--momentum outside [0, 1); a resume file given as a whole-network checkpoint; the default --pretrained-base of
the backbone asked for; --split test hints without labels; --gpu-id without a GPU; `python -m dataset.check`."""
import io
import os
import shutil

import numpy as np
import pytest
import torch
from launch import common
from PIL import Image

from dataset import build_dataset
from dataset.check import main as check_main
from dataset.make_lists import main as make_lists_main
from dataset.toy import TOY_LIST, make_toy_dataset
from dataset.toy import main as toy_main
from utils.errors import UserError, run_main

MOBILE = ['--model', 'psp_mobile', '--backbone', 'mobile', '--pretrained-base', 'None']


@pytest.fixture(scope='module')
def data(toy_root):
    return toy_root('citys', num_train=2, num_val=1, size=(32, 48))


def status_and_error(main, argv):
    """(exit status, stderr) of a command run in this process (argparse's errors go to sys.stderr)."""
    stderr = io.StringIO()
    try:
        status = run_main(main, argv, stderr=stderr)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    return status, stderr.getvalue()


def parse_error(capsys, argv, parse=None):
    """The argparse error line of the baseline script's flags."""
    import train_baseline
    with pytest.raises(SystemExit) as exit_info:
        (parse or train_baseline.parse_args)(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_toy_data_never_overwrites_files_it_did_not_write(tmp_path, capsys):
    root = tmp_path / 'cityscapes'
    real = root / 'leftImg8bit' / 'train' / 'aachen' / 'aachen_000000_000019_leftImg8bit.png'
    real.parent.mkdir(parents=True)
    real.write_bytes(b'a real image')
    status, err = status_and_error(toy_main, ['--root', str(root), '--num-train', '2', '--num-val', '1'])
    assert status == 2 and err.startswith(f'error: {root} (--root) already holds 1 file(s) that the toy data set')
    assert 'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png' in err
    assert real.read_bytes() == b'a real image' and [p for p in root.rglob('*') if p.is_file()] == [real]
    # its own files it may write again (the same data set, or more of it)
    fresh = tmp_path / 'toy'
    make_toy_dataset('citys', fresh, num_train=1, num_val=1, size=(16, 16))
    make_toy_dataset('citys', fresh, num_train=2, num_val=1, size=(16, 16))
    assert len((fresh / TOY_LIST).read_text().splitlines()) == 6
    status, _ = status_and_error(toy_main, ['--root', str(fresh), '--num-train', '-3'])
    assert status == 2 and '--num-train: -3 must be zero or a positive integer' in capsys.readouterr().err


def test_output_folders_that_cannot_be_written(data, tmp_path, capsys, monkeypatch):
    import eval as eval_script
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    base = common(data, tmp_path) + MOBILE
    assert f'--save-dir {a_file} is a file, not a folder' in parse_error(capsys, base + ['--save-dir', str(a_file)])
    assert f'--log-dir {a_file / "logs"}: {a_file} is a file' in parse_error(
        capsys, base + ['--log-dir', str(a_file / 'logs')])
    locked = tmp_path / 'locked'
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    line = parse_error(capsys, base + ['--save-dir', str(locked)])
    assert f'--save-dir {locked} is not writable by this user' in line
    monkeypatch.undo()
    status, err = status_and_error(eval_script.main, ['--no-cuda', '--data', str(data), '--model', 'psp_mobile',
                                                      '--backbone', 'mobile', '--pretrained', str(a_file),
                                                      '--save-dir', str(a_file)])
    assert (status, err) == (2, f'error: --save-dir {a_file} is a file, not a folder: give a folder (it is created '
                                'when missing)\n')
    # dataset.make_lists --out: a folder, or a place no file can be written; no .partial file is left behind
    for out, expected in ((tmp_path, 'is a folder'), (a_file / 'train.txt', 'cannot write the list file')):
        status, err = status_and_error(make_lists_main, ['--dataset', 'citys', '--root', str(data), '--out', str(out)])
        assert status == 2 and err.count('\n') == 1 and expected in err and '(--out)' in err, err
    assert not list(tmp_path.rglob('*.partial'))


def test_crop_too_large_for_memory(data, tmp_path, capsys):
    """Refused before anything is allocated; and running out of memory during training names --crop-size."""
    from utils.distributed import DistContext
    from utils.train_loop import Trainer, is_out_of_memory
    line = parse_error(capsys, common(data, tmp_path) + MOBILE + ['--crop-size', '200000,200000'])
    assert '--crop-size 200000,200000: a micro-batch of 2 such crops alone needs' in line
    trainer = Trainer.__new__(Trainer)
    import train_baseline
    trainer.args, trainer.ctx = train_baseline.parse_args(common(data, tmp_path) + MOBILE), DistContext()

    def failing():
        raise RuntimeError('Caught RuntimeError in DataLoader worker process 0.\n[enforce fail at alloc_cpu.cpp:117] '
                           "data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 96000000 bytes.")
        yield

    batch, error = trainer._next_batches(failing())
    assert batch is None and str(error) == ('out of memory while reading a batch (2 crops of 64x64 per process and '
                                            'micro-batch, on cpu): lower --crop-size or --batch-size, or raise '
                                            '--grad-accum')
    assert is_out_of_memory(torch.OutOfMemoryError('CUDA out of memory')) and not is_out_of_memory(RuntimeError('x'))


def test_list_with_a_byte_order_mark_and_classes_with_a_blank_line(data, tmp_path):
    listed = tmp_path / 'train.lst'
    lines = [f'{os.path.relpath(f["img"], data)}\t{os.path.relpath(f["label"], data)}'
             for f in build_dataset('citys', 'train', data_root=data).files]
    listed.write_text('\n'.join(lines) + '\n', encoding='utf-8-sig')
    assert len(build_dataset('citys', 'train', data_root=data, list_path=str(listed))) == 2
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'classes.txt').write_text('\ufeffroad\n\ncar\n\n', encoding='utf-8')
    with pytest.raises(UserError, match=rf'line 2 of {folder / "classes.txt"} is blank: every line names one class'):
        build_dataset('folder', 'train', data_root=folder)
    (folder / 'classes.txt').write_text('\ufeffroad\ncar\n\n', encoding='utf-8')  # blank lines at the end are fine
    from dataset import dataset_info
    assert dataset_info('folder', folder).class_names == ['road', 'car']


def test_flag_messages(data, tmp_path, capsys):
    import train_kd
    base = common(data, tmp_path) + MOBILE
    for value in ('1', '-0.1', '1.5'):
        assert f'argument --momentum: {float(value)} must be in [0, 1)' in parse_error(capsys, base + ['--momentum',
                                                                                                        value])
    # the default --pretrained-base is the ImageNet file of the backbone asked for
    line = parse_error(capsys, common(data, tmp_path) + ['--model', 'psp_mobile', '--backbone', 'mobile'])
    assert 'error: --pretrained-base ./pretrained/mobilenetv2-imagenet.pth: no such file (the default for ' \
           '--backbone mobile;' in line
    # a resume file as a whole-network checkpoint gives its student's weights
    from models.model_zoo import get_segmentation_model
    net = get_segmentation_model('psp_mobile', 'mobile', 19, False)
    resume = tmp_path / 'kd_resume.pth'
    torch.save({'format': 'hwd-resume-v3', 'iteration': 3, 'student': net.state_dict(), 'optimizer': {}}, resume)
    args = train_kd.parse_args(common(data, tmp_path) + [
        '--teacher-model', 'psp_mobile', '--teacher-backbone', 'mobile', '--teacher-pretrained', str(resume),
        '--student-model', 'psp_mobile', '--student-backbone', 'mobile', '--student-pretrained-base', 'None'])
    from models.checkpoint import read_state_dict
    assert args.teacher_pretrained == str(resume)
    loaded = read_state_dict(resume)
    assert loaded.keys() == net.state_dict().keys()


def test_hints_and_warnings(tmp_path):
    from types import SimpleNamespace

    from utils.distributed import cpu_fallback_warning
    empty = tmp_path / 'cityscapes'
    empty.mkdir()
    with pytest.raises(UserError, match=r'leftImg8bit/test/<city>/\*_leftImg8bit\.png\)$'):
        build_dataset('citys', 'test', data_root=empty, list_path=str(tmp_path / 'none.lst'))
    cpu = torch.device('cpu')
    assert cpu_fallback_warning(SimpleNamespace(gpu_id='0,1', no_cuda=False), cpu) == (
        '--gpu-id 0,1: no GPU is available here (torch.cuda.is_available() is False); the run uses the CPU')
    assert cpu_fallback_warning(SimpleNamespace(gpu_id=None, no_cuda=False), cpu) is None


@pytest.mark.parametrize('name', ['voc', 'camvid', 'ade20k', 'coco', 'folder'])
def test_dataset_check_reads_every_layout(name, toy_root, tmp_path, capsys):
    if name == 'folder':
        root = tmp_path
        (root / 'classes.txt').write_text('a\nb\n')
        for split in ('train', 'val'):
            for folder, value in (('images', 90), ('labels', 1)):
                (root / folder / split).mkdir(parents=True)
                Image.fromarray(np.full((8, 8, 3) if folder == 'images' else (8, 8), value, np.uint8)).save(
                    root / folder / split / 'x.png')
    else:
        root = toy_root(name, num_train=2, num_val=1, size=(16, 24))
    assert run_main(check_main, ['--dataset', name, '--data', str(root), '--workers', '0']) == 0
    assert f'sample(s) of {name} (train val) checked' in capsys.readouterr().out


def test_dataset_check_names_every_bad_file(data, tmp_path, capsys):
    root = tmp_path / 'data'
    shutil.copytree(data, root)
    assert run_main(check_main, ['--dataset', 'citys', '--data', str(root), '--workers', '0']) == 0
    assert '3 sample(s) of citys (train val) checked' in capsys.readouterr().out
    images = sorted((root / 'leftImg8bit').rglob('*.png'))
    labels = sorted((root / 'gtFine').rglob('*.png'))
    images[0].write_bytes(images[0].read_bytes()[:100])                                    # truncated
    Image.fromarray(np.full((32, 48), 200, np.uint8)).save(labels[1])                      # 200: no labelId
    Image.fromarray(np.full((16, 48), 7, np.uint8)).save(labels[2])                        # another size
    stderr = io.StringIO()
    assert run_main(check_main, ['--dataset', 'citys', '--data', str(root), '--workers', '1'], stderr=stderr) == 1
    out = capsys.readouterr().out
    assert f'image {images[0]} cannot be decoded' in out
    assert f'label {labels[1]} holds values [200]' in out
    assert f'its label {labels[2]} is 48x16' in out
    assert stderr.getvalue() == '3 problem(s) in 3 sample(s) of citys (train val); each is named above\n'
