"""CIRKDv2's loss terms: the channel terms against a plain restatement of winycg/CIRKD losses/cirkd_channel.py
(values and gradients, float64 and float32, several forwards, row blocks, another spatial size), the memory's
writes and wrap rule by hand, the random draws, the module's state and invalid settings, two processes
holding the same memory; and CIRKDv2's pooling rule of the mini-batch pixel term."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from assertions import assert_same

import losses.cirkd as cirkd
from losses import CriterionMiniBatchCrossImagePair, LossSettingError, StudentSegChannelContrast
from tests.reference.cirkdv2 import PlainChannelContrast, original_minibatch_pair_loss_v2, pool_4x4

pytestmark = pytest.mark.usefixtures('one_thread')


def random_features(n, c_s, c_t, h, w, dtype=torch.float64, seed=0, student_size=None):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c_s, *(student_size or (h, w)), generator=generator, dtype=dtype).requires_grad_()
    teacher = torch.randn(n, c_t, h, w, generator=generator, dtype=dtype).relu_()
    return student, teacher


def channel_module(s_channels=5, t_channels=4, dim=6, memory=12, contrast=7, update=5, dtype=torch.float64,
                   seed=0, **kwargs):
    """A small StudentSegChannelContrast in `dtype` (head and memory), its BN affine parameters away from 1 and
    0 (so that their gradients say something), its generator seeded with `seed`."""
    torch.manual_seed(seed)
    module = StudentSegChannelContrast(s_channels, t_channels, dim, channel_memory_size=memory,
                                       channel_contrast_size=contrast, update_size=update, **kwargs).to(dtype)
    module.generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.project_head[1].weight.uniform_(0.5, 1.5)
        module.project_head[1].bias.uniform_(-0.5, 0.5)
    return module


def plain_copy(module, seed=0, accumulator_dtype=None):
    """The plain restatement with copies of the module's head and memory, its generator seeded like the
    module's: the same permutations."""
    accumulator = accumulator_dtype or module.teacher_channel_queue.dtype
    return PlainChannelContrast(module, copy.deepcopy(module.project_head), torch.Generator().manual_seed(seed),
                                accumulator)


def assert_same_memory(module, plain, rtol=0.0):
    assert torch.equal(module.channel_queue_ptr, plain.ptr)
    torch.testing.assert_close(module.teacher_channel_queue, plain.queue, rtol=rtol, atol=rtol)


# ---------------------------------------------------------------- the channel terms against the original

# (N, student channels, teacher channels, h, w, memory, contrast, update, kd temperature, temperature) and the
# pointer after each of three forwards: odd sizes (border blocks of the 4 x 4 pooling), one to three images,
# writes that wrap, fewer rows than update_size, fewer contrast rows than memory rows
CHANNEL_CASES = {
    'one image': ((1, 3, 4, 5, 7, 8, 8, 3, 1.0, 0.1), [3, 6, 0]),
    'two images': ((2, 5, 4, 6, 9, 12, 7, 5, 1.0, 0.1), [5, 10, 0]),
    'three images': ((3, 4, 2, 8, 4, 9, 4, 9, 2.0, 0.5), [6, 0, 6]),
}


@pytest.mark.parametrize('case', CHANNEL_CASES)
def test_channel_terms_match_original(case, monkeypatch):
    (n, c_s, c_t, h, w, memory, contrast, update, kd_temperature, temperature), pointers = CHANNEL_CASES[case]
    dim = -(-h // 4) * -(-w // 4)
    module = channel_module(c_s, c_t, dim, memory, contrast, update, contrast_kd_temperature=kd_temperature,
                            contrast_temperature=temperature)
    plain = plain_copy(module)
    if case == 'two images':  # row blocks of 3 rows (8 rows in all: the last block is partial)
        monkeypatch.setattr(cirkd, 'WORKSPACE_BYTES', 3 * n * c_t * 8)
    for step in range(3):  # the memory as it fills and wraps
        student, teacher = random_features(n, c_s, c_t, h, w, seed=step)
        ours = module(student, teacher)
        reference = plain(student, teacher)
        for term, (value, expected) in enumerate(zip(ours, reference, strict=True)):
            assert value.dtype == torch.float64, term  # the inputs' precision, not a float32 accumulator
            assert_same(value, expected, [student, *module.parameters()], 1e-9, [student, *plain.head.parameters()])
        assert_same_memory(module, plain)
        assert module.channel_queue_ptr.tolist() == [pointers[step]]


def test_image_pairs_formed_once_or_by_row_blocks(monkeypatch):
    # The relation over image pairs forms each unordered pair once when an image's block fits the workspace
    # (bands of 1, 2, 3 or all images' columns), by row blocks otherwise: the same value and gradient as
    # the pair loop. 4 images of 3 rows (channels) over 5 positions.
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)
    # the pair loop on 5 x 3 x 1 maps: the rows (channels) as pixels, normalised along the 5 positions
    reference = original_minibatch_pair_loss_v2(student.transpose(1, 2).unsqueeze(-1),
                                                teacher.transpose(1, 2).unsqueeze(-1), 0.5, torch.float64)
    rows_S, rows_T = (F.normalize(x, dim=-1).flatten(0, 1) for x in (student, teacher))
    for workspace in (3 * 3 * 8, 2 * 3 * 3 * 8, 3 * 3 * 3 * 8, 1 << 20, 3 * 3 * 8 - 1):
        monkeypatch.setattr(cirkd, 'WORKSPACE_BYTES', workspace)
        assert_same(cirkd.cross_image_relation_kl(rows_S, rows_T, 4, 0.5), reference, [student], 1e-10)


def test_channel_terms_float32_and_the_original_accumulator():
    # float32 on the CPU: float32 results equal to the original's float32 computation to rounding; the
    # original's float32 accumulator on float64 inputs rounds the float64 mini-batch term
    module = channel_module(dtype=torch.float32)
    plain = plain_copy(module)
    student, teacher = random_features(2, 5, 4, 6, 9, dtype=torch.float32, seed=3)
    for value, expected in zip(module(student, teacher), plain(student, teacher), strict=True):
        assert value.dtype == torch.float32
        assert_same(value, expected, [student, *module.parameters()], 1e-4, [student, *plain.head.parameters()])
    assert_same_memory(module, plain)

    module = channel_module()
    plain = plain_copy(module, accumulator_dtype=torch.float32)
    student, teacher = random_features(2, 5, 4, 6, 9, seed=4)
    batch_c2c = module(student, teacher)[0]
    as_run = plain(student, teacher)[0]
    assert as_run.dtype == torch.float32 and batch_c2c.dtype == torch.float64
    assert batch_c2c.item() == pytest.approx(as_run.item(), rel=1e-6)


def test_channel_terms_across_sizes_and_under_autocast():
    # A student of another output stride (12 x 18 against the teacher's 6 x 9) is resized to the teacher's
    # size first (bilinear): the original applied to the resized map, gradients through the resize.
    module = channel_module()
    plain = plain_copy(module)
    student, teacher = random_features(2, 5, 4, 6, 9, seed=5, student_size=(12, 18))
    resized = F.interpolate(student, size=(6, 9), mode='bilinear', align_corners=False)
    for value, expected in zip(module(student, teacher), plain(resized, teacher), strict=True):
        assert_same(value, expected, [student, *module.parameters()], 1e-9, [student, *plain.head.parameters()])
    assert_same_memory(module, plain)

    # Under autocast the head runs in bfloat16 as autocast decides; the terms are float32 and finite.
    module = channel_module(dtype=torch.float32)
    student, teacher = random_features(2, 5, 4, 6, 9, dtype=torch.float32, seed=6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        terms = module(student, teacher)
    assert all(term.dtype == torch.float32 and torch.isfinite(term) for term in terms)
    sum(terms).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_channel_teacher_gets_no_gradient():
    module = channel_module()
    student, teacher_input = random_features(2, 5, 4, 6, 9, seed=7)
    teacher_layer = nn.Conv2d(4, 4, 1).double()
    sum(module(student, teacher_layer(teacher_input))).backward()
    assert student.grad.abs().sum() > 0 and module.project_head[0].weight.grad.abs().sum() > 0
    assert teacher_layer.weight.grad is None and teacher_layer.bias.grad is None
    assert not module.teacher_channel_queue.requires_grad


# ---------------------------------------------------------------- the memory's writes and draws

def one_hot_teacher(n, channels, first):
    """N x channels x 4 x 64 teacher features whose pooled (1 x 16), L2-normalised row of image i, channel c
    is the basis vector e_b, b = first + i * channels + c: ones on the b-th 4 x 4 block, zeros elsewhere."""
    teacher = torch.zeros(n * channels, 64, dtype=torch.float64)
    for row in range(n * channels):
        block = first + row
        teacher[row, 4 * block:4 * block + 4] = 1.0
    return teacher.reshape(n, channels, 1, 64).repeat(1, 1, 4, 1)


def test_memory_writes_and_wrap_rule_by_hand():
    # Memory of 6 rows, update size 4, 16 pooled positions: the written rows are basis vectors, so the
    # memory says which teacher rows went where. The permutations are those of a generator seeded alike.
    module = channel_module(s_channels=2, t_channels=3, dim=16, memory=6, contrast=6, update=4)
    draws = torch.Generator().manual_seed(0)

    def forward(first, n=2):
        """The basis indices of the rows the forward should write, in order."""
        module(torch.randn(n, 2, 4, 64, dtype=torch.float64), one_hot_teacher(n, 3, first))
        order = torch.randperm(n * 3, generator=draws)  # the enqueue's permutation ...
        torch.randperm(6, generator=draws)  # ... then the contrast rows'
        return (first + order[:min(n * 3, 4)]).tolist()

    def rows(slots):
        return module.teacher_channel_queue[slots].argmax(1).tolist()

    written = forward(0)  # 0 + 4 < 6: slots 0..3, pointer 4
    assert rows(slice(0, 4)) == written and module.channel_queue_ptr.tolist() == [4]
    written = forward(6)  # 4 + 4 >= 6: the last 4 slots (2..5), pointer 0
    assert rows(slice(2, 6)) == written and module.channel_queue_ptr.tolist() == [0]
    written = forward(10, n=1)  # 3 rows < update size: slots 0..2, pointer 3
    assert rows(slice(0, 3)) == written and module.channel_queue_ptr.tolist() == [3]
    torch.testing.assert_close(module.teacher_channel_queue.norm(dim=1), torch.ones(6, dtype=torch.float64))

    # `>=`: a write that ends exactly at the end also goes to the last slots and resets the pointer
    module = channel_module(s_channels=2, t_channels=3, dim=16, memory=8, contrast=8, update=4)
    module(torch.randn(2, 2, 4, 64, dtype=torch.float64), one_hot_teacher(2, 3, 0))
    assert module.channel_queue_ptr.tolist() == [4]
    module(torch.randn(2, 2, 4, 64, dtype=torch.float64), one_hot_teacher(2, 3, 6))
    assert module.channel_queue_ptr.tolist() == [0]
    assert all(6 <= row < 12 for row in rows(slice(4, 8)))


def test_draws_come_from_the_generator():
    # The same seed gives the same memory and terms, another seed another memory; None uses torch's default
    # generator.
    def run(generator_seed=None, global_seed=None):
        module = channel_module(memory=12, contrast=3, update=2)
        if generator_seed is None:
            module.generator = None
            torch.manual_seed(global_seed)
        else:
            module.generator.manual_seed(generator_seed)
        student, teacher = random_features(2, 5, 4, 6, 9, seed=8)
        memory_c2c = [module(student, teacher)[1].item() for _ in range(2)]
        return module.teacher_channel_queue.clone(), memory_c2c

    assert torch.equal(run(5)[0], run(5)[0]) and run(5)[1] == run(5)[1]
    assert not torch.equal(run(5)[0], run(6)[0])
    assert torch.equal(run(global_seed=7)[0], run(global_seed=7)[0])
    assert not torch.equal(run(global_seed=7)[0], run(global_seed=8)[0])


# ---------------------------------------------------------------- the module's state and settings

def test_state_keys_buffers_and_initial_memory():
    torch.manual_seed(3)
    module = StudentSegChannelContrast(6, 8, 10, channel_memory_size=300, channel_contrast_size=5)
    state = module.state_dict()
    assert list(state) == ['teacher_channel_queue', 'channel_queue_ptr', 'project_head.0.weight',
                           'project_head.1.weight', 'project_head.1.bias', 'project_head.1.running_mean',
                           'project_head.1.running_var', 'project_head.1.num_batches_tracked',
                           'project_head.3.weight']
    assert StudentSegChannelContrast.local_buffers == ('teacher_channel_queue', 'channel_queue_ptr')
    assert module.generator is None and module.update_size == 256
    assert state['project_head.0.weight'].shape == (8, 6, 1, 1) and state['project_head.3.weight'].shape == (8, 8, 1, 1)
    assert torch.equal(state['channel_queue_ptr'], torch.zeros(1, dtype=torch.long))
    # Built in the original's order from the global generator: the head, then N(0, 1) rows, L2-normalised.
    torch.manual_seed(3)
    head = nn.Sequential(nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(True),
                         nn.Conv2d(8, 8, 1, bias=False))
    memory = F.normalize(torch.randn(300, 10), p=2, dim=1)
    assert torch.equal(state['project_head.0.weight'], head[0].weight)
    assert torch.equal(state['project_head.3.weight'], head[3].weight)
    torch.testing.assert_close(state['teacher_channel_queue'], memory, rtol=1e-6, atol=1e-7)
    # the norm comes from the caller
    group_norm = StudentSegChannelContrast(2, 3, 4, norm_layer=lambda channels: nn.GroupNorm(1, channels))
    assert isinstance(group_norm.project_head[1], nn.GroupNorm)


@pytest.mark.parametrize('name, value, named', [
    ('update_size', 21, None),  # larger than the memory of 20
    ('channel_memory_size', 7, 'update_size'),  # smaller than the update of 8
    ('channel_contrast_size', 21, None), ('channel_contrast_size', 0, None),
    ('dim', 0, None), ('s_channels', 0, None), ('t_channels', 2.5, None), ('update_size', None, None),
    ('contrast_kd_temperature', 0, None), ('contrast_temperature', float('nan'), None),
])
def test_invalid_settings(name, value, named):
    settings = dict(s_channels=3, t_channels=4, dim=6, channel_memory_size=20, channel_contrast_size=5,
                    update_size=8)
    StudentSegChannelContrast(**settings)  # the base settings are valid
    with pytest.raises(LossSettingError, match=f'^{named or name} '):
        StudentSegChannelContrast(**{**settings, name: value})


def test_invalid_inputs_and_generator():
    module = channel_module()  # dim 6: 5..8 x 9..12 features
    student, teacher = random_features(2, 5, 4, 6, 9)
    with pytest.raises(ValueError, match=r'^dim is 6, but features of 9 x 9 pool .* = 9 positions'):
        module(torch.randn(2, 5, 9, 9, dtype=torch.float64), torch.randn(2, 4, 9, 9, dtype=torch.float64))
    for bad_student, bad_teacher in ((student[:, :4], teacher), (student, teacher[:, :3]), (student, teacher[:1])):
        with pytest.raises(ValueError, match='must be'):
            module(bad_student, bad_teacher)
    with pytest.raises(LossSettingError, match='^generator '):
        module.generator = 1234
    assert int(module.channel_queue_ptr) == 0  # nothing enqueued


# ---------------------------------------------------------------- the mini-batch pixel term of CIRKDv2

def test_minibatch_pools_large_maps_as_cirkdv2():
    # CIRKDv2 pools maps at least 256 high and wide 4 x 4 (ceil mode); the same rule with a threshold of 8:
    # 9 x 10 maps are pooled (border blocks of 1 and 2 positions), 7 x 12 ones are not.
    criterion = CriterionMiniBatchCrossImagePair(0.1, pool_from_size=8)
    for shape, pooled in (((2, 3, 4, 9, 10), True), ((2, 3, 4, 7, 12), False)):
        student, teacher = random_features(*shape, seed=9)
        loss = criterion(student, teacher)
        reference = original_minibatch_pair_loss_v2(student, teacher, 0.1, torch.float64, pool_from_size=8)
        assert_same(loss, reference, [student], 1e-9)
        plain = original_minibatch_pair_loss_v2(student, teacher, 0.1, torch.float64, pool_from_size=10 ** 6)
        assert (loss.item() != pytest.approx(plain.item(), rel=1e-6)) == pooled
    assert pool_4x4(torch.ones(1, 1, 9, 10)).shape == (1, 1, 3, 3)
    assert CriterionMiniBatchCrossImagePair(0.1).pool_from_size is None  # CIRKD: never
    for bad in (0, 2.5, 'x'):
        with pytest.raises(LossSettingError, match='^pool_from_size '):
            CriterionMiniBatchCrossImagePair(0.1, pool_from_size=bad)


# ---------------------------------------------------------------- two processes

def two_process_batch(rank, step):
    return random_features(2, 5, 4, 6, 9, seed=10 * step + rank)


def pooled_teacher_rows(teacher):
    rows = pool_4x4(teacher).reshape(teacher.shape[0] * teacher.shape[1], -1)
    return F.normalize(rows, p=2, dim=1)


def two_process_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        module = channel_module(memory=30, contrast=9, update=12)
        terms = []
        for step in range(2):
            student, teacher = two_process_batch(rank, step)
            values = module(student, teacher)
            sum(values).backward()
            terms.append([value.item() for value in values])
        torch.save({'terms': terms, 'queue': module.teacher_channel_queue, 'ptr': module.channel_queue_ptr},
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_the_same_memory(tmp_path):
    # Two gloo processes with different batches, generators seeded alike: both enqueue the teacher rows of
    # both (16 rows, 12 drawn) and hold the memory of the plain algorithm fed with the gathered rows; each
    # rank's terms are the plain algorithm's on its own batch against that memory.
    mp.start_processes(two_process_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2,
                       start_method='fork')
    ranks = [torch.load(tmp_path / f'rank{rank}.pt') for rank in range(2)]
    assert torch.equal(ranks[0]['queue'], ranks[1]['queue']) and torch.equal(ranks[0]['ptr'], ranks[1]['ptr'])
    assert ranks[0]['ptr'].tolist() == [24]
    plains = [plain_copy(channel_module(memory=30, contrast=9, update=12)) for _ in range(2)]
    for step in range(2):
        batches = [two_process_batch(rank, step) for rank in range(2)]
        gathered = torch.cat([pooled_teacher_rows(teacher) for _, teacher in batches])
        for rank, plain in enumerate(plains):
            expected = [value.item() for value in plain(*batches[rank], gathered=gathered)]
            assert ranks[rank]['terms'][step] == pytest.approx(expected, rel=1e-9)
    assert torch.equal(plains[0].queue, ranks[0]['queue'])
