"""Distillation between networks of different families, with every training script, and a short training run of
each family of the model zoo.

Every distillation script that utils.scripts lists runs once in this process (no launcher: the scripts' own
`main`), two iterations on the generated Cityscapes data, from a teacher of one family into a student of another:
a SegFormer teacher (logits and features at 1/4) into a CNN student (1/8), or a CNN teacher into a SegFormer
student. The methods' modules take their sizes from what the networks state, the losses bring the student's maps
to the teacher's size, and the runs write their checkpoints, histories (with the teacher's check) and resume
files; eval.py reads a trained SegFormer student back.
"""
import importlib
import json
import math
import re

import pytest
import torch
from launch import common, load, log_lines

import eval as eval_script
from models.model_zoo import describe_network, get_segmentation_model
from utils.scripts import training_scripts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

SEGFORMER = ('segformer', 'MiT_B0')
CNN_TEACHER = ('deeplabv3_mobile', 'mobile')
# The CNN students, one family after another.
CNN_STUDENTS = [('psp_mobile', 'mobilenetv3_small'), ('deeplab_mobile', 'mobilevit_xx_small'),
                ('upernet_lite', 'resnet18'), ('deeplabv3_mobilenet_ssseg', 'mobilenetv2_ssseg')]
DISTILLATION = [script for script in training_scripts().values() if script.distillation]


def pair_for(index, script):
    """(teacher, student): a SegFormer teacher into a CNN student, or a CNN teacher into a SegFormer student,
    alternately; methods with a smallest crop take the teacher that needs the smaller one (a discriminator:
    the SegFormer teacher, whose 1/4 logits need half the crop; Af-DCD: the CNN, whose last stage is at 1/8)."""
    if script.min_crop:
        # the teacher that needs the smaller crop, with the cheapest student of the other family
        needs = {teacher: script.smallest_crop(describe_network(*teacher, 19)) for teacher in (SEGFORMER, CNN_TEACHER)}
        teacher = min(needs, key=needs.get)
        return (SEGFORMER, CNN_STUDENTS[0]) if teacher == SEGFORMER else (CNN_TEACHER, SEGFORMER)
    cnn = CNN_STUDENTS[index % len(CNN_STUDENTS)]
    if index % 2 == 0:
        return SEGFORMER, cnn
    return CNN_TEACHER, SEGFORMER


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
    root = toy_root('citys', num_train=4, num_val=2, size=(64, 96))
    work = tmp_path_factory.mktemp('cross')
    torch.manual_seed(0)
    teachers = {}
    for model, backbone in (SEGFORMER, CNN_TEACHER):
        path = work / f'{model}_{backbone}.pth'
        torch.save(get_segmentation_model(model, backbone, 19, False).state_dict(), path)
        teachers[(model, backbone)] = str(path)
    return {'data': root, 'teachers': teachers}


def run_script(method, argv):
    return importlib.import_module(f'train_{method}').main(argv)


@pytest.mark.parametrize('index,script', list(enumerate(DISTILLATION)), ids=[s.method for s in DISTILLATION])
def test_every_method_distils_across_families(setup, tmp_path, index, script):
    teacher, student = pair_for(index, script)
    t_spec, s_spec = describe_network(*teacher, 19), describe_network(*student, 19)
    assert t_spec.output_stride != s_spec.output_stride  # another family, another stride
    crop = max(64, script.smallest_crop(t_spec))
    argv = common(setup['data'], tmp_path, batch=2, iters=2, log_iter=1, val_per_iters=2) + [
        '--crop-size', f'{crop},{crop}',
        '--teacher-model', teacher[0], '--teacher-backbone', teacher[1],
        '--teacher-pretrained', setup['teachers'][teacher],
        '--student-model', student[0], '--student-backbone', student[1], '--student-pretrained-base', 'None']
    argv += list(script.quick_flags) + list(script.recommended_flags)
    if script.method == 'cwd':
        argv += ['--lambda-feat', '1.0']  # the feature term too: an adapter from the student's channels
    run_script(script.method, argv)
    stem = f'{script.method}_{student[0]}_{student[1]}_citys'
    lines = log_lines(tmp_path / 'logs' / f'{stem}_log.txt')
    assert [int(m.group(1)) for m in lines] == [1, 2]
    values = [float(v) for m in lines for v in re.findall(r'Loss: (-?\d+\.\d+)', m.group(0))]
    assert values and all(math.isfinite(v) for v in values)
    history = [json.loads(line) for line in (tmp_path / 'logs' / f'{stem}_history.jsonl').read_text().splitlines()]
    record = history[-1]
    assert set(record['losses']) - {'Task Loss'}, 'the method logged no term of its own'
    assert all(math.isfinite(v) for v in record['losses'].values())
    assert 'teacher' in record and record['seconds_per_iteration'] > 0
    resume = load(tmp_path / 'ckpt' / f'{stem}_resume.pth')
    # modules that map the student's features (Af-DCD: last stages) to the teacher's are sized from the networks
    widths = ((t_spec.stage_channels[-1], s_spec.stage_channels[-1]) if script.method == 'afdcd'
              else (t_spec.feature_channels, s_spec.feature_channels))
    for key, value in resume['method_state'].items():
        if key in ('adapter.0.weight', 'criterion.align.weight', 'memory.project_head.0.weight',
                   'fitnet.conv.weight', 'channel.project_head.0.weight'):
            assert tuple(value.shape[:2]) == widths, key
    if student == SEGFORMER:
        # the trained student is read back by eval.py
        out = tmp_path / 'eval'
        eval_script.main(['--no-cuda', '--workers', '0', '--dataset', 'citys', '--data', str(setup['data']),
                          '--model', student[0], '--backbone', student[1], '--method', script.method,
                          '--pretrained', str(tmp_path / 'ckpt' / f'{stem}.pth'), '--save-dir', str(out)])
        result = json.loads((out / f'{student[0]}_{student[1]}_citys_{script.method}_val.json').read_text())
        assert result['images'] == 2 and len(result['IoU']) == 19


# (model, backbone, extra flags): one short baseline run per family, with the family's optimizer.
FAMILIES = [
    ('segformer', 'MiT_B0', ['--optimizer', 'adamw', '--lr', '2e-4', '--head-lr-mult', '10',
                             '--no-decay-norm-bias']),
    ('psp_mobile', 'mobilenetv3_small', []),
    ('deeplab_mobile', 'mobilevit_xx_small', ['--optimizer', 'adamw', '--lr', '9e-4', '--weight-decay', '0.01']),
    ('upernet_lite', 'resnet18', []),
    ('deeplabv3', 'resnet18', ['--head-width', '512']),
]


@pytest.mark.parametrize('model,backbone,extra', FAMILIES, ids=[f'{m}-{b}' for m, b, _ in FAMILIES])
def test_every_family_trains(setup, tmp_path, model, backbone, extra):
    argv = common(setup['data'], tmp_path, batch=2, iters=2, log_iter=1, val_per_iters=2) + [
        '--model', model, '--backbone', backbone, '--pretrained-base', 'None'] + extra
    student = run_script('baseline', argv)
    stem = f'baseline_{model}_{backbone}_citys'
    flags = json.loads((tmp_path / 'logs' / f'{stem}_flags.json').read_text())
    groups = {group['name']: group for group in flags['parameter_groups']}
    if '--head-lr-mult' in extra:
        assert groups['student head']['lr_mult'] == 10 and groups['student (no decay)']['weight_decay'] == 0
        resume = load(tmp_path / 'ckpt' / f'{stem}_resume.pth')
        lrs = {group['name']: group['lr'] for group in resume['optimizer']['param_groups']}
        assert lrs['student head'] == pytest.approx(10 * lrs['student'])
        assert 'exp_avg' in next(iter(resume['optimizer']['state'].values()))  # AdamW's state
    else:
        assert list(groups) == ['student']
    assert student.spec().feature_channels == (512 if '--head-width' in extra else student.feature_channels)
    # the checkpoint loads back by name alone (the head width is read from it)
    back = get_segmentation_model(model, backbone, 19, backbone.startswith('resnet'),
                                  pretrained=str(tmp_path / 'ckpt' / f'{stem}.pth'))
    assert back.spec() == student.spec()


def test_every_loss_brings_the_student_to_the_teachers_size():
    """A student map at 1/4 (SegFormer) against a teacher's at 1/8: each loss equals the loss of the student's map
    resized by hand (bilinear, align_corners=False: at 2x, the mean of each 2x2 block); the teacher's map is never
    changed; a student at 1/8 against a teacher at 1/4 is upsampled the same way."""
    import torch.nn.functional as F

    from losses import (
        CriterionCWD,
        CriterionDIST,
        CriterionHWD,
        CriterionIFV,
        CriterionKD,
        CriterionMGD,
        CriterionMiniBatchCrossImagePair,
        CriterionPairWise,
    )
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 5, (2, 64, 64), generator=generator)
    for s_size, t_size in ((16, 8), (8, 16)):
        student = torch.randn(2, 5, s_size, s_size, generator=generator, dtype=torch.float64)
        teacher = torch.randn(2, 5, t_size, t_size, generator=generator, dtype=torch.float64)
        by_hand = F.interpolate(student, size=(t_size, t_size), mode='bilinear', align_corners=False)
        if s_size == 2 * t_size:
            assert torch.allclose(by_hand, F.avg_pool2d(student, 2))
        mgd = CriterionMGD(5, 5).double()
        mask = torch.ones(2, 1, t_size, t_size, dtype=torch.float64)
        cases = [(CriterionCWD(), ()), (CriterionKD(), ()), (CriterionDIST(), ()), (CriterionPairWise(), ()),
                 (CriterionHWD(activation=True, shift=1.0), (labels,)), (CriterionIFV(5), (labels,)),
                 (CriterionMiniBatchCrossImagePair(), ()), (lambda s, t, mgd=mgd, mask=mask: mgd(s, t, mask=mask), ())]
        for loss, extra in cases:
            kept = teacher.clone()
            assert torch.allclose(loss(student, teacher, *extra), loss(by_hand, teacher, *extra)), loss
            assert torch.equal(teacher, kept)
