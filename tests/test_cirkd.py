"""CIRKD: the mini-batch pixel-pair term against the original's pair loop (values and gradients, float64 and
float32, many shapes, row blocks), the memory terms against a plain loop computation of the fixed algorithm,
the queue writes and their wrap rule, the draw of the enqueued pixels, the all-ignored batch, precision,
the teacher's gradient, the module's state and invalid settings, and two processes sharing their queues."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from assertions import assert_same

import losses.cirkd as cirkd
from losses.channel import LossSettingError
from losses.cirkd import CriterionMiniBatchCrossImagePair, StudentSegContrast
from tests.reference.cirkd import PlainMemoryContrast, original_minibatch_pair_loss

PRECISIONS = [(torch.float64, 1e-10), (torch.float32, 1e-4)]

pytestmark = pytest.mark.usefixtures('one_thread')


def random_features(n, c_s, c_t, h, w, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c_s, h, w, generator=generator, dtype=dtype).requires_grad_()
    teacher = torch.randn(n, c_t, h, w, generator=generator, dtype=dtype).relu_()
    return student, teacher


# ---------------------------------------------------------------- mini-batch pixel-pair term

# (N, student channels, teacher channels, h, w): odd sizes, one to four images, unequal channel counts
PAIR_SHAPES = [(1, 5, 4, 3, 7), (2, 3, 8, 5, 5), (3, 8, 8, 2, 3), (4, 6, 2, 3, 1)]


@pytest.mark.parametrize('shape', PAIR_SHAPES)
def test_minibatch_matches_original(shape):
    for dtype, rtol in PRECISIONS:
        for temperature, seed in [(0.1, 0), (1.0, 1)]:
            student, teacher = random_features(*shape, dtype=dtype, seed=seed)
            if seed:
                with torch.no_grad():  # a pixel with a zero feature vector (F.normalize's eps)
                    student[0, :, 0, 0] = 0
            loss = CriterionMiniBatchCrossImagePair(temperature)(student, teacher)
            assert loss.dtype == dtype  # the inputs' precision, not the original's float32 accumulator
            assert_same(loss, original_minibatch_pair_loss(student, teacher, temperature, accumulator_dtype=dtype),
                        [student], rtol)
            if dtype == torch.float64:
                # the original as it ran: its float32 accumulator rounds the float64 sum
                as_run = original_minibatch_pair_loss(student, teacher, temperature)
                assert as_run.dtype == torch.float32
                assert loss.item() == pytest.approx(as_run.item(), rel=1e-6)


def test_minibatch_row_blocks(monkeypatch):
    # blocks of 1, 4 and 7 rows (45 rows: the last block is partial) give the unblocked value and gradient
    student, teacher = random_features(3, 4, 6, 5, 3, seed=2)
    criterion = CriterionMiniBatchCrossImagePair(0.1)
    whole = criterion(student, teacher)
    (whole_grad,) = torch.autograd.grad(whole, student)
    for rows in (1, 4, 7):
        monkeypatch.setattr(cirkd, 'WORKSPACE_BYTES', rows * 45 * 8)
        loss = criterion(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == pytest.approx(whole.item(), rel=1e-12)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)
    assert criterion(student, teacher).item() != pytest.approx(criterion(student, teacher.flip(0)).item(), rel=1e-3)


@pytest.mark.parametrize('half', [torch.bfloat16, torch.float16])
def test_minibatch_precision(half):
    student, teacher = random_features(2, 4, 5, 3, 3, dtype=torch.float32, seed=3)
    student_half = student.detach().to(half).requires_grad_()
    criterion = CriterionMiniBatchCrossImagePair(0.1)
    reference = original_minibatch_pair_loss(student_half.detach().float(), teacher.to(half).float(), 0.1)
    for autocast in (False, True):
        with torch.autocast('cpu', dtype=half, enabled=autocast):
            loss = criterion(student_half, teacher.to(half))
        (grad,) = torch.autograd.grad(loss, student_half)
        # computed in float32: the float32 value of the rounded inputs
        assert loss.dtype == torch.float32 and grad.dtype == half and torch.isfinite(grad).all()
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_minibatch_teacher_gets_no_gradient():
    student, teacher_input = random_features(2, 3, 4, 3, 2, seed=4)
    teacher_layer = nn.Conv2d(4, 5, 1).double()
    teacher = teacher_layer(teacher_input)
    CriterionMiniBatchCrossImagePair(0.5)(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_layer.weight.grad is None and teacher_layer.bias.grad is None


def test_minibatch_invalid_settings_and_shapes():
    for temperature in (0, -1, float('inf'), float('nan'), None):
        with pytest.raises(LossSettingError, match='^temperature '):
            CriterionMiniBatchCrossImagePair(temperature)
    criterion = CriterionMiniBatchCrossImagePair()
    student, teacher = random_features(2, 3, 4, 3, 2)
    # (another spatial size is not an error: the student's map is resized to the teacher's, losses/align.py)
    for bad_teacher in (teacher[:1], teacher[0]):
        with pytest.raises(ValueError, match='same N, h and w'):
            criterion(student, bad_teacher)


# ---------------------------------------------------------------- memory terms: helpers

def small_memory(num_classes=3, pixel_memory_size=10, region_memory_size=3, pixel_update_freq=4, s_channels=5,
                 t_channels=6, head_dtype=torch.float64, queue_dtype=torch.float32, seed=0, contrast=None, **kwargs):
    """A StudentSegContrast with small memories, the head in `head_dtype`, the queues in `queue_dtype`.
    Unless `contrast` = (pixel, region) is given, the contrast sizes equal the memory sizes: every slot is
    then a negative, and the random order of the negatives does not change the terms."""
    pixel_contrast, region_contrast = contrast or (pixel_memory_size, region_memory_size)
    torch.manual_seed(seed)
    module = StudentSegContrast(num_classes, pixel_memory_size, region_memory_size, pixel_contrast, region_contrast,
                                s_channels=s_channels, t_channels=t_channels, pixel_update_freq=pixel_update_freq,
                                generator=torch.Generator().manual_seed(seed), **kwargs)
    module.project_head.to(head_dtype)
    for name in StudentSegContrast.local_buffers:
        buffer = getattr(module, name)
        if buffer.is_floating_point():
            setattr(module, name, buffer.to(queue_dtype))
    with torch.no_grad():  # BN affine parameters away from 1 and 0, so that their gradients say something
        module.project_head[1].weight.uniform_(0.5, 1.5)
        module.project_head[1].bias.uniform_(-0.5, 0.5)
    return module


def sparse_labels(n, h, w, num_classes, per_class, ignore_label, seed, empty_images=()):
    """N x h x w labels in which each class covers 0..per_class pixels of an image (so that all of them are
    enqueued), at random places; the other pixels, and every pixel of `empty_images`, ignored."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full((n, h * w), ignore_label, dtype=torch.long)
    for image in range(n):
        if image in empty_images:
            continue
        order = torch.randperm(h * w, generator=generator)
        start = 0
        for k in range(num_classes):
            count = int(torch.randint(0, per_class + 1, (1,), generator=generator))
            labels[image, order[start:start + count]] = k
            start += count
    return labels.reshape(n, h, w)


def full_resolution(small_labels):
    """Labels at 2h x 3w that the nearest resize maps back to `small_labels`."""
    return small_labels.repeat_interleave(2, 1).repeat_interleave(3, 2)


def head_parameters(module_or_head):
    return list(module_or_head.parameters())


def assert_same_queues(module, plain, rtol):
    assert torch.equal(module.pixel_queue_ptr, plain.pixel_ptr)
    assert torch.equal(module.segment_queue_ptr, plain.segment_ptr)
    torch.testing.assert_close(module.teacher_pixel_queue, plain.pixel_queue, rtol=rtol, atol=rtol)
    torch.testing.assert_close(module.teacher_segment_queue, plain.segment_queue, rtol=rtol, atol=rtol)


# ---------------------------------------------------------------- memory terms against the plain loops

MEMORY_CASES = {
    # float64 features with float32 queues; pixel writes wrap within a batch; one image without a label
    'float64': dict(module=dict(), n=2, h=3, w=5, per_class=4, ignore_label=-1, empty=(1,), rtol=1e-10,
                    queue_rtol=1e-7),
    # float64 queues, memories as small as allowed (pixel = pixel_update_freq, region = 1), ignore 255,
    # another kd temperature and temperature, and row blocks of one row
    'edges': dict(module=dict(num_classes=2, pixel_memory_size=3, region_memory_size=1, pixel_update_freq=3,
                              s_channels=3, t_channels=4, queue_dtype=torch.float64, ignore_label=255,
                              contrast_kd_temperature=2.0, contrast_temperature=0.5),
                  n=3, h=4, w=3, per_class=3, ignore_label=255, empty=(), rtol=1e-10, queue_rtol=1e-12,
                  workspace=64),
    # float32 throughout, one image of odd size, four classes
    'float32': dict(module=dict(num_classes=4, pixel_memory_size=12, region_memory_size=2, pixel_update_freq=5,
                                s_channels=4, t_channels=3, head_dtype=torch.float32),
                    n=1, h=5, w=3, per_class=5, ignore_label=-1, empty=(), rtol=1e-4, queue_rtol=1e-6),
}


@pytest.mark.parametrize('case', list(MEMORY_CASES))
def test_memory_terms_match_plain_algorithm(case, monkeypatch):
    # Every pixel of a class is enqueued and every slot is a negative, so no random draw changes the
    # result: the values, the gradients (student features and head) and the queues after every forward
    # must be those of the plain loops. One process, no process group.
    assert not dist.is_initialized()
    setting = MEMORY_CASES[case]
    if 'workspace' in setting:
        monkeypatch.setattr(cirkd, 'WORKSPACE_BYTES', setting['workspace'])
    module = small_memory(**setting['module'])
    plain = PlainMemoryContrast(module, copy.deepcopy(module.project_head))
    dtype = module.project_head[0].weight.dtype
    rtol = setting['rtol']
    for step in range(4):
        student, teacher = random_features(setting['n'], module.s_channels, module.t_channels, setting['h'],
                                           setting['w'], dtype=dtype, seed=10 + step)
        labels = sparse_labels(setting['n'], setting['h'], setting['w'], module.num_classes, setting['per_class'],
                               setting['ignore_label'], seed=step, empty_images=setting['empty'] if step else ())
        pixel, region = module(student, teacher, full_resolution(labels))
        plain_pixel, plain_region = plain(student, teacher, full_resolution(labels))
        assert pixel.dtype == region.dtype == dtype
        for ours, reference in ((pixel, plain_pixel), (region, plain_region)):
            assert_same(ours, reference, [student, *head_parameters(module)], rtol,
                        [student, *head_parameters(plain.head)])
        assert_same_queues(module, plain, setting['queue_rtol'])
    assert module.pixel_queue_ptr.dtype == torch.long and module.teacher_pixel_queue.dtype == plain.pixel_queue.dtype


def test_queue_writes_and_wrap_rule_by_hand():
    # One class, pixel memory 6, at most 3 pixels per image and class, region memory 2. The teacher vector
    # of every pixel is a distinct unit vector, so each queue row says which pixel was written there.
    module = small_memory(num_classes=1, pixel_memory_size=6, region_memory_size=2, pixel_update_freq=3,
                          s_channels=2, t_channels=8)
    initial_pixel = module.teacher_pixel_queue.clone()
    eye = torch.eye(8, dtype=torch.float64)

    def forward(images):
        """images: per image, the teacher basis vectors of its labelled pixels (the image is 1 x 4, the
        other pixels ignored); returns nothing, the test reads the queues."""
        n = len(images)
        teacher = torch.zeros(n, 8, 1, 4, dtype=torch.float64)
        labels = torch.full((n, 1, 4), -1)
        for i, vectors in enumerate(images):
            for x, v in enumerate(vectors):
                teacher[i, :, 0, x] = 3 * eye[v]  # not unit length: the keys are normalised first
                labels[i, 0, x] = 0
            teacher[i, :, 0, len(vectors):] = eye[7].unsqueeze(1)  # ignored pixels: never written
        module(torch.randn(n, 2, 1, 4, dtype=torch.float64), teacher, labels)

    def pixel_rows():
        rows = module.teacher_pixel_queue[0].double()
        return [int(row.argmax()) if torch.equal(row, eye[int(row.argmax())]) else None for row in rows]

    forward([[0, 1, 2]])  # 0 + 3 < 6: slots 0..2, pointer 3
    assert pixel_rows()[:3] == [0, 1, 2] and torch.equal(module.teacher_pixel_queue[0, 3:], initial_pixel[0, 3:])
    assert module.pixel_queue_ptr.tolist() == [3]
    forward([[3, 4, 5]])  # 3 + 3 >= 6 (ends exactly at the end): the last 3 slots, pointer 0
    assert pixel_rows() == [0, 1, 2, 3, 4, 5] and module.pixel_queue_ptr.tolist() == [0]
    forward([[6, 5, 4], [0, 1, 2], [3, 6, 5]])  # 0 -> slots 0..2; 3 -> the last 3, 0; 0 -> slots 0..2, 3
    assert pixel_rows() == [3, 6, 5, 0, 1, 2] and module.pixel_queue_ptr.tolist() == [3]
    forward([[1, 2], [4, 6]])  # 3 + 2 < 6: slots 3, 4 (pointer 5); 5 + 2 >= 6: the last 2 slots 4, 5
    assert pixel_rows() == [3, 6, 5, 1, 4, 6] and module.pixel_queue_ptr.tolist() == [0]
    forward([[0], [], [1]])  # an image without the class writes nothing
    assert pixel_rows() == [0, 1, 5, 1, 4, 6] and module.pixel_queue_ptr.tolist() == [2]

    # Region queue: one write per image holding the class, the pointer advancing modulo 2; the last of
    # several writes to a slot in one batch wins. Means of 3 * basis vectors, normalised.
    module = small_memory(num_classes=1, pixel_memory_size=6, region_memory_size=2, pixel_update_freq=3,
                          s_channels=2, t_channels=8)
    forward([[0, 1], [2], [3, 4, 5]])  # slots 0, 1, 0
    expected = torch.stack([eye[3:6].sum(0) / math.sqrt(3), eye[2]]).float()
    torch.testing.assert_close(module.teacher_segment_queue[0], expected)
    assert module.segment_queue_ptr.tolist() == [1]


def test_enqueued_pixels_are_drawn_among_the_class_pixels():
    # 20 pixels: class 1 on the first 8, class 0 on the last 12 (the original drew the first n_k flat
    # positions of the image, i.e. class-1 pixels and 4 of class 0). pixel_update_freq 4 < 12: each
    # forward must write 4 distinct class-0 pixels, in pixel order, and over the forwards every one of the
    # 12 is drawn.
    module = small_memory(num_classes=2, pixel_memory_size=8, region_memory_size=1, pixel_update_freq=4,
                          s_channels=2, t_channels=20, contrast=(1, 1))
    teacher = torch.eye(20, dtype=torch.float64).reshape(1, 20, 4, 5)  # pixel p has basis vector p
    labels = torch.tensor([1] * 8 + [0] * 12).reshape(1, 4, 5)
    drawn = []
    for _ in range(20):
        start = int(module.pixel_queue_ptr[0])
        module(torch.randn(1, 2, 4, 5, dtype=torch.float64), teacher, labels)
        rows = module.teacher_pixel_queue[0, start:start + 4]
        pixels = rows.argmax(1)
        assert torch.equal(rows, torch.eye(20)[pixels])
        assert all(8 <= p < 20 for p in pixels.tolist())
        assert pixels.tolist() == sorted(set(pixels.tolist()))
        drawn += pixels.tolist()
    assert set(drawn) == set(range(8, 20))
    assert all(p < 8 for p in module.teacher_pixel_queue[1].argmax(1).tolist())  # class 1: its own pixels

    # The draws come from the module's generator: the same seed gives the same queues, another seed other
    # queues; None uses torch's global generator.
    def queues_after(generator_seed=None, global_seed=None):
        candidate = small_memory(num_classes=2, pixel_memory_size=8, region_memory_size=1, pixel_update_freq=4,
                                 s_channels=2, t_channels=20, contrast=(1, 1))
        if generator_seed is None:
            candidate.generator = None
            torch.manual_seed(global_seed)
        else:
            candidate.generator.manual_seed(generator_seed)
        for _ in range(2):
            candidate(torch.randn(1, 2, 4, 5, dtype=torch.float64), teacher, labels)
        return candidate.teacher_pixel_queue

    assert torch.equal(queues_after(5), queues_after(5))
    assert not torch.equal(queues_after(5), queues_after(6))
    assert torch.equal(queues_after(global_seed=7), queues_after(global_seed=7))
    assert not torch.equal(queues_after(global_seed=7), queues_after(global_seed=8))


def test_all_ignored_batch():
    # No labelled pixel: both terms 0 (the original gave NaN), a zero gradient, nothing enqueued; the
    # module keeps working afterwards.
    module = small_memory(ignore_label=255)
    state = copy.deepcopy({name: getattr(module, name) for name in module.local_buffers})
    student, teacher = random_features(2, 5, 6, 3, 4, seed=5)
    pixel, region = module(student, teacher, torch.full((2, 6, 12), 255))
    assert pixel.item() == 0 and region.item() == 0 and pixel.dtype == torch.float64
    (pixel + region).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in module.project_head.parameters())
    for name, value in state.items():
        assert torch.equal(getattr(module, name), value)
    pixel, region = module(student, teacher, full_resolution(sparse_labels(2, 3, 4, 3, 4, 255, seed=1)))
    assert pixel.item() > 0 and region.item() > 0
    assert not torch.equal(module.pixel_queue_ptr, state['pixel_queue_ptr'])


def test_memory_under_autocast():
    # Under autocast the head runs in bfloat16 as autocast decides; the terms are computed in float32:
    # the plain algorithm on the same bfloat16 head output.
    module = small_memory(head_dtype=torch.float32)
    head = copy.deepcopy(module.project_head)

    def autocast_head(features):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return head(features)

    plain = PlainMemoryContrast(module, autocast_head)
    student, teacher = random_features(2, 5, 6, 3, 5, dtype=torch.float32, seed=6)
    labels = full_resolution(sparse_labels(2, 3, 5, 3, 4, -1, seed=2))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        pixel, region = module(student, teacher, labels)
    plain_pixel, plain_region = plain(student, teacher, labels)
    for ours, reference in ((pixel, plain_pixel), (region, plain_region)):
        assert ours.dtype == torch.float32
        assert_same(ours, reference, [student, *head_parameters(module)], 1e-4, [student, *head_parameters(head)])
    assert_same_queues(module, plain, 1e-6)


def test_memory_teacher_gets_no_gradient():
    module = small_memory()
    student, teacher_input = random_features(2, 5, 6, 3, 3, seed=7)
    teacher_layer = nn.Conv2d(6, 6, 1).double()
    pixel, region = module(student, teacher_layer(teacher_input), full_resolution(sparse_labels(2, 3, 3, 3, 4, -1, 3)))
    (pixel + region).backward()
    assert student.grad.abs().sum() > 0 and module.project_head[0].weight.grad.abs().sum() > 0
    assert teacher_layer.weight.grad is None and teacher_layer.bias.grad is None
    assert all(not getattr(module, name).requires_grad for name in module.local_buffers)


def test_label_values_out_of_range():
    module = small_memory()
    state = copy.deepcopy({name: getattr(module, name) for name in module.local_buffers})
    student, teacher = random_features(1, 5, 6, 2, 2)
    for bad in (3, -2, 255):
        labels = torch.tensor([[[0, 1], [2, bad]]])
        with pytest.raises(ValueError, match=rf'label values \[{bad}\]'):
            module(student, teacher, full_resolution(labels))
    for name, value in state.items():  # nothing enqueued
        assert torch.equal(getattr(module, name), value)
    for bad_student, bad_teacher, bad_labels in ((student[:, :4], teacher, torch.zeros(1, 4, 6, dtype=torch.long)),
                                                 (student, teacher, torch.zeros(1, 4, 6)),
                                                 (student, teacher, torch.zeros(2, 4, 6, dtype=torch.long))):
        with pytest.raises(ValueError, match='must be'):
            module(bad_student, bad_teacher, bad_labels)


# ---------------------------------------------------------------- the module's state and settings

ORIGINAL_KEYS = ['teacher_segment_queue', 'segment_queue_ptr', 'teacher_pixel_queue', 'pixel_queue_ptr',
                 'project_head.0.weight', 'project_head.1.weight', 'project_head.1.bias',
                 'project_head.1.running_mean', 'project_head.1.running_var', 'project_head.1.num_batches_tracked',
                 'project_head.3.weight']


def test_state_keys_buffers_and_initial_queues():
    torch.manual_seed(3)
    module = StudentSegContrast(2, pixel_memory_size=16, region_memory_size=3, pixel_contrast_size=4,
                                region_contrast_size=2)
    state = module.state_dict()
    assert list(state) == ORIGINAL_KEYS  # the original's order; the generator is no state entry
    assert StudentSegContrast.local_buffers == ('teacher_segment_queue', 'segment_queue_ptr', 'teacher_pixel_queue',
                                                'pixel_queue_ptr')
    assert {name for name, _ in module.named_buffers() if not name.startswith('project_head.')} == \
        set(module.local_buffers)
    assert state['teacher_segment_queue'].shape == (2, 3, 256) and state['teacher_pixel_queue'].shape == (2, 16, 256)
    assert state['project_head.0.weight'].shape == (256, 128, 1, 1)
    assert state['project_head.3.weight'].shape == (256, 256, 1, 1)
    assert torch.equal(state['segment_queue_ptr'], torch.zeros(2, dtype=torch.long))
    assert torch.equal(state['pixel_queue_ptr'], torch.zeros(2, dtype=torch.long))
    # Built in the original's order from the global generator: the head, then N(0, 1) queues (region,
    # then pixel), each row L2-normalised.
    torch.manual_seed(3)
    head = nn.Sequential(nn.Conv2d(128, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
                         nn.Conv2d(256, 256, 1, bias=False))
    segment = F.normalize(torch.randn(2, 3, 256), p=2, dim=2)
    pixel = F.normalize(torch.randn(2, 16, 256), p=2, dim=2)
    assert torch.equal(state['project_head.0.weight'], head[0].weight)
    assert torch.equal(state['project_head.3.weight'], head[3].weight)
    torch.testing.assert_close(state['teacher_segment_queue'], segment, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state['teacher_pixel_queue'], pixel, rtol=1e-6, atol=1e-7)
    # other channel counts: the head maps s_channels to t_channels, the queues are t_channels wide
    other = StudentSegContrast(1, 16, 1, 1, 1, s_channels=3, t_channels=5)
    assert other.teacher_pixel_queue.shape == (1, 16, 5) and other.project_head[0].weight.shape == (5, 3, 1, 1)


@pytest.mark.parametrize('name, value, named', [
    ('num_classes', 0, None), ('num_classes', 2.5, None), ('num_classes', None, None),
    ('pixel_memory_size', 15, None),  # below pixel_update_freq (16)
    ('pixel_update_freq', 21, 'pixel_memory_size'),  # more than the 20 slots: the memory is too small
    ('pixel_memory_size', float('inf'), None),
    ('region_memory_size', 0, None),
    ('pixel_contrast_size', 0, None), ('pixel_contrast_size', 21, None),  # more than the 20 slots
    ('region_contrast_size', -1, None), ('region_contrast_size', 5, None),  # more than the 4 slots
    ('contrast_kd_temperature', 0, None), ('contrast_kd_temperature', float('nan'), None),
    ('contrast_temperature', -0.1, None), ('contrast_temperature', float('inf'), None),
    ('s_channels', 0, None), ('t_channels', -4, None), ('pixel_update_freq', 0, None),
    ('ignore_label', 0.5, None), ('generator', 1234, None),
])
def test_invalid_settings(name, value, named):
    settings = dict(num_classes=2, pixel_memory_size=20, region_memory_size=4, pixel_contrast_size=5,
                    region_contrast_size=2, s_channels=3, t_channels=4)
    StudentSegContrast(**settings)  # the base settings are valid
    with pytest.raises(LossSettingError, match=f'^{named or name} '):
        StudentSegContrast(**{**settings, name: value})


# ---------------------------------------------------------------- two processes

TWO_PROCESS_STEPS = 4


def two_process_module():
    return small_memory(num_classes=3, pixel_memory_size=10, region_memory_size=3, pixel_update_freq=2,
                        s_channels=4, t_channels=5, contrast=(6, 2)).eval()  # eval: the head is per pixel


def two_process_batch(rank, step):
    """Rank `rank`'s batch at `step`: 2 images of 3 x 4 with up to 4 pixels per class (more than
    pixel_update_freq, so the draws matter); rank 1 has no labelled pixel at step 1."""
    student, teacher = random_features(2, 4, 5, 3, 4, seed=100 * step + rank)
    empty = (0, 1) if (rank, step) == (1, 1) else ()
    labels = sparse_labels(2, 3, 4, 3, 4, -1, seed=100 * step + rank, empty_images=empty)
    return student, teacher, full_resolution(labels)


def run_steps(module, batches):
    """Forward and backward of every step's batch; returns [(pixel, region, labelled rows)] and leaves the
    queues in the module. The generator is seeded once, not per step, so that it must advance alike on
    every rank whatever the rank's batch holds (rank 1's batch without a label included)."""
    results = []
    module.generator.manual_seed(1000)
    for student, teacher, labels in batches:
        pixel, region = module(student, teacher, labels)
        (pixel + region).backward()
        results.append((pixel.item(), region.item(), int((labels[:, ::2, ::3] != -1).sum())))
    return results


def two_process_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        module = two_process_module()
        results = run_steps(module, [two_process_batch(rank, step) for step in range(TWO_PROCESS_STEPS)])
        torch.save({'results': results, 'buffers': {name: getattr(module, name) for name in module.local_buffers}},
                   f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_the_same_queues(tmp_path):
    # Two gloo processes with different batches and the same generator seeds: after every forward both
    # hold the queues of one process that ran the concatenated batch, and each rank's terms are its rows'
    # share of that process's terms (the same negatives).
    mp.spawn(two_process_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{rank}.pt') for rank in range(2)]
    module = two_process_module()
    batches = []
    for step in range(TWO_PROCESS_STEPS):
        parts = [two_process_batch(rank, step) for rank in range(2)]
        student = torch.cat([part[0].detach() for part in parts]).requires_grad_()
        batches.append((student, torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])))
    single = run_steps(module, batches)
    for name in module.local_buffers:
        assert torch.equal(ranks[0]['buffers'][name], ranks[1]['buffers'][name]), name
        assert torch.equal(ranks[0]['buffers'][name], getattr(module, name)), name
    assert not torch.equal(module.pixel_queue_ptr, torch.zeros_like(module.pixel_queue_ptr))
    for step, (pixel, region, rows) in enumerate(single):
        rank_rows = [ranks[rank]['results'][step][2] for rank in range(2)]
        assert sum(rank_rows) == rows
        for term, value in ((0, pixel), (1, region)):
            shared = sum(ranks[rank]['results'][step][term] * rank_rows[rank] for rank in range(2)) / rows
            assert shared == pytest.approx(value, rel=1e-9)
