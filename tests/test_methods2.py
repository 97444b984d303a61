"""The scripts of CIRKDv2's and Af-DCD's methods (AT, FitNet, DSD, CIRKDv2, Af-DCD) beyond their losses (tested
against the originals in tests/test_at_fitnet_dsd_gcn_afdcd.py and tests/test_cirkdv2_losses.py) and the runs
every script gets (tests/test_cross_family.py, the exact two-process resume of CIRKDv2 and Af-DCD in
tests/test_resume.py): what each method builds from the networks, the fixes of the originals' wiring, and the
refusals at argument time.
"""
import pytest
import torch

import train_afdcd
import train_cirkdv2
import train_dsd
from bench.table import build_script_step
from models.model_zoo import describe_network
from models.segmentation import SegmentationOutput
from utils.scripts import training_scripts
from utils.train_build import Networks

CLASSES = 19


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
    from models.model_zoo import get_segmentation_model
    root = toy_root('citys', num_train=2, num_val=1, size=(64, 96))
    work = tmp_path_factory.mktemp('methods2')
    torch.manual_seed(0)
    teacher = work / 'deeplabv3_resnet18.pth'  # a teacher with an aux head
    torch.save(get_segmentation_model('deeplabv3', 'resnet18', CLASSES, True).state_dict(), teacher)
    return {'data': str(root), 'teacher': str(teacher), 'work': work}


def argv(setup, tmp_path, student=('deeplab_mobile', 'mobile'), crop=64, extra=()):
    return ['--no-cuda', '--data', setup['data'], '--crop-size', f'{crop},{crop}', '--workers', '0',
            '--batch-size', '2', '--max-iterations', '2', '--save-dir', str(tmp_path / 'ckpt'),
            '--log-dir', str(tmp_path / 'logs'), '--teacher-model', 'deeplabv3', '--teacher-backbone', 'resnet18',
            '--teacher-pretrained', setup['teacher'], '--student-model', student[0],
            '--student-backbone', student[1], '--student-pretrained-base', 'None', *extra]


def outputs(spec, size, aux, generator):
    """Random SegmentationOutputs of a network of this spec, at `size`, the student's with gradients."""
    def draw(channels):
        return torch.randn(2, channels, *size, generator=generator, dtype=torch.float64).requires_grad_()
    return SegmentationOutput(draw(CLASSES), draw(spec.feature_channels), aux=draw(CLASSES) if aux else None)


@pytest.mark.parametrize('student_aux', [False, True])
def test_dsd_list_never_holds_one_map_twice(setup, student_aux):
    """The original gave a student without an aux head the list [logits, feature, logits]: the logits then
    receive exactly zero PSD gradient. Here such a student compares [feature, logits] (one pair), and a student
    with an aux head [aux, feature, logits] (three pairs) when the teacher has one too."""
    student = ('deeplabv3', 'resnet18') if student_aux else ('deeplab_mobile', 'mobile')
    args = train_dsd.parse_args(argv(setup, setup['work'], student, extra=['--lambda-csd', '0']))
    s_spec = describe_network(*student, CLASSES, student_aux)
    t_spec = describe_network('deeplabv3', 'resnet18', CLASSES, True)
    method = train_dsd.build_method(args, Networks(s_spec, t_spec, CLASSES, torch.device('cpu')))
    assert method.with_aux == student_aux
    generator = torch.Generator().manual_seed(0)
    s_out, t_out = outputs(s_spec, (8, 8), student_aux, generator), outputs(t_spec, (8, 8), True, generator)
    terms = method(s_out, t_out, None)
    assert set(terms) == {'PSD Loss'}
    terms['PSD Loss'].backward()
    for name in ('logits', 'features') + (('aux',) if student_aux else ()):
        grad = getattr(s_out, name).grad
        assert grad is not None and grad.abs().max() > 1e-8, name


def test_afdcd_clips_its_loss_module_gradient(setup, tmp_path):
    """The loss module's gradient is clipped to L2 norm 15 before the step (the original's clip_grad_norm_), the
    student's is not."""
    script = training_scripts()['afdcd']
    _, built = build_script_step(script, argv(setup, tmp_path, crop=128, extra=['--lambda-fd', '1e3']))
    criterion = built.method.criterion
    seen = {}
    step = built.optimizer.step

    def spy(*args, **kwargs):
        seen['module'] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in criterion.parameters()]))
        seen['student'] = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in built.step_module.student.parameters() if p.grad is not None]))
        return step(*args, **kwargs)

    built.optimizer.step = spy
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=generator)
    labels = torch.randint(0, CLASSES, (2, 128, 128), generator=generator)
    terms = built.stepper.step([(images, labels, None)], 1, seed=False)
    assert set(terms) == {'Task Loss', 'KD Loss', 'FD Loss', 'CTR Loss'}
    assert seen['module'] == pytest.approx(15.0, rel=1e-4)  # the weighted sum's gradient is far above 15
    assert seen['student'] > 15.0


def test_afdcd_distils_the_last_stages(setup):
    """The align convolution maps the student's last stage (MobileNetV2: 320 channels) to the teacher's
    (ResNet-18: 512), not the head features."""
    args = train_afdcd.parse_args(argv(setup, setup['work'], crop=128))
    s_spec = describe_network('deeplab_mobile', 'mobile', CLASSES)
    t_spec = describe_network('deeplabv3', 'resnet18', CLASSES, True)
    method = train_afdcd.build_method(args, Networks(s_spec, t_spec, CLASSES, torch.device('cpu')))
    assert method.uses_stages
    assert method.criterion.align.weight.shape[:2] == (512, 320)
    assert method.criterion.rand_mask and method.criterion.mask_ratio == 0.75
    assert set(method.generators()) == {'afdcd_mask'}


def test_cirkdv2_modules_from_the_networks_and_the_crop(setup):
    args = train_cirkdv2.parse_args(argv(setup, setup['work'], crop=96))
    s_spec = describe_network('deeplab_mobile', 'mobile', CLASSES)
    t_spec = describe_network('deeplabv3', 'resnet18', CLASSES, True)
    method = train_cirkdv2.CIRKDv2Distillation(args, Networks(s_spec, t_spec, CLASSES, torch.device('cpu')))
    # the teacher's feature at 96 x 96 is 12 x 12, pooled 3 x 3: the channel memory's rows have 9 entries
    assert method.channel.teacher_channel_queue.shape == (10000, 9)
    assert method.gcn is not None and method.fitnet.conv.weight.shape[:2] == (t_spec.feature_channels, 128)
    assert set(method.generators()) == {'cirkdv2_memory', 'cirkdv2_channel'}
    segformer = train_cirkdv2.parse_args(argv(setup, setup['work'], ('segformer', 'MiT_B0'), crop=96))
    assert not train_cirkdv2.uses_gcn(segformer)  # as CIRKDv2's SegFormer script
    assert train_cirkdv2.uses_gcn(train_cirkdv2.parse_args(argv(setup, setup['work'], ('segformer', 'MiT_B0'),
                                                                 crop=96, extra=['--gcn'])))


@pytest.mark.parametrize('module,extra,fragment', [
    (train_afdcd, ['--crop-size', '96,96'], 'too small for one 4 x 4 patch'),
    (train_cirkdv2, ['--channel-memory-size', '100'], '--channel-memory-size 100: at least 256'),
    (train_cirkdv2, ['--channel-memory-size', '300', '--channel-contrast-size', '400'], '--channel-contrast-size'),
    (train_cirkdv2, ['--gcn', '--lambda-fitnet', '0'], '--gcn'),
    (train_afdcd, ['--mask-ratio', '1.5'], '--mask-ratio'),
])
def test_refused_at_argument_time(setup, tmp_path, capsys, module, extra, fragment):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv(setup, tmp_path, crop=128) + extra)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / 'ckpt').exists()
