"""The distillation scripts of the original's other methods (KD, DIST, MGD, SKD, IFVD, CIRKD): two-process runs
of the methods whose state must stay equal on every process, refusals at argument time and the defaults.

Every script runs once in tests/test_cross_family.py (one process, across network families). Here CIRKD (its
class memories) and SKD (its discriminator, the same on both ranks) run under torchrun with two processes
(gloo, CPU) on the generated Cityscapes data: CIRKD with a teacher and a student of different feature widths
(deeplabv3/resnet50: 256 channels, psp_mobile: 128), SKD from a SegFormer teacher, whose logits at 1/4 let the
discriminator see 64 x 64 maps from 256 x 256 crops. A wrapper script (test-only) dumps, on every rank, the
trained student and the method's state.
"""
import json
import os
import textwrap

import pytest
import torch
from launch import PYTHON, REPO, common, load, log_lines, must_succeed, run_ranks, script

from dataset.class_names import CITYSCAPES_CLASSES

pytestmark = pytest.mark.slow

STUDENT = ['--student-model', 'psp_mobile', '--student-backbone', 'mobile', '--student-pretrained-base', 'None']
SMALL_MEMORY = ['--pixel-memory-size', '64', '--region-memory-size', '8', '--pixel-contrast-size', '190',
                '--region-contrast-size', '38']


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
    from models.model_zoo import get_segmentation_model
    root = toy_root('citys', num_train=4, num_val=2, size=(64, 96))
    work = tmp_path_factory.mktemp('methods')
    torch.manual_seed(0)
    wide = work / 'deeplabv3_resnet50.pth'  # untrained: the teacher check must warn
    torch.save(get_segmentation_model('deeplabv3', 'resnet50', 19, True).state_dict(), wide)
    mobile = work / 'deeplabv3_mobile.pth'
    torch.save(get_segmentation_model('deeplabv3_mobile', 'mobile', 19, True).state_dict(), mobile)
    segformer = work / 'segformer.pth'
    torch.save(get_segmentation_model('segformer', 'MiT_B0', 19, False).state_dict(), segformer)
    dump = work / 'dump_ranks.py'
    dump.write_text(textwrap.dedent(f'''
        import os, sys, runpy, torch
        sys.path.insert(0, {REPO!r})
        from utils import train_loop
        original = train_loop.Trainer.train
        def train(self):
            student = original(self)
            method = self.built.method.state_dict() if self.built.method is not None else {{}}
            torch.save({{'student': self.student.state_dict(), 'method': method}},
                       os.path.join(os.environ['DUMP_DIR'], 'rank%s.pth' % os.environ['RANK']))
            return student
        train_loop.Trainer.train = train
        script = sys.argv.pop(1)
        runpy.run_path(script, run_name='__main__')
    '''))
    return {'data': root, 'wide': str(wide), 'mobile': str(mobile), 'segformer': str(segformer), 'dump': str(dump)}


def teacher(setup, kind='wide'):
    if kind == 'wide':
        return ['--teacher-model', 'deeplabv3', '--teacher-backbone', 'resnet50', '--teacher-pretrained', setup['wide']]
    if kind == 'segformer':
        return ['--teacher-model', 'segformer', '--teacher-backbone', 'MiT_B0', '--teacher-pretrained',
                setup['segformer']]
    return ['--teacher-model', 'deeplabv3_mobile', '--teacher-backbone', 'mobile',
            '--teacher-pretrained', setup['mobile']]


def run_two_processes(setup, tmp_path, name, args):
    proc = run_ranks([PYTHON, setup['dump'], script(f'train_{name}.py')] + args, tmp_path, DUMP_DIR=str(tmp_path))
    must_succeed(proc)
    ranks = [load(tmp_path / f'rank{r}.pth') for r in (0, 1)]
    # DDP keeps the students' parameters equal (each rank's BatchNorm statistics are its own on the CPU until
    # the next forward broadcasts rank 0's)
    for key, value in ranks[0]['student'].items():
        if not is_bn_statistic(key):
            assert torch.equal(value, ranks[1]['student'][key]), key
    return ranks


def is_bn_statistic(key):
    return key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))


def stem_of(name):
    return f'{name}_psp_mobile_mobile_citys'


@pytest.mark.parametrize('name,terms,extra', [
    ('cirkd', ['KD Loss', 'Mini-batch p2p Loss', 'Memory p2p Loss', 'Memory p2r Loss'], SMALL_MEMORY),
])
def test_scripts_two_processes_different_widths(setup, tmp_path, name, terms, extra):
    args = common(setup['data'], tmp_path, batch=4, iters=3, log_iter=1, val_per_iters=3) + teacher(setup) \
        + STUDENT + extra
    ranks = run_two_processes(setup, tmp_path, name, args)
    stem = stem_of(name)
    log = tmp_path / 'logs' / f'{stem}_log.txt'
    lines = log_lines(log)
    assert [int(m.group(1)) for m in lines] == [1, 2, 3]
    for term in terms:
        assert all(f'|| {term}: ' in m.group(0) for m in lines), term
    text = log.read_text()
    # the teacher check: evaluated once, logged, and an untrained teacher is called out
    assert text.count('Teacher validation pixAcc') == 1 and 'the teacher scores near chance' in text
    history = [json.loads(line) for line in (tmp_path / 'logs' / f'{stem}_history.jsonl').read_text().splitlines()]
    assert [record['iteration'] for record in history] == [3]
    assert set(history[0]['losses']) == {'Task Loss', *terms} and 'teacher' in history[0]
    assert list(history[0]['IoU']) == list(CITYSCAPES_CLASSES)
    present = [value for value in history[0]['IoU'].values() if value is not None]
    assert present and history[0]['mIoU'] == pytest.approx(sum(present) / len(present), abs=1e-5)
    flags = json.loads((tmp_path / 'ckpt' / f'{stem}_flags.json').read_text())
    assert flags['method'] == name and flags['flags']['max_iterations'] == 3
    resume = load(tmp_path / 'ckpt' / f'{stem}_resume.pth')
    assert resume['method'] == name and resume['iteration'] == 3
    if name == 'mgd':
        # the generator sized from the networks (128 -> 256) is trained with the student and saved
        assert resume['method_state']['criterion.align.weight'].shape == (256, 128, 1, 1)
        assert set(resume['generators']) == {'mgd'}
        assert torch.equal(ranks[0]['method']['criterion.align.weight'], ranks[1]['method']['criterion.align.weight'])
    if name == 'cirkd':
        memory = {key: value for key, value in resume['method_state'].items() if key.startswith('memory.')}
        assert memory['memory.teacher_pixel_queue'].shape == (19, 64, 256)
        assert memory['memory.project_head.0.weight'].shape == (256, 128, 1, 1)
        # the queues agree on both ranks by construction (nothing broadcasts them) and moved from their start
        for key in ('teacher_pixel_queue', 'pixel_queue_ptr', 'teacher_segment_queue', 'segment_queue_ptr'):
            assert torch.equal(ranks[0]['method'][f'memory.{key}'], ranks[1]['method'][f'memory.{key}']), key
            assert torch.equal(ranks[0]['method'][f'memory.{key}'], resume['method_state'][f'memory.{key}']), key
        assert int(resume['method_state']['memory.segment_queue_ptr'].sum()) > 0


# two iterations of SKD (the discriminator's schedule) from a SegFormer teacher at 256 x 256 crops
@pytest.mark.parametrize('name,feature_term,iters', [('skd', 'PairWise Loss', 2)])
def test_adversarial_scripts_two_processes(setup, tmp_path, name, feature_term, iters):
    args = common(setup['data'], tmp_path, batch=4, iters=iters, log_iter=1, skip_val=True) \
        + teacher(setup, 'segformer') + STUDENT + ['--crop-size', '256,256', '--lr-d', '1e-3']
    ranks = run_two_processes(setup, tmp_path, name, args)
    stem = stem_of(name)
    lines = log_lines(tmp_path / 'logs' / f'{stem}_log.txt')
    assert [int(m.group(1)) for m in lines] == list(range(1, iters + 1))
    for term in ('KD Loss', feature_term, 'Adv_G Loss', 'Adv_D Loss'):
        assert all(f'|| {term}: ' in m.group(0) for m in lines), term
    resume = load(tmp_path / 'ckpt' / f'{stem}_resume.pth')
    d_state = {k: v for k, v in resume['method_state'].items() if k.startswith('discriminator.')}
    assert 'discriminator.l1.0.module.weight_bar' in d_state and 'discriminator.attn1.gamma' in d_state
    # the discriminator's own Adam: its state and its place in the schedule are saved
    adam = resume['own_optimizers']['discriminator']
    assert adam['param_groups'][0]['betas'] == (0.9, 0.99) and adam['param_groups'][0]['weight_decay'] == 0
    assert adam['param_groups'][0]['lr'] == pytest.approx(1e-3 * (1 - (iters - 1) / iters) ** 0.9)
    assert adam['state'] and all(int(s['step']) == iters for s in adam['state'].values())
    # the student's SGD never holds the discriminator's parameters
    sgd_params = sum(len(group['params']) for group in resume['optimizer']['param_groups'])
    assert sgd_params == len([k for k in ranks[0]['student'] if not is_bn_statistic(k)])
    # both ranks trained the same discriminator (averaged gradients, the same power iterations)
    for key in ('discriminator.l1.0.module.weight_bar', 'discriminator.l1.0.module.weight_u'):
        assert torch.equal(ranks[0]['method'][key], ranks[1]['method'][key]), key
    assert not torch.equal(ranks[0]['method']['discriminator.attn2.gamma'], torch.zeros(1))


REFUSALS = [
    ('skd', ['--crop-size', '256,512'], '--crop-size'),
    ('ifvd', ['--crop-size', '512,480'], '--crop-size'),
    ('skd', ['--crop-size', '512,512', '--adv-conv-dim', '32'], '--adv-conv-dim'),
    ('ifvd', ['--crop-size', '512,512', '--preprocess-GAN-mode', '4'], '--preprocess-GAN-mode'),
    ('skd', ['--crop-size', '512,512', '--lr-d', '0'], '--lr-d'),
    ('cirkd', ['--pixel-memory-size', '15'], '--pixel-memory-size'),
    ('cirkd', ['--region-memory-size', '0'], '--region-memory-size'),
    ('cirkd', ['--pixel-memory-size', '16', '--pixel-contrast-size', '4096'], '--pixel-contrast-size'),
    ('cirkd', ['--contrast-temperature', '0'], '--contrast-temperature'),
    ('mgd', ['--lambda-mgd', '1.5'], '--lambda-mgd'),
    ('kd', ['--kd-temperature', '-1'], '--kd-temperature'),
    ('dist', ['--lambda-dist', '-1'], '--lambda-dist'),
]


@pytest.mark.parametrize('name,extra,fragment', REFUSALS, ids=[f'{n}:{" ".join(e)}' for n, e, _ in REFUSALS])
def test_refused_at_argument_time(setup, tmp_path, capsys, name, extra, fragment):
    import importlib
    module = importlib.import_module(f'train_{name}')
    argv = common(setup['data'], tmp_path) + teacher(setup, 'mobile') + STUDENT + extra
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'error:' in err and fragment in err, err
    assert not (tmp_path / 'ckpt').exists() and not (tmp_path / 'logs').exists()


def test_defaults_are_the_originals(setup, tmp_path):
    import train_cirkd
    import train_dist
    import train_ifvd
    import train_kd
    import train_mgd
    import train_skd
    base = common(setup['data'], tmp_path) + teacher(setup, 'mobile') + STUDENT
    big = base + ['--crop-size', '512,512']
    skd = vars(train_skd.parse_args(big))
    assert {k: skd[k] for k in ('lr_d', 'lambda_kd', 'lambda_pa', 'lambda_adv', 'lambda_d', 'adv_conv_dim',
                                'preprocess_GAN_mode')} == dict(lr_d=4e-4, lambda_kd=1.0, lambda_pa=10.0,
                                                                lambda_adv=0.001, lambda_d=0.1, adv_conv_dim=64,
                                                                preprocess_GAN_mode=1)
    assert vars(train_ifvd.parse_args(big))['lambda_ifv'] == 20.0
    cirkd = vars(train_cirkd.parse_args(base))
    assert {k: cirkd[k] for k in ('pixel_memory_size', 'pixel_contrast_size', 'region_memory_size',
                                  'region_contrast_size', 'kd_temperature', 'contrast_kd_temperature',
                                  'contrast_temperature', 'lambda_kd', 'lambda_minibatch_pixel',
                                  'lambda_memory_pixel', 'lambda_memory_region')} == dict(
        pixel_memory_size=20000, pixel_contrast_size=4096, region_memory_size=2000, region_contrast_size=1024,
        kd_temperature=1.0, contrast_kd_temperature=1.0, contrast_temperature=0.1, lambda_kd=1.0,
        lambda_minibatch_pixel=1.0, lambda_memory_pixel=0.1, lambda_memory_region=0.1)
    mgd = vars(train_mgd.parse_args(base))
    assert (mgd['alpha_mgd'], mgd['lambda_mgd']) == (2e-5, 0.75)
    dist = vars(train_dist.parse_args(base))
    assert (dist['lambda_dist'], dist['dist_beta'], dist['dist_gamma']) == (1.0, 1.0, 1.0)
    kd = vars(train_kd.parse_args(base))
    assert (kd['lambda_kd'], kd['kd_temperature']) == (1.0, 1.0)
    assert not os.path.exists(tmp_path / 'ckpt')
