"""Pixel-wise KD, DIST and MGD: hand-worked cases, agreement with a plain statement of the original
algorithms (values and gradients, float64 and float32, many shapes), MGD's masks and generator,
precision, the teacher's gradient, degenerate inputs and invalid settings."""
import copy
import math

import pytest
import torch
from assertions import assert_same

from losses.channel import LossSettingError
from losses.dist import CriterionDIST
from losses.kd import CriterionKD
from losses.mgd import CriterionMGD
from tests.reference.kd_dist_mgd import OriginalMGD, original_dist_loss, original_kd_loss, original_mgd_mask

# (N, C, h, w): odd sizes, one pixel, one class, two classes, a Cityscapes-like class count
LOGIT_SHAPES = [(1, 3, 5, 7), (2, 19, 6, 5), (4, 2, 3, 3), (3, 5, 1, 1), (2, 1, 4, 3)]
PRECISIONS = [(torch.float64, 1e-10), (torch.float32, 1e-4)]


pytestmark = pytest.mark.usefixtures('one_thread')


def random_pair(shape, dtype=torch.float64, scale=3.0, seed=0, teacher_shape=None):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=generator, dtype=dtype)).requires_grad_()
    teacher = scale * torch.randn(teacher_shape or shape, generator=generator, dtype=dtype)
    return student, teacher


# ---------------------------------------------------------------- KD

def test_kd_by_hand():
    # one pixel, two classes, tau = 2: p = softmax(T / 2), q = softmax(S / 2)
    student = torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    teacher = torch.tensor([0.0, 2.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    q = [math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5)), math.exp(-0.5) / (math.exp(0.5) + math.exp(-0.5))]
    p = [1 / (1 + math.e), math.e / (1 + math.e)]
    expected = 4 * sum(b * math.log(b / a) for a, b in zip(q, p, strict=True))
    assert CriterionKD(2.0)(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    assert CriterionKD(2)(teacher, teacher).item() == 0


@pytest.mark.parametrize('shape', LOGIT_SHAPES)
def test_kd_matches_original(shape):
    for dtype, rtol in PRECISIONS:
        for temperature, seed in [(1, 0), (4.0, 1), (0.5, 2)]:
            student, teacher = random_pair(shape, dtype, seed=seed)
            assert_same(CriterionKD(temperature)(student, teacher), original_kd_loss(student, teacher, temperature),
                        [student], rtol)


def test_kd_counts_every_pixel_alike():
    # No labels: a pixel a task loss would ignore counts like any other; the loss is the mean over all
    # N*h*w pixels of the per-pixel term.
    student, teacher = random_pair((2, 4, 3, 5), seed=3)
    kd = CriterionKD(3.0)
    per_pixel = [kd(student[i:i + 1, :, y:y + 1, x:x + 1], teacher[i:i + 1, :, y:y + 1, x:x + 1])
                 for i in range(2) for y in range(3) for x in range(5)]
    assert kd(student, teacher).item() == pytest.approx(torch.stack(per_pixel).mean().item(), rel=1e-12)
    changed = teacher.clone()
    changed[1, :, 2, 4] = -changed[1, :, 2, 4]
    assert kd(student, changed).item() != pytest.approx(kd(student, teacher).item(), rel=1e-6)


def test_kd_extreme_logits():
    # the teacher's probabilities underflow to 0: those classes contribute 0, nothing becomes NaN
    student, teacher = random_pair((2, 5, 3, 3), torch.float32, scale=1e4)
    loss = CriterionKD()(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    reference = original_kd_loss(student, teacher)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


# ---------------------------------------------------------------- DIST

def test_dist_by_hand():
    student, teacher = random_pair((2, 4, 3, 3), seed=4)
    # an affine map with a positive slope correlates perfectly both ways: both relations are 1 - 1
    # (up to the 1e-8 added to the product of the norms)
    assert CriterionDIST()(2 * teacher + 3, teacher).item() == pytest.approx(0, abs=1e-8)
    # a negative slope: -1 both ways, so each relation is 2
    assert CriterionDIST()(-teacher, teacher).item() == pytest.approx(4, abs=1e-8)
    assert CriterionDIST(beta=0.5, gamma=0)(-teacher, teacher).item() == pytest.approx(1, abs=1e-8)
    assert CriterionDIST(beta=0, gamma=0.25)(-teacher, teacher).item() == pytest.approx(0.5, abs=1e-8)
    # constant rows and columns: the centred vectors are 0, the correlation 0 / (0 + 1e-8) = 0
    assert CriterionDIST()(torch.zeros(1, 3, 2, 2), teacher[:1, :3, :2, :2]).item() == pytest.approx(2, rel=1e-12)
    assert CriterionDIST(beta=0, gamma=0)(student, teacher).item() == 0


@pytest.mark.parametrize('shape', LOGIT_SHAPES)
def test_dist_matches_original(shape):
    for dtype, rtol in PRECISIONS:
        for (beta, gamma), seed in [((1.0, 1.0), 0), ((0.5, 2.0), 1), ((0.0, 1.0), 2), ((3.0, 0.0), 3)]:
            student, teacher = random_pair(shape, dtype, seed=seed)
            assert_same(CriterionDIST(beta, gamma)(student, teacher),
                        original_dist_loss(student, teacher, beta, gamma), [student], rtol)


def test_dist_intra_relation_spans_the_batch():
    # the intra-class correlation is taken over the pixels of the whole batch, not image by image
    student, teacher = random_pair((2, 3, 4, 4), seed=5)
    dist = CriterionDIST(beta=0, gamma=1)
    per_image = (dist(student[:1], teacher[:1]) + dist(student[1:], teacher[1:])) / 2
    assert dist(student, teacher).item() != pytest.approx(per_image.item(), rel=1e-3)
    assert dist(student, teacher).item() == pytest.approx(original_dist_loss(student, teacher, 0, 1).item(), rel=1e-12)


def test_dist_degenerate_rows_have_the_original_gradient():
    # one class: every pixel's centred row is 0 (norm 0); equal logits everywhere in a class: the same
    # for the columns. The original's gradient through the zero norms is 0, not NaN.
    for student, teacher in [random_pair((2, 1, 3, 3), seed=6),
                             (torch.ones(2, 3, 2, 2, dtype=torch.float64, requires_grad=True),
                              random_pair((2, 3, 2, 2), seed=7)[1])]:
        assert_same(CriterionDIST()(student, teacher), original_dist_loss(student, teacher), [student], 1e-10)


# ---------------------------------------------------------------- KD and DIST together

@pytest.mark.parametrize('make', [lambda: CriterionKD(2.0), lambda: CriterionDIST(1.0, 0.5)],
                         ids=['kd', 'dist'])
def test_logit_losses_gradcheck_and_teacher(make):
    loss_fn = make()
    student, teacher = random_pair((2, 3, 3, 2), scale=1.0, seed=8)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher), (student,))
    teacher.requires_grad_()
    loss_fn(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize('make', [lambda: CriterionKD(4.0), lambda: CriterionDIST()], ids=['kd', 'dist'])
@pytest.mark.parametrize('half', [torch.bfloat16, torch.float16])
def test_logit_losses_under_autocast(make, half):
    loss_fn = make()
    student, teacher = random_pair((2, 5, 4, 4), torch.float32, seed=9)
    student_half = student.detach().to(half).requires_grad_()
    teacher_half = teacher.to(half)
    with torch.autocast('cpu', dtype=half):
        loss = loss_fn(student_half, teacher_half)
    (grad,) = torch.autograd.grad(loss, student_half)
    assert loss.dtype == torch.float32 and grad.dtype == half and torch.isfinite(grad).all()
    # computed in float32: the same as float32 on the rounded inputs
    reference = loss_fn(student_half.detach().float(), teacher_half.float())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize('loss_fn', [CriterionKD(), CriterionDIST()], ids=['kd', 'dist'])
def test_logit_losses_reject_bad_shapes(loss_fn):
    student, teacher = random_pair((2, 4, 3, 3))
    with pytest.raises(ValueError, match='same shape'):
        loss_fn(student, teacher[:, :3])
    with pytest.raises(ValueError, match='same shape'):
        loss_fn(student[0], teacher[0])
    with pytest.raises(ValueError, match='at least one'):
        loss_fn(student[:0], teacher[:0])


@pytest.mark.parametrize('make, name', [
    (lambda: CriterionKD(0), 'temperature'),
    (lambda: CriterionKD(-1), 'temperature'),
    (lambda: CriterionKD(float('inf')), 'temperature'),
    (lambda: CriterionKD(float('nan')), 'temperature'),
    (lambda: CriterionDIST(beta=-0.5), 'beta'),
    (lambda: CriterionDIST(beta=float('nan')), 'beta'),
    (lambda: CriterionDIST(gamma=-1), 'gamma'),
    (lambda: CriterionDIST(gamma=float('inf')), 'gamma'),
    (lambda: CriterionMGD(lambda_mgd=-0.1), 'lambda_mgd'),
    (lambda: CriterionMGD(lambda_mgd=1.5), 'lambda_mgd'),
    (lambda: CriterionMGD(lambda_mgd=float('nan')), 'lambda_mgd'),
    (lambda: CriterionMGD(student_channels=0), 'student_channels'),
    (lambda: CriterionMGD(student_channels=2.5), 'student_channels'),
    (lambda: CriterionMGD(teacher_channels=-3), 'teacher_channels'),
    (lambda: CriterionMGD(teacher_channels=None), 'teacher_channels'),
    (lambda: CriterionMGD(generator=1234), 'generator'),
])
def test_invalid_settings(make, name):
    with pytest.raises(LossSettingError, match=f'^{name} '):
        make()


# ---------------------------------------------------------------- MGD

def small_mgd_pair(c_s, c_t, lambda_mgd, dtype, seed=0):
    """Our module and the restated original with the same weights."""
    torch.manual_seed(seed)
    ours = CriterionMGD(c_s, c_t, lambda_mgd).to(dtype)
    original = OriginalMGD(lambda_mgd, c_s, c_t).to(dtype)
    original.load_state_dict(ours.state_dict())
    return ours, original


def test_mgd_keys_shapes_and_size():
    mgd = CriterionMGD()
    shapes = {key: tuple(value.shape) for key, value in mgd.state_dict().items()}
    assert shapes == {'align.weight': (256, 128, 1, 1), 'align.bias': (256,),
                      'generation.0.weight': (256, 256, 3, 3), 'generation.0.bias': (256,),
                      'generation.2.weight': (256, 256, 3, 3), 'generation.2.bias': (256,)}
    assert sum(p.numel() for p in mgd.parameters()) == 1_213_184
    assert isinstance(mgd.generation[1], torch.nn.ReLU)
    # the generator is a plain attribute: not state, replaceable, and the module still copies
    mgd.generator = torch.Generator().manual_seed(0)
    copied = copy.deepcopy(mgd)
    assert 'generator' not in mgd.state_dict() and copied.generator is not mgd.generator
    assert torch.equal(copied.generator.get_state(), mgd.generator.get_state())


@pytest.mark.parametrize('c_s, c_t, shape, lambda_mgd', [
    (3, 5, (2, 4, 5), 0.75),
    (4, 4, (1, 3, 3), 0.5),
    (6, 2, (3, 1, 7), 0.3),
    (2, 7, (4, 5, 2), 0.9),
])
def test_mgd_matches_original(c_s, c_t, shape, lambda_mgd):
    n, h, w = shape
    for (dtype, rtol), seed in zip(PRECISIONS, (0, 1), strict=True):
        ours, original = small_mgd_pair(c_s, c_t, lambda_mgd, dtype, seed)
        student, teacher = random_pair((n, c_s, h, w), dtype, seed=seed, teacher_shape=(n, c_t, h, w))
        uniform = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))
        mask = original_mgd_mask(uniform, lambda_mgd)
        assert 0 < mask.sum() < mask.numel()  # both kinds of pixel are exercised
        for given in (mask.to(dtype), mask.bool()):
            assert_same(ours(student, teacher, mask=given), original(student, teacher, uniform),
                        [student, *ours.parameters()], rtol, [student, *original.parameters()])


def test_mgd_default_channels_match_original():
    ours, original = small_mgd_pair(128, 256, 0.75, torch.float32, seed=2)
    student, teacher = random_pair((2, 128, 5, 4), torch.float32, seed=2, teacher_shape=(2, 256, 5, 4))
    uniform = torch.rand(2, 1, 5, 4, generator=torch.Generator().manual_seed(3))
    assert_same(ours(student, teacher, mask=original_mgd_mask(uniform, 0.75).float()),
                original(student, teacher, uniform), [student, ours.align.weight, ours.generation[0].bias], 1e-4,
                [student, original.align.weight, original.generation[0].bias])


@pytest.mark.parametrize('lambda_mgd', [0.75, 0.5])
def test_mgd_own_draw_follows_the_original(lambda_mgd):
    ours, original = small_mgd_pair(3, 4, lambda_mgd, torch.float32, seed=4)
    student, teacher = random_pair((3, 3, 6, 5), torch.float32, seed=4, teacher_shape=(3, 4, 6, 5))
    with torch.random.fork_rng(devices=[]):
        for seed in (0, 1, 2):
            # a seeded generator of ours gives what the original draws from the global generator
            ours.generator = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            reference = original(student, teacher)
            assert ours(student, teacher).item() == pytest.approx(reference.item(), rel=1e-6)
            # without a generator, ours draws from the global one too
            ours.generator = None
            torch.manual_seed(seed)
            assert ours(student, teacher).item() == pytest.approx(reference.item(), rel=1e-6)
    # the mask itself: 0 where u > 1 - lambda, u the float32 draws of the generator, one after another
    follower = torch.Generator().manual_seed(7)
    ours.generator = torch.Generator().manual_seed(7)
    for _ in range(2):
        mask = ours.draw_mask(3, 6, 5)
        uniform = torch.rand(3, 1, 6, 5, generator=follower)
        assert mask.dtype == torch.float32 and torch.equal(mask, original_mgd_mask(uniform, lambda_mgd).float())
        assert 0 < mask.sum() < mask.numel()


def test_mgd_draws_in_float32_for_float64_features():
    ours, original = small_mgd_pair(2, 3, 0.75, torch.float64, seed=5)
    student, teacher = random_pair((2, 2, 5, 5), torch.float64, seed=5, teacher_shape=(2, 3, 5, 5))
    uniform32 = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(11))
    uniform64 = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert not torch.equal(original_mgd_mask(uniform32, 0.75), original_mgd_mask(uniform64, 0.75))
    expected = original(student, teacher, uniform32)
    default_dtype = torch.get_default_dtype()
    try:
        for default in (torch.float32, torch.float64):
            torch.set_default_dtype(default)  # the draw must not follow the default dtype either
            ours.generator = torch.Generator().manual_seed(11)
            loss = ours(student, teacher)
            assert loss.dtype == torch.float64 and loss.item() == pytest.approx(expected.item(), rel=1e-12)
            # exactly one float32 draw of N*h*w numbers was taken from the generator
            follower = torch.Generator().manual_seed(11)
            torch.rand(2, 1, 5, 5, generator=follower, dtype=torch.float32)
            assert torch.equal(ours.generator.get_state(), follower.get_state())
    finally:
        torch.set_default_dtype(default_dtype)


def test_mgd_given_mask_draws_nothing():
    ours, _ = small_mgd_pair(2, 3, 0.75, torch.float32)
    student, teacher = random_pair((2, 2, 4, 4), torch.float32, teacher_shape=(2, 3, 4, 4))
    ours.generator = torch.Generator().manual_seed(1)
    state, global_state = ours.generator.get_state(), torch.get_rng_state()
    ours(student, teacher, mask=torch.ones(2, 1, 4, 4))
    assert torch.equal(ours.generator.get_state(), state)
    ours.generator = None
    ours(student, teacher, mask=torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert torch.equal(torch.get_rng_state(), global_state)


def test_mgd_float32_module_serves_float64_features():
    # the float32 weights are cast to float64 exactly: the same as a float64 copy of the module
    ours, original = small_mgd_pair(3, 4, 0.75, torch.float32, seed=6)
    original = original.double()
    student, teacher = random_pair((2, 3, 4, 3), torch.float64, seed=6, teacher_shape=(2, 4, 4, 3))
    uniform = torch.rand(2, 1, 4, 3, generator=torch.Generator().manual_seed(6))
    loss = ours(student, teacher, mask=original_mgd_mask(uniform, 0.75).double())
    assert loss.dtype == torch.float64
    assert_same(loss, original(student, teacher, uniform), [student], 1e-12)
    loss = ours(student, teacher, mask=original_mgd_mask(uniform, 0.75).double())
    loss.backward()
    assert ours.align.weight.grad.dtype == torch.float32


def test_mgd_lambda_extremes():
    ours, original = small_mgd_pair(3, 4, 1.0, torch.float64, seed=7)
    student, teacher = random_pair((2, 3, 4, 4), torch.float64, seed=7, teacher_shape=(2, 4, 4, 4))
    ours.generator = torch.Generator().manual_seed(0)
    # lambda 1 drops every pixel: the generator sees zeros, neither the student nor align learns
    assert not ours.draw_mask(2, 4, 4).any()
    ours.generator.manual_seed(0)
    loss = ours(student, teacher)
    loss.backward()
    assert student.grad.abs().max() == 0 and ours.align.weight.grad.abs().max() == 0
    assert ours.generation[0].bias.grad.abs().max() > 0
    assert loss.item() == pytest.approx(ours(student, teacher, mask=torch.zeros(2, 1, 4, 4)).item(), rel=1e-12)
    # lambda 0 keeps every pixel
    keep_all = CriterionMGD(3, 4, 0.0, generator=torch.Generator().manual_seed(0)).double()
    keep_all.load_state_dict(ours.state_dict())
    assert keep_all.draw_mask(2, 4, 4).all()
    expected = original(student, teacher, torch.zeros(2, 1, 4, 4))  # u = 0 is kept by any lambda
    assert keep_all(student, teacher).item() == pytest.approx(expected.item(), rel=1e-12)


def test_mgd_gradcheck_and_teacher():
    ours, _ = small_mgd_pair(2, 3, 0.5, torch.float64, seed=8)
    student, teacher = random_pair((2, 2, 3, 3), torch.float64, scale=1.0, seed=8, teacher_shape=(2, 3, 3, 3))
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).repeat(6).reshape(2, 1, 3, 3)
    weight = ours.generation[2].weight
    assert torch.autograd.gradcheck(lambda s, _w: ours(s, teacher, mask=mask), (student, weight))
    teacher.requires_grad_()
    ours(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize('half', [torch.bfloat16, torch.float16])
def test_mgd_under_autocast(half):
    ours, _ = small_mgd_pair(3, 4, 0.75, torch.float32, seed=9)
    student, teacher = random_pair((2, 3, 5, 5), torch.float32, seed=9, teacher_shape=(2, 4, 5, 5))
    student_half = student.detach().to(half).requires_grad_()
    mask = original_mgd_mask(torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(9)), 0.75)
    with torch.autocast('cpu', dtype=half):
        loss = ours(student_half, teacher.to(half), mask=mask.bool())
    (grad,) = torch.autograd.grad(loss, student_half)
    assert loss.dtype == torch.float32 and grad.dtype == half
    reference = ours(student_half.detach().float(), teacher.to(half).float(), mask=mask.float())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize('c_s, c_t', [(128, 256), (128, 512), (256, 512)])
def test_mgd_model_zoo_channel_pairs(c_s, c_t):
    mgd = CriterionMGD(c_s, c_t, generator=torch.Generator().manual_seed(0))
    student, teacher = random_pair((1, c_s, 3, 2), torch.float32, scale=1.0, teacher_shape=(1, c_t, 3, 2))
    loss = mgd(student, teacher)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and student.grad.shape == student.shape
    assert mgd.generation[2].weight.grad.abs().sum() > 0  # the generator trains


def test_mgd_rejects_bad_inputs():
    mgd = CriterionMGD(2, 3)
    student, teacher = random_pair((2, 2, 4, 4), torch.float32, teacher_shape=(2, 3, 4, 4))
    for bad_student, bad_teacher in [(student[:, :1], teacher), (student, teacher[:, :2]), (student[:1], teacher),
                                     (student[0], teacher[0])]:
        with pytest.raises(ValueError, match='MGD'):
            mgd(bad_student, bad_teacher)
    for mask in [torch.ones(2, 2, 4, 4), torch.ones(2, 1, 4, 3), torch.ones(2, 1, 4, 4, dtype=torch.long)]:
        with pytest.raises(ValueError, match='mask must be'):
            mgd(student, teacher, mask=mask)
    with pytest.raises(ValueError, match='only 0 and 1'):
        mgd(student, teacher, mask=torch.full((2, 1, 4, 4), 0.5))


def test_mgd_loss_scale_by_hand():
    # one channel each, identity align and generator weights set by hand, everything kept:
    # rebuilt = conv3x3(relu(conv3x3(x))) with centre-only kernels = x; loss = sum (x - t)^2 / N
    mgd = CriterionMGD(1, 1, 0.0)
    with torch.no_grad():
        for conv in (mgd.align, mgd.generation[0], mgd.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[..., conv.weight.shape[-1] // 2, conv.weight.shape[-1] // 2] = 1
    student = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    teacher = torch.zeros(2, 1, 3, 3)
    assert mgd(student, teacher).item() == pytest.approx(student.square().sum().item() / 2, rel=1e-6)
