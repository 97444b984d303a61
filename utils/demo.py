"""`make demo`: the whole HWD story on generated data, on a CPU, in minutes.

1. writes a small Cityscapes-layout data set with dataset/toy.py;
2. trains a teacher (DeepLabV3-ResNet18) with train_baseline.py;
3. trains the same small student (DeepLabV3-MobileNetV2) three ways with the real scripts:
   train_baseline.py, train_cwd.py and train_hwd.py (recommended flags), two processes each under
   torchrun with the gloo backend;
4. evaluates the teacher and the three students with eval.py (its JSON files in outputs/demo/eval/);
5. prints a table (method, mIoU, pixAcc, gain over the baseline) and writes to outputs/demo/ a picture
   image | ground truth | teacher | baseline | CWD | HWD for a few validation images, and a plot of the
   HWD channel weights of one batch.

Every step is skipped when its result is already there, so re-running it is cheap; `--fresh` starts
over. `--smoke` runs every step at the smallest sizes (the tests use it).
"""
import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from dataset import DATASET_INFO, build_dataset
from dataset.toy import make_toy_dataset
from losses import CriterionHWD
from models.model_zoo import load_trained_model
from utils.checkpointing import checkpoint_paths, checkpoint_stem
from utils.errors import StopCommand, run_main
from utils.evaluation import predict
from utils.palette import class_colors, colorize_rgb
from utils.results import file_sha256
from utils.scripts import training_scripts
from utils.visualize import denormalize_image, make_panel, stack_vertically, text_block, weight_bars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Sizes:
    num_train: int
    num_val: int
    image_size: tuple
    crop: str
    batch_size: int
    teacher_iters: int
    student_iters: int
    lr: float
    panels: int


FULL = Sizes(num_train=96, num_val=32, image_size=(96, 192), crop='96,96', batch_size=8,
             teacher_iters=240, student_iters=200, lr=0.02, panels=4)
SMOKE = Sizes(num_train=4, num_val=2, image_size=(48, 96), crop='48,48', batch_size=4,
              teacher_iters=2, student_iters=2, lr=0.01, panels=2)

TEACHER = ('deeplabv3', 'resnet18')
STUDENT = ('deeplabv3_mobile', 'mobile')
# The methods the demo compares, by their scripts' METHOD (utils.scripts finds the scripts).
STUDENT_METHODS = ('baseline', 'cwd', 'hwd')
TITLES = {'baseline': 'Baseline', 'cwd': 'CWD', 'hwd': 'HWD'}


def demo_runs():
    """[(title, TrainingScript, network)]: the teacher first, then the student once per method."""
    scripts = training_scripts()
    runs = [('Teacher', scripts['baseline'], TEACHER)]
    runs += [(TITLES[method], scripts[method], STUDENT) for method in STUDENT_METHODS]
    return runs


RUNS = demo_runs()
# Column titles of comparison.png, in the words of the pictures' header.
COLUMN_TITLES = {'Teacher': 'teacher', 'Baseline': 'baseline'}


class DemoStepFailed(StopCommand):
    """A script the demo runs exited with an error (its message says which)."""

    def describe(self):
        return f'demo: {self}'


def read_json(path):
    """The object in a JSON file, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as handle:
        return json.load(handle)


def say(message):
    print(f'[demo {time.strftime("%H:%M:%S")}] {message}', flush=True)


class Demo:
    def __init__(self, out_dir, sizes, nproc, seed, in_process=False):
        self.out = os.path.abspath(out_dir)
        self.sizes = sizes
        self.nproc = nproc
        self.in_process = in_process
        self.seed = seed
        self.data = os.path.join(self.out, 'data')
        self.ckpt = os.path.join(self.out, 'ckpt')
        self.logs = os.path.join(self.out, 'logs')
        self.eval_dir = os.path.join(self.out, 'eval')
        self.env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1')

    # ---- steps -------------------------------------------------------------------------------
    def make_data(self):
        marker = os.path.join(self.data, '.complete')
        if os.path.exists(marker):
            say(f'data set already at {self.data}')
            return
        s = self.sizes
        say(f'writing a toy Cityscapes data set ({s.num_train} train, {s.num_val} val, '
            f'{s.image_size[0]}x{s.image_size[1]}) to {self.data}')
        shutil.rmtree(self.data, ignore_errors=True)
        make_toy_dataset('citys', self.data, num_train=s.num_train, num_val=s.num_val,
                         size=s.image_size, seed=self.seed)
        with open(marker, 'w') as f:
            f.write('ok\n')

    def checkpoint(self, method, model, backbone):
        """The latest checkpoint the training script writes, by the name training gives it."""
        return checkpoint_paths(self.ckpt, checkpoint_stem(method, model, backbone, 'citys'))['latest']

    def train(self, title, script, net):
        method = script.method
        model, backbone = net
        final = self.checkpoint(method, model, backbone)
        if os.path.exists(final):
            say(f'{title}: checkpoint already at {final}')
            return final
        s = self.sizes
        teacher = title == 'Teacher'
        iters = s.teacher_iters if teacher else s.student_iters
        launcher = [] if self.in_process else ['-m', 'torch.distributed.run', '--standalone',
                                               f'--nproc_per_node={self.nproc}']
        cmd = [sys.executable] + launcher + [script.path, '--dataset', 'citys', '--data', self.data, '--no-cuda',
               '--workers', '1',
               '--crop-size', s.crop, '--batch-size', str(s.batch_size), '--max-iterations', str(iters),
               '--lr', str(s.lr), '--log-iter', str(max(1, iters // 6)), '--skip-val',
               '--save-dir', self.ckpt, '--log-dir', self.logs, '--seed', str(self.seed)]
        if not script.distillation:
            cmd += ['--model', model, '--backbone', backbone, '--pretrained-base', 'None']
        else:
            cmd += ['--teacher-model', TEACHER[0], '--teacher-backbone', TEACHER[1],
                    '--teacher-pretrained', self.checkpoint('baseline', *TEACHER),
                    '--student-model', model, '--student-backbone', backbone,
                    '--student-pretrained-base', 'None']
            cmd += list(script.recommended_flags)
        how = 'in this process' if self.in_process else f'{self.nproc} processes under torchrun'
        say(f'{title}: training {model}/{backbone} with {script.name} for {iters} iterations ({how})')
        self.run(cmd)
        return final

    def evaluate(self, title, method, net, checkpoint):
        """pixAcc and mIoU (percent) from the JSON file eval.py writes; eval.py runs again only when that
        file is missing or was written for another checkpoint (its SHA-256 says which)."""
        model, backbone = net
        name = title.lower()
        result_file = os.path.join(self.eval_dir, f'{model}_{backbone}_citys_{name}_val.json')
        digest = file_sha256(checkpoint)
        record = read_json(result_file)
        if record is None or record.get('sha256') != digest:
            say(f'{title}: evaluating with eval.py')
            cmd = [sys.executable, 'eval.py', '--dataset', 'citys', '--data', self.data, '--no-cuda',
                   '--workers', '0', '--model', model, '--backbone', backbone, '--method', name,
                   '--pretrained', checkpoint, '--save-dir', self.eval_dir]
            output = self.run(cmd, capture=True)
            record = read_json(result_file)
            if record is None or record.get('sha256') != digest:
                raise DemoStepFailed(f'eval.py wrote no results for {title} to {result_file}:\n{output[-3000:]}')
        return {'pixAcc': record['pixAcc'], 'mIoU': record['mIoU']}

    def run(self, cmd, capture=False):
        shown = ' '.join(os.path.relpath(c, REPO) if c.startswith(REPO + os.sep) else c for c in cmd[1:])
        say(f'$ python {shown}')
        if self.in_process:
            return self._run_here(cmd)
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, text=True,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture else None)
        if proc.returncode != 0:
            output = (proc.stdout or '').strip()
            script = next((c for c in cmd if c.endswith('.py')), cmd[0])
            raise DemoStepFailed(f'{script} failed '
                                 f'(exit status {proc.returncode})' + (f':\n{output[-3000:]}' if output else
                                                                       ' (its messages are above)'))
        return proc.stdout or ''

    def _run_here(self, cmd):
        """The command's script called in this process (`--in-process`): its `main` with the command's flags."""
        position = next(i for i, c in enumerate(cmd) if c.endswith('.py'))
        name = os.path.splitext(os.path.basename(cmd[position]))[0]
        module = importlib.import_module(name)
        try:
            module.main(cmd[position + 1:])
        except StopCommand as stop:
            raise DemoStepFailed(f'{name}.py failed: {stop.describe()}') from None
        return ''

    # ---- the story ------------------------------------------------------------------------------
    def table(self, results):
        base = results['Baseline']['mIoU']
        lines = ['| method | network | mIoU (%) | pixAcc (%) | mIoU gain over the baseline |',
                 '|---|---|---:|---:|---:|']
        for title, _, net in RUNS:
            r = results[title]
            gain = '' if title in ('Teacher', 'Baseline') else f'{r["mIoU"] - base:+.3f}'
            lines.append(f'| {title} | {net[0]}/{net[1]} | {r["mIoU"]:.3f} | {r["pixAcc"]:.3f} | {gain} |')
        return '\n'.join(lines)

    def pictures(self, checkpoints):
        torch.set_num_threads(2)
        val = build_dataset('citys', 'val', data_root=self.data)
        nets = {}
        for title, _, net in RUNS:
            nets[title] = load_trained_model(net[0], net[1], val.num_class, checkpoints[title])

        rows = []
        for index in range(min(self.sizes.panels, len(val))):
            image, label, _ = val[index]
            image, label = torch.as_tensor(image), torch.as_tensor(label)
            columns = [('image', denormalize_image(image)), ('ground truth', colorize_rgb(label, 'citys'))]
            with torch.no_grad():
                for title, _, _ in RUNS:
                    prediction = predict(nets[title], image[None]).argmax(1)[0]
                    columns.append((COLUMN_TITLES.get(title, title), colorize_rgb(prediction, 'citys')))
            rows.append(make_panel(columns))
        header = text_block("Toy Cityscapes validation images and the networks' predictions.\n"
                            f'teacher: {TEACHER[0]}/{TEACHER[1]}; baseline, CWD, HWD: the student '
                            f'{STUDENT[0]}/{STUDENT[1]} trained alone, with CWD, with HWD',
                            width=max(row.width for row in rows))
        rows.insert(0, header)
        comparison = os.path.join(self.out, 'comparison.png')
        stack_vertically(rows).save(comparison)

        # The weights HWD gives one validation batch: the HWD-trained student against the teacher.
        batch = min(4, len(val))
        images = torch.stack([torch.as_tensor(val[i][0]) for i in range(batch)])
        labels = torch.stack([torch.as_tensor(val[i][1]) for i in range(batch)])
        criterion = CriterionHWD(norm=True, L='MSE', process='E', parameter=0.1, DivPixel='None',
                                 shift=1.0, activation=True)
        with torch.no_grad():
            weights = criterion.weights(nets['HWD'](images)[0], nets['Teacher'](images)[0], labels)
        info = DATASET_INFO['citys']
        present = np.stack([np.isin(np.arange(info.num_class), np.asarray(label)) for label in labels])
        plot = os.path.join(self.out, 'hwd_weights.png')
        weight_bars(weights.numpy(), info.class_names, class_colors('citys', info.num_class), present,
                    title='HWD channel weights, one validation batch\n(HWD student vs teacher, '
                          'recommended flags)\ndashed: the uniform weight of CWD\ngrey: class absent '
                          'from the image').save(plot)
        return comparison, plot


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=os.path.join(REPO, 'outputs', 'demo'), help='output folder')
    parser.add_argument('--nproc', type=int, default=2, help='processes per training run (torchrun)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--fresh', action='store_true', help='delete earlier demo results first')
    parser.add_argument('--smoke', action='store_true', help='smallest sizes, for the tests')
    parser.add_argument('--in-process', action='store_true',
                        help='call the scripts in this process, one after another, instead of launching them (the '
                             'tests use it with --smoke; --nproc is then 1)')
    args = parser.parse_args(argv)

    if args.nproc < 1:
        parser.error('--nproc must be at least 1')
    return run_demo(args)


def run_demo(args):
    start = time.time()
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    demo = Demo(args.out, SMOKE if args.smoke else FULL, 1 if args.in_process else args.nproc, args.seed,
                in_process=args.in_process)
    demo.make_data()
    checkpoints = {}
    for title, script, net in RUNS:
        checkpoints[title] = demo.train(title, script, net)
    results = {title: demo.evaluate(title, script.method, net, checkpoints[title])
               for title, script, net in RUNS}
    table = demo.table(results)
    comparison, plot = demo.pictures(checkpoints)
    with open(os.path.join(demo.out, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print()
    print(table)
    print()
    say(f'pictures: {comparison} (image | ground truth | teacher | baseline | CWD | HWD), {plot}')
    say(f'done in {time.time() - start:.0f} s; results in {demo.out}')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
