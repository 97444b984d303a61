"""Every flag a user sets reaches what the run computes: a changed value changes a logged term, the loss, the sample
order, the weights or the optimizer's settings. One table says, for each flag, two values and what must differ.

- **A method's own flags** (`METHOD_ROWS`; the argument group a script adds to the shared parser): the script's
  `main` runs with its `run_training` replaced, which hands back the parsed flags and the `build_method` the
  script would train with; the method is built from what a tiny student and teacher state (`Networks` of
  `NetworkSpec`s, no weights) and computes its terms once on fixed random outputs and labels (`method_values`).
  The observable is a key of what it computes: a term its forward returns ('KD Loss'), a term its own optimizer
  logs ('Adv_D Loss'), `lr of <optimizer>` (the lr its own optimizer starts from), `lr_mult of <group>` /
  `weight_decay of <group>` (the groups it adds to the student's optimizer). With `scales=True` the flag is a
  weight: the term must be proportional to it and every other value must stay as it was (a script that passes
  one lambda to two terms fails).
- **The shared flags** (`SHARED_ROWS`; utils/options.py): in-process runs of a script (a tiny student on the toy
  data, stopped as soon as the row's observable is recorded), observed through wrappers of the loop
  (`run_values`): 'sample order' (the indices the sampler draws), 'sample seeds' (their augmentation seeds),
  'initial weights', 'optimizer' (its class and, per parameter, the settings of its group), 'first batch' (the
  image shapes of the first iteration's micro-batches), 'dropout seed' / 'method seeds' (the seeds of torch's
  generator and of the method's generators for the first micro-batch), 'first loss' (its logged terms),
  'first learning rates' / 'second learning rates' (per parameter, after iteration 1 / 2) and 'trained weights'
  (after the whole run).
  Shared flags without a row are in `SHARED_FLAGS_WITHOUT_ROW` with the reason (no effect on what is computed,
  or the test that covers them).

Guards keep the table complete: every method flag of every script that utils/scripts.py lists, and every shared
flag, needs a row (or an entry with its reason), and a row naming a flag that does not exist fails.

**To cover a new script** `train_new.py`: add `Row('new', '--flag', a, b, 'Its Loss')` to `METHOD_ROWS` for each
flag of its argument group (`scales=True` for a weight; `a` usually the default) and run this file: the guard
names any flag left. The script's `QUICK_FLAGS` come first on the command line, a row's value last (argparse
keeps the last); crops are `max(64, MIN_CROP)`; a method with `uses_stages` gets the backbone stages. A value
`None` leaves the flag out, `True` gives a switch alone, `{student}` / `{teacher}` / `{other_teacher}` name
checkpoint files made by the `files` fixture. A flag that cannot take two working values (SKD's
`--adv-conv-dim`: only 64) goes to `METHOD_FLAGS_WITHOUT_ROW` with the reason. A new observable: a key of what
`compute_method_values` returns, or of what `_recording_patches` records (with its stage in `RUN_STAGES`).
"""
import argparse
import contextlib
import importlib
import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn as nn
from launch import common

from models.checkpoint import CLASSIFIER_KEYS
from models.model_zoo import describe_network, get_segmentation_model
from models.segmentation import SegmentationOutput
from utils.options import build_parser
from utils.scripts import training_scripts
from utils.train_build import Networks
from utils.train_loop import Trainer
from utils.train_step import Stepper

pytestmark = pytest.mark.usefixtures('one_thread')

SCRIPTS = training_scripts()
NUM_CLASS = 19
STUDENT = ('psp_mobile', 'mobilenetv3_small')  # the cheapest network to train
# The method rows' teacher (its spec only): other stages than the student's, four of them, and an aux head.
TEACHER = ('deeplabv3', 'resnet18')
BATCH = 2


@dataclass(frozen=True)
class Row:
    """`flag` of `train_<script>.py` set to `a`, then to `b`, changes `observable` (see the module docstring)."""
    script: str
    flag: str
    a: object
    b: object
    observable: str
    scales: bool = False
    extra: tuple = ()  # flags the row needs set besides its own (a temperature of a term off by default)

    @property
    def id(self):
        return f'{self.script}:{self.flag}:{self.observable}'


def adversarial_rows(script, feature_flag, feature_term):
    """SKD and IFVD: KD, their feature term, the adversarial terms and the discriminator's own optimizer."""
    return [
        Row(script, '--lambda-kd', '1.0', '2.0', 'KD Loss', scales=True),
        Row(script, feature_flag, '10.0', '4.0', feature_term, scales=True),
        Row(script, '--lambda-adv', '0.001', '0.01', 'Adv_G Loss', scales=True),
        Row(script, '--lambda-d', '0.1', '0.3', 'Adv_D Loss', scales=True),
        Row(script, '--lr-d', '4e-4', '1e-3', 'lr of discriminator'),
        Row(script, '--preprocess-GAN-mode', '1', '2', 'Adv_G Loss'),
    ]


METHOD_ROWS = [
    Row('hwd', '--lambda-hwd', '3.0', '1.5', 'HWD Loss', scales=True),
    Row('hwd', '--temperature', '4.0', '2.0', 'HWD Loss'),
    Row('hwd', '--L', 'MSE', 'L1', 'HWD Loss'),
    Row('hwd', '--process', 'E', 'T', 'HWD Loss'),
    Row('hwd', '--activation', None, True, 'HWD Loss'),
    Row('hwd', '--parameter', '0.1', '0.5', 'HWD Loss'),
    Row('hwd', '--shift', '0.0', '1.0', 'HWD Loss'),
    Row('hwd', '--DivPixel', 'None', 'N', 'HWD Loss'),
    Row('cwd', '--lambda-logit', '3.0', '1.0', 'Logit Loss', scales=True),
    Row('cwd', '--lambda-feat', '1.0', '2.0', 'Feat Loss', scales=True),
    Row('cwd', '--temperature', '4.0', '2.0', 'Logit Loss'),
    Row('kd', '--lambda-kd', '1.0', '2.5', 'KD Loss', scales=True),
    Row('kd', '--kd-temperature', '1.0', '2.0', 'KD Loss'),
    Row('dist', '--lambda-dist', '1.0', '2.0', 'DIST Loss', scales=True),
    Row('dist', '--dist-beta', '1.0', '2.0', 'DIST Loss'),
    Row('dist', '--dist-gamma', '1.0', '2.0', 'DIST Loss'),
    Row('mgd', '--alpha-mgd', '2e-5', '1e-4', 'MGD Loss', scales=True),
    Row('mgd', '--lambda-mgd', '0.75', '0.5', 'MGD Loss'),
    *adversarial_rows('skd', '--lambda-pa', 'PairWise Loss'),
    *adversarial_rows('ifvd', '--lambda-ifv', 'IFV Loss'),
    Row('cirkd', '--lambda-kd', '1.0', '2.0', 'KD Loss', scales=True),
    Row('cirkd', '--kd-temperature', '1.0', '2.0', 'KD Loss'),
    Row('cirkd', '--lambda-minibatch-pixel', '1.0', '2.0', 'Mini-batch p2p Loss', scales=True),
    Row('cirkd', '--contrast-temperature', '0.1', '0.2', 'Mini-batch p2p Loss'),
    Row('cirkd', '--lambda-memory-pixel', '0.1', '0.3', 'Memory p2p Loss', scales=True),
    Row('cirkd', '--lambda-memory-region', '0.1', '0.3', 'Memory p2r Loss', scales=True),
    Row('cirkd', '--contrast-kd-temperature', '1.0', '2.0', 'Memory p2p Loss'),
    Row('cirkd', '--pixel-memory-size', '64', '128', 'Memory p2p Loss'),
    Row('cirkd', '--pixel-contrast-size', '190', '380', 'Memory p2p Loss'),
    Row('cirkd', '--region-memory-size', '8', '16', 'Memory p2r Loss'),
    Row('cirkd', '--region-contrast-size', '38', '76', 'Memory p2r Loss'),
    Row('at', '--lambda-kd', '1.0', '2.0', 'KD Loss', scales=True),
    Row('at', '--kd-temperature', '1.0', '2.0', 'KD Loss'),
    Row('at', '--lambda-at', '10000', '5000', 'AT Loss', scales=True),
    Row('fitnet', '--lambda-kd', '1.0', '2.0', 'KD Loss', scales=True),
    Row('fitnet', '--kd-temperature', '1.0', '2.0', 'KD Loss'),
    Row('fitnet', '--lambda-fitnet', '10', '5', 'FitNet Loss', scales=True),
    Row('dsd', '--lambda-psd', '1000', '500', 'PSD Loss', scales=True),
    Row('dsd', '--lambda-csd', '10', '5', 'CSD Loss', scales=True),
    Row('dsd', '--csd-temperature', '4.0', '2.0', 'CSD Loss'),
    Row('dsd', '--lambda-kd', '1.0', '2.0', 'KD Loss', scales=True),
    Row('dsd', '--kd-temperature', '1.0', '2.0', 'KD Loss', extra=('--lambda-kd', '1.0')),
    Row('cirkdv2', '--lambda-kd', '1.0', '2.0', 'KD Loss', scales=True),
    Row('cirkdv2', '--kd-temperature', '1.0', '2.0', 'KD Loss'),
    Row('cirkdv2', '--lambda-fitnet', '1.0', '2.0', 'FitNet Loss', scales=True),
    Row('cirkdv2', '--gcn', None, False, 'FitNet Loss'),
    Row('cirkdv2', '--lambda-minibatch-pixel', '1.0', '2.0', 'Mini-batch p2p Loss', scales=True),
    Row('cirkdv2', '--contrast-temperature', '0.1', '0.2', 'Batch c2c Loss'),
    Row('cirkdv2', '--lambda-memory-pixel', '0.1', '0.3', 'Memory p2p Loss', scales=True),
    Row('cirkdv2', '--lambda-memory-region', '0.1', '0.3', 'Memory p2r Loss', scales=True),
    Row('cirkdv2', '--contrast-kd-temperature', '1.0', '2.0', 'Memory c2c Loss'),
    Row('cirkdv2', '--pixel-memory-size', '64', '128', 'Memory p2p Loss'),
    Row('cirkdv2', '--pixel-contrast-size', '190', '380', 'Memory p2p Loss'),
    Row('cirkdv2', '--region-memory-size', '8', '16', 'Memory p2r Loss'),
    Row('cirkdv2', '--region-contrast-size', '38', '76', 'Memory p2r Loss'),
    Row('cirkdv2', '--lambda-minibatch-channel', '1.0', '2.0', 'Batch c2c Loss', scales=True),
    Row('cirkdv2', '--lambda-memory-channel', '0.1', '0.3', 'Memory c2c Loss', scales=True),
    Row('cirkdv2', '--lambda-channel-kd', '100', '50', 'Channel MSE Loss', scales=True),
    Row('cirkdv2', '--channel-memory-size', '512', '1024', 'Memory c2c Loss'),
    Row('cirkdv2', '--channel-contrast-size', '64', '128', 'Memory c2c Loss'),
    Row('afdcd', '--lambda-kd', '1.0', '2.0', 'KD Loss', scales=True),
    Row('afdcd', '--kd-temperature', '1.0', '2.0', 'KD Loss'),
    Row('afdcd', '--lambda-fd', '4e-5', '8e-5', 'FD Loss', scales=True),
    Row('afdcd', '--lambda-ctr', '0.001', '0.002', 'CTR Loss', scales=True),
    Row('afdcd', '--mask-ratio', '0.75', '0.5', 'FD Loss'),
    Row('afdcd', '--rand-mask', None, False, 'FD Loss'),
    Row('afdcd', '--enhance-projector', None, True, 'FD Loss'),
]

METHOD_FLAGS_WITHOUT_ROW = {
    ('skd', '--adv-conv-dim'): 'only 64 is accepted (tests/test_methods.py: another width is refused)',
    ('ifvd', '--adv-conv-dim'): 'only 64 is accepted (tests/test_methods.py: another width is refused)',
}

SHARED_ROWS = [
    Row('baseline', '--seed', '0', '1', 'sample order'),
    Row('baseline', '--seed', '0', '1', 'sample seeds'),
    Row('baseline', '--seed', '0', '1', 'initial weights'),
    Row('baseline', '--seed', '0', '1', 'dropout seed'),
    Row('mgd', '--seed', '0', '1', 'method seeds'),
    Row('baseline', '--lr', '0.01', '0.05', 'first learning rates'),
    Row('baseline', '--max-iterations', '2', '3', 'second learning rates'),
    Row('baseline', '--batch-size', '4', '2', 'first batch'),
    Row('baseline', '--grad-accum', '1', '2', 'first batch'),
    Row('baseline', '--crop-size', '32,32', '48,48', 'first batch'),
    Row('baseline', '--momentum', '0.9', '0.5', 'optimizer'),
    Row('baseline', '--weight-decay', '1e-4', '1e-2', 'optimizer'),
    Row('baseline', '--optimizer', 'sgd', 'adamw', 'optimizer'),
    Row('baseline', '--no-decay-norm-bias', None, True, 'optimizer'),
    Row('baseline', '--head-lr-mult', '1', '10', 'first learning rates'),
    Row('baseline', '--pretrained', 'None', '{student}', 'initial weights'),
    Row('baseline', '--pretrained-base', 'None', '{student}', 'initial weights'),
    Row('kd', '--teacher-pretrained', '{teacher}', '{other_teacher}', 'first loss'),
]

SHARED_FLAGS_WITHOUT_ROW = {
    '--dataset': 'picks the data set: tests/test_data.py, tests/test_camvid.py, tests/test_folder.py',
    '--data': 'the data root: every run of the tests passes it',
    '--workers': 'must not change the result: tests/test_resume.py compares 0 and 2 loader workers',
    '--ignore-label': 'the value ignored pixels get, which the loss skips whatever it is',
    '--amp': 'GPUs only (ignored on the CPU): tests/test_gpu_check.py',
    '--save-dir': 'where files go: tests/test_train.py',
    '--log-dir': 'where files go: tests/test_train.py',
    '--log-iter': 'when log lines are written: tests/test_train.py',
    '--save-per-iters': 'when the resume file is written: tests/test_resume.py',
    '--val-per-iters': 'when the run validates: tests/test_train.py, tests/test_resume.py',
    '--skip-val': 'no validation: tests/test_train.py (no best checkpoint)',
    '--resume': 'tests/test_resume.py',
    '--overwrite': 'what happens to an earlier run\'s files: tests/test_run_safety.py',
    '--gpu-id': 'GPUs only: tests/test_gpu_check.py',
    '--no-cuda': 'every run of the tests passes it',
    '--local_rank': 'set by torch.distributed.launch: tests/test_train.py',
    '--model': 'names the network: tests/test_cross_family.py',
    '--backbone': 'names the network: tests/test_cross_family.py',
    '--head-width': 'tests/test_cross_family.py (a 512-wide DeepLabV3 head)',
    '--teacher-model': 'names the network: tests/test_cross_family.py',
    '--teacher-backbone': 'names the network: tests/test_cross_family.py',
    '--teacher-pretrained-base': 'accepted for compatibility; the teacher is read from --teacher-pretrained',
    '--student-model': 'names the network: tests/test_cross_family.py',
    '--student-backbone': 'names the network: tests/test_cross_family.py',
    '--student-pretrained-base': "the same code as --pretrained-base (utils.options.student_names)",
    '--student-pretrained': "the same code as --pretrained (utils.options.student_names)",
    '--student-head-width': 'the same code as --head-width (utils.options.student_names)',
}

# ---------------------------------------------------------------- the parsers

class _Parsed(Exception):
    pass


def script_parser(method):
    """The argparse parser of `train_<method>.py`, caught on its first `parse_args` call."""
    module = importlib.import_module(f'train_{method}')
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, 'parse_args', catch), contextlib.suppress(_Parsed):
        module.parse_args([])
    return caught[0]


def long_flags(parser):
    """The flags of a parser by their long spelling (the first one starting with --), help left out."""
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags.add(next(option for option in action.option_strings if option.startswith('--')))
    return flags


def shared_flags(distillation):
    return long_flags(build_parser('shared', distillation=distillation))


def method_flags(method):
    """The flags a script adds to the shared parser."""
    return long_flags(script_parser(method)) - shared_flags(SCRIPTS[method].distillation)


def test_every_method_flag_has_a_row():
    missing = []
    for method in SCRIPTS:
        covered = {row.flag for row in METHOD_ROWS if row.script == method}
        exempt = {flag for script, flag in METHOD_FLAGS_WITHOUT_ROW if script == method}
        missing += [f'train_{method}.py {flag}' for flag in sorted(method_flags(method) - covered - exempt)]
    assert not missing, ('flags without a row in tests/test_flags.py (add Row(script, flag, a, b, observable) to '
                         f'METHOD_ROWS, see its docstring): {", ".join(missing)}')


def test_every_shared_flag_has_a_row_or_a_reason():
    flags = shared_flags(True) | shared_flags(False)
    covered = {row.flag for row in SHARED_ROWS}
    missing = sorted(flags - covered - set(SHARED_FLAGS_WITHOUT_ROW))
    assert not missing, f'shared flags without a row or a reason in tests/test_flags.py: {", ".join(missing)}'
    assert not set(SHARED_FLAGS_WITHOUT_ROW) - flags, 'reasons given for flags that no longer exist'


def test_no_row_names_a_flag_that_does_not_exist():
    stale = [row.id for row in METHOD_ROWS if row.script not in SCRIPTS or row.flag not in method_flags(row.script)]
    stale += [f'{script}:{flag}' for script, flag in METHOD_FLAGS_WITHOUT_ROW
              if script not in SCRIPTS or flag not in method_flags(script)]
    stale += [row.id for row in SHARED_ROWS
              if row.flag not in shared_flags(SCRIPTS[row.script].distillation)]
    assert not stale, f'rows for flags that do not exist: {", ".join(stale)}'


# ---------------------------------------------------------------- values of a method

@pytest.fixture(scope='module')
def files(toy_root, tmp_path_factory):
    """The toy data and the checkpoint files a row's value may name ({student}, {teacher}, {other_teacher}: three
    draws of the student's network), and a file that holds only a classifier's rows (`classes_only`)."""
    work = tmp_path_factory.mktemp('flags')
    torch.manual_seed(5)
    student = work / 'student.pth'
    torch.save(get_segmentation_model(*STUDENT, NUM_CLASS, False).state_dict(), student)
    teacher = work / 'teacher.pth'
    torch.save(get_segmentation_model(*STUDENT, NUM_CLASS, False).state_dict(), teacher)
    other_teacher = work / 'other_teacher.pth'
    torch.save(get_segmentation_model(*STUDENT, NUM_CLASS, False).state_dict(), other_teacher)
    # parse_args reads only the class count of a teacher file: the method rows' teacher is this
    classes_only = work / 'classes_only.pth'
    torch.save({CLASSIFIER_KEYS[0]: torch.zeros(NUM_CLASS, 1, 1, 1)}, classes_only)
    return {'data': toy_root('citys', num_train=4, num_val=2, size=(64, 96)), 'student': str(student),
            'teacher': str(teacher), 'other_teacher': str(other_teacher), 'classes_only': str(classes_only),
            'work': work}


def flag_argv(flag, value, files):
    if value is None:
        return []
    if value is True:
        return [flag]
    if value is False:  # the negative form of a --flag / --no-flag switch
        return ['--no-' + flag[2:]]
    return [flag, str(value).format(**files)]


def fake_outputs(spec, size, generator, stages):
    """Random outputs of the shapes a network of `spec` gives for `size` x `size` images (`stages`: with the
    backbone's stages, for a method that asks for them)."""
    def rand(channels, stride):
        return 3 * torch.randn(BATCH, channels, size // stride, size // stride, generator=generator)
    aux = rand(spec.num_class, spec.output_stride) if spec.has_aux else None
    stage_maps = None
    if stages:
        stage_maps = [rand(channels, stride) for channels, stride in zip(spec.stage_channels, spec.stage_strides,
                                                                          strict=True)]
    return SegmentationOutput(rand(spec.num_class, spec.output_stride), rand(spec.feature_channels, spec.output_stride),
                              aux, stage_maps)


def captured_build_method(method, argv):
    """(parsed flags, the `build_method`) that `train_<method>.py`'s main hands to the training loop."""
    module = importlib.import_module(f'train_{method}')
    captured = []
    with mock.patch.object(module, 'run_training', lambda args, name, build=None: captured.append((args, build))):
        module.main(argv)
    assert captured and captured[0][1] is not None, f'train_{method}.py did not hand a build_method to the loop'
    return captured[0]


METHOD_CACHE = {}


def method_values(method, argv):
    """{name: value} that the method built from `argv` computes on fixed random outputs (see the docstring); cached
    by the parsed flags (a row's first value is usually the default)."""
    args, build = captured_build_method(method, argv)
    key = (method, repr(sorted(vars(args).items())))
    if key not in METHOD_CACHE:
        METHOD_CACHE[key] = compute_method_values(method, args, build)
    return METHOD_CACHE[key]


def compute_method_values(method, args, build):
    """The values of `method_values`: the method built for the networks the flags name, on outputs of their shapes."""
    student = describe_network(args.student_model, args.student_backbone, NUM_CLASS)
    teacher = describe_network(args.teacher_model, args.teacher_backbone, NUM_CLASS, aux=True)
    torch.manual_seed(0)  # the method's modules start alike for both values
    built = build(Networks(student, teacher, NUM_CLASS, torch.device('cpu'), nn.BatchNorm2d))
    if built is None:
        return {}
    for generator, _ in built.generators().values():
        generator.manual_seed(1)
    size = max(64, SCRIPTS[method].min_crop)
    generator = torch.Generator().manual_seed(2)
    s_outputs = fake_outputs(student, size, generator, built.uses_stages)
    t_outputs = fake_outputs(teacher, size, generator, built.uses_stages)
    labels = torch.randint(-1, NUM_CLASS, (BATCH, size, size), generator=generator)
    torch.manual_seed(3)
    with torch.no_grad():
        values = {name: value.item() for name, value in built(s_outputs, t_outputs, labels).items()}
        for name, own in built.own_optimizers().items():
            _, logged = built.own_loss(name, s_outputs.detach(), t_outputs, labels)
            values.update((key, value.item()) for key, value in logged.items())
            values[f'lr of {name}'] = own.lr
    for group in built.param_groups():
        values[f'lr_mult of {group.get("name")}'] = group.get('lr_mult', 1.0)
        if 'weight_decay' in group:
            values[f'weight_decay of {group.get("name")}'] = group['weight_decay']
    return values


def method_argv(method, files):
    script = SCRIPTS[method]
    crop = max(64, script.min_crop)
    return ['--no-cuda', '--data', str(files['data']), '--crop-size', f'{crop},{crop}',
            # the file is only checked for its class count here: the method sees the teacher's spec
            '--teacher-model', TEACHER[0], '--teacher-backbone', TEACHER[1], '--teacher-pretrained',
            files['classes_only'], '--student-model', STUDENT[0], '--student-backbone', STUDENT[1],
            '--student-pretrained-base', 'None',
            '--save-dir', str(files['work'] / 'ckpt'), '--log-dir', str(files['work'] / 'logs'),
            *script.quick_flags]


@pytest.mark.parametrize('row', METHOD_ROWS, ids=[row.id for row in METHOD_ROWS])
def test_method_flag_changes_its_term(files, row):
    base = method_argv(row.script, files) + list(row.extra)
    a = method_values(row.script, base + flag_argv(row.flag, row.a, files))
    b = method_values(row.script, base + flag_argv(row.flag, row.b, files))
    assert row.observable in a and row.observable in b, (
        f'{row.observable!r} is not among what train_{row.script}.py computes: {sorted(a)}')
    assert all(math.isfinite(v) for v in (a[row.observable], b[row.observable]) if v is not None)
    if row.scales:
        ratio = float(row.b) / float(row.a)
        assert b[row.observable] == pytest.approx(a[row.observable] * ratio, rel=1e-6), row.id
        others = {key: value for key, value in a.items() if key != row.observable}
        assert {key: b[key] for key in others} == pytest.approx(others, rel=1e-9), f'{row.flag} moved another term'
    else:
        assert b[row.observable] != pytest.approx(a[row.observable], rel=1e-6, abs=0), \
            f'train_{row.script}.py: {row.flag} {row.a} and {row.b} give the same {row.observable}'


# ---------------------------------------------------------------- values of a run

# How far a run goes for each observable: 0 set-up, 1 the first step's input, 2 its output, 3 the second step's
# output, 4 the whole run.
RUN_STAGES = {'sample order': 0, 'sample seeds': 0, 'initial weights': 0, 'optimizer': 0, 'first batch': 1,
              'dropout seed': 2, 'method seeds': 2, 'first loss': 2, 'first learning rates': 2,
              'second learning rates': 3, 'trained weights': 4}


class _Enough(Exception):
    """Stops a run once what a row observes is recorded."""


def per_parameter(optimizer, names):
    """{parameter name: the settings of its group} (lr, momentum, weight decay, ...: what the optimizer applies to
    it, whatever the groups are called or how they are split)."""
    return {names[id(param)]: {key: value for key, value in group.items() if key not in ('params', 'name', 'lr_mult')}
            for group in optimizer.param_groups for param in group['params']}


def _recording_patches(values, stop_stage):
    """Wrappers of the loop's set-up and step that note what a run computes, and stop it at `stop_stage`."""
    build_loaders, step, seed_micro_batch = Trainer._build_loaders, Stepper.step, Stepper.seed_micro_batch

    def record_loaders(trainer):
        build_loaders(trainer)
        pairs = list(trainer.train_loader.sampler)
        values['sample order'] = [index for index, _ in pairs]
        values['sample seeds'] = [seed for _, seed in pairs]
        values['initial weights'] = {k: v.clone() for k, v in trainer.student.state_dict().items()}
        optimizer = trainer.built.optimizer
        values['names'] = {id(param): name for name, param in trainer.built.step_module.named_parameters()}
        values['optimizer'] = (type(optimizer).__name__, per_parameter(optimizer, values['names']))
        if stop_stage == 0:
            raise _Enough

    def record_step(stepper, micro_batches, iteration, seed=True):
        if iteration == 1:
            values['first batch'] = [tuple(images.shape) for images, _, _ in micro_batches]
            if stop_stage == 1:
                raise _Enough
        terms = step(stepper, micro_batches, iteration, seed)
        learning_rates = {name: settings['lr'] for name, settings in
                          per_parameter(stepper.optimizer, values['names']).items()}
        if iteration <= 2:
            values[('first', 'second')[iteration - 1] + ' learning rates'] = learning_rates
        if iteration == 1:
            values['first loss'] = {name: value.item() for name, value in terms.items()}
        if stop_stage == iteration + 1:
            raise _Enough
        return terms

    def record_seeds(stepper, iteration, position):
        seed_micro_batch(stepper, iteration, position)
        if iteration == 1 and position == 0:
            values['dropout seed'] = torch.initial_seed()
            generators = stepper.method.generators() if stepper.method is not None else {}
            values['method seeds'] = {name: generator.initial_seed() for name, (generator, _) in generators.items()}

    return [mock.patch.object(Trainer, '_build_loaders', record_loaders),
            mock.patch.object(Stepper, 'step', record_step),
            mock.patch.object(Stepper, 'seed_micro_batch', record_seeds)]


RUN_CACHE = {}


def run_values(method, argv, observable):
    """What an in-process run of `train_<method>.py` with `argv` computes, up to what `observable` needs (cached:
    rows share their first value)."""
    stage = RUN_STAGES[observable]
    key = (method, tuple(argv))
    if key not in RUN_CACHE or RUN_CACHE[key][0] < stage:
        values = {}
        with contextlib.ExitStack() as stack:
            for patch in _recording_patches(values, stage):
                stack.enter_context(patch)
            with contextlib.suppress(_Enough):
                student = importlib.import_module(f'train_{method}').main(argv)
                values['trained weights'] = {k: v.clone() for k, v in student.state_dict().items()}
        RUN_CACHE[key] = (stage, values)
    return RUN_CACHE[key][1]


def same(a, b):
    """Equal values: nested dicts, tensors bit for bit, anything else by ==."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def run_argv(method, files):
    """Two iterations of batch 4 at 32 x 32 of the cheapest student (and the same network as the teacher)."""
    argv = common(files['data'], files['work'] / 'runs', batch=4, iters=2, skip_val=True, log_iter=2) + [
        '--crop-size', '32,32']
    if not SCRIPTS[method].distillation:
        return argv + ['--model', STUDENT[0], '--backbone', STUDENT[1], '--pretrained-base', 'None']
    return argv + ['--student-model', STUDENT[0], '--student-backbone', STUDENT[1], '--student-pretrained-base', 'None',
                   '--teacher-model', STUDENT[0], '--teacher-backbone', STUDENT[1], '--teacher-pretrained',
                   files['teacher']]


@pytest.mark.parametrize('row', SHARED_ROWS, ids=[row.id for row in SHARED_ROWS])
def test_shared_flag_changes_the_run(files, row):
    base = run_argv(row.script, files)
    a = run_values(row.script, base + flag_argv(row.flag, row.a, files), row.observable)
    b = run_values(row.script, base + flag_argv(row.flag, row.b, files), row.observable)
    assert not same(a[row.observable], b[row.observable]), \
        f'train_{row.script}.py: {row.flag} {row.a} and {row.b} give the same {row.observable}'


def test_the_first_iteration_takes_the_batch_in_its_micro_batches(files):
    """--batch-size images in --grad-accum micro-batches (the runs of the rows above, from the cache)."""
    base = run_argv('baseline', files)
    for extra, shapes in ((['--grad-accum', '1'], [(4, 3, 32, 32)]), (['--grad-accum', '2'], [(2, 3, 32, 32)] * 2),
                          (['--batch-size', '2'], [(2, 3, 32, 32)])):
        assert run_values('baseline', base + extra, 'first batch')['first batch'] == shapes, extra
