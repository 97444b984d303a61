"""SKD / IFVD building blocks: the discriminator (layout, outputs, power iteration and gradients against the
original), the pair-wise and IFV losses and the hinge criteria (values and gradients against a plain
statement of the original), hand-worked cases, precision and invalid settings."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from losses.adversarial import CriterionAdv, CriterionAdvForG
from losses.channel import LossSettingError
from losses.ifv import CriterionIFV, class_centres
from losses.pairwise import CriterionPairWise
from models.sagan_models import Discriminator
from tests.reference.skd_ifvd import (
    OriginalDiscriminator,
    original_adv_for_g,
    original_adv_hinge,
    original_class_centres,
    original_ifv,
    original_pairwise,
)

SN_LAYERS = ('l1', 'l2', 'l3', 'l4')


pytestmark = pytest.mark.usefixtures('one_thread')


def sn_conv(model, layer):
    return getattr(model, layer)[0].module


def twin_discriminators(mode=1, classes=19, seed=0, dtype=torch.float32):
    """Ours and the original holding the same weights; gamma made non-zero so attention matters."""
    torch.manual_seed(seed)
    ours = Discriminator(mode, classes)
    with torch.no_grad():
        ours.attn1.gamma.fill_(0.7)
        ours.attn2.gamma.fill_(-0.4)
        if mode == 1:
            ours.preprocess_additional.weight.uniform_(0.5, 1.5)
            ours.preprocess_additional.bias.uniform_(-0.5, 0.5)
    original = OriginalDiscriminator(mode, classes)
    original.load_state_dict(ours.state_dict())
    return ours.to(dtype), original.to(dtype)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- discriminator: layout

def test_state_dict_is_the_originals():
    for mode in (1, 2, 3):
        torch.manual_seed(1)
        ours = Discriminator(mode, 19).state_dict()
        torch.manual_seed(1)
        original = OriginalDiscriminator(mode, 19).state_dict()
        # same keys in the same order, and the same seeded initialisation (same construction order)
        assert list(ours) == list(original)
        for key in ours:
            assert torch.equal(ours[key], original[key]), key
    keys = list(Discriminator(1, 19).state_dict())
    assert keys[:4] == ['l4.0.module.bias', 'l4.0.module.weight_u', 'l4.0.module.weight_v', 'l4.0.module.weight_bar']
    assert keys[4] == 'l1.0.module.bias' and keys[16:18] == ['last.0.weight', 'last.0.bias']
    assert keys[18] == 'attn1.gamma' and keys[-5:] == [f'preprocess_additional.{k}' for k in
                                                       ('weight', 'bias', 'running_mean', 'running_var',
                                                        'num_batches_tracked')]
    sync = Discriminator(1, 19, norm_layer=nn.SyncBatchNorm)
    assert isinstance(sync.preprocess_additional, nn.SyncBatchNorm) and list(sync.state_dict()) == keys


def test_parameters():
    model = Discriminator(1, 19)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3_191_721  # about 3.19 M for 19 classes
    for layer in SN_LAYERS:
        conv = sn_conv(model, layer)
        assert 'weight' not in conv._parameters
        assert not conv.weight_u.requires_grad and not conv.weight_v.requires_grad and conv.weight_bar.requires_grad
        assert conv.weight_u.shape == (conv.out_channels,)
        assert conv.weight_v.shape == (conv.in_channels * 16,)
        assert conv.weight_u.norm().item() == pytest.approx(1.0, rel=1e-6)
    assert model.attn1.gamma.item() == 0 and model.attn2.gamma.item() == 0


# ---------------------------------------------------------------- discriminator: against the original

@pytest.mark.parametrize('mode, size, dtype', [(1, (64, 64), torch.float32), (2, (64, 128), torch.float32),
                                               (3, (64, 64), torch.float32), (1, (64, 128), torch.float64)])
def test_outputs_and_power_iteration_match_original(mode, size, dtype):
    ours, original = twin_discriminators(mode, classes=7, dtype=dtype)
    generator = torch.Generator().manual_seed(2)
    scale = 100.0 if mode == 3 else 3.0
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for training in (True, False):
        ours.train(training)
        original.train(training)
        for _ in range(3):  # several calls in a row: each one iterates u and v further
            logits = scale * torch.randn(2, 7, *size, generator=generator, dtype=dtype)
            out = ours(logits)
            expected = original(logits)
            assert out.shape == expected.shape == (2, 1, size[0] // 16 - 3, size[1] // 16 - 3)
            torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol * expected.abs().max().item())
            for layer in SN_LAYERS:
                for vector in ('weight_u', 'weight_v'):
                    torch.testing.assert_close(getattr(sn_conv(ours, layer), vector),
                                               getattr(sn_conv(original, layer), vector), rtol=rtol, atol=rtol)
    if mode == 1:
        torch.testing.assert_close(ours.preprocess_additional.running_var,
                                   original.preprocess_additional.running_var, rtol=rtol, atol=rtol)


def test_single_call_gradient_matches_original():
    ours, original = twin_discriminators(classes=5)
    logits = 3 * torch.randn(2, 5, 64, 64, generator=torch.Generator().manual_seed(3))
    ours(logits).square().mean().backward()
    original(logits).square().mean().backward()
    named_original = dict(original.named_parameters())
    for name, parameter in ours.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None and named_original[name].grad is None
            continue
        torch.testing.assert_close(parameter.grad, named_original[name].grad, rtol=1e-4,
                                   atol=1e-5 * named_original[name].grad.abs().max().item())


def test_two_calls_then_one_backward_use_each_calls_vectors():
    ours, original = twin_discriminators(classes=5)
    separate = copy.deepcopy(ours)
    generator = torch.Generator().manual_seed(4)
    first, second = (3 * torch.randn(2, 5, 64, 64, generator=generator) for _ in range(2))
    # each call backpropagated on its own: the gradient of that call alone
    separate(first).mean().backward()
    separate(second).mean().backward()
    # both calls, then one backward (the discriminator step: D(S), D(T), hinge, backward)
    (ours(first).mean() + ours(second).mean()).backward()
    (original(first).mean() + original(second).mean()).backward()
    for layer in SN_LAYERS:
        expected = sn_conv(separate, layer).weight_bar.grad
        assert relative_error(sn_conv(ours, layer).weight_bar.grad, expected) < 1e-5
    # the original used the second call's u and v for both: its gradient is measurably off
    assert relative_error(sn_conv(original, 'l1').weight_bar.grad, sn_conv(separate, 'l1').weight_bar.grad) > 1e-3


def test_vectors_never_get_a_gradient():
    model = Discriminator(2, 4)
    model.requires_grad_(True)  # e.g. after freezing and unfreezing the whole module
    model(torch.randn(1, 4, 64, 64)).sum().backward()
    for layer in SN_LAYERS:
        conv = sn_conv(model, layer)
        assert conv.weight_u.grad is None and conv.weight_v.grad is None
        assert conv.weight_bar.grad.abs().sum() > 0


def test_power_iteration_finds_the_spectral_norm():
    model = Discriminator(2, 3).eval()
    spectral = model.l2[0]
    for _ in range(60):
        weight = spectral.normalised_weight()
    matrix = weight.detach().reshape(weight.shape[0], -1)
    assert torch.linalg.matrix_norm(matrix, ord=2).item() == pytest.approx(1.0, rel=1e-3)


def test_output_sizes():
    model = Discriminator(2, 3)
    for size, expected in [((64, 64), (1, 1)), ((64, 128), (1, 5)), ((80, 127), (2, 4)), ((96, 71), (3, 1))]:
        assert model(torch.randn(1, 3, *size)).shape == (1, 1, *expected)


def test_autocast_keeps_power_iteration_in_float32():
    ours, _ = twin_discriminators(mode=1, classes=5)
    twin = copy.deepcopy(ours)
    logits = torch.randn(2, 5, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ours(logits)
    expected = twin(logits)
    assert torch.isfinite(out).all()
    # bfloat16 keeps 8 bits of mantissa: within 2% of the largest output (0.8% measured)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.02 * expected.abs().max().item())
    for layer in SN_LAYERS:
        assert sn_conv(ours, layer).weight_u.dtype == torch.float32
        torch.testing.assert_close(sn_conv(ours, layer).weight_u, sn_conv(twin, layer).weight_u, rtol=0, atol=0)


@pytest.mark.parametrize('kwargs, name', [
    (dict(preprocess_GAN_mode=0), 'preprocess_GAN_mode'),
    (dict(preprocess_GAN_mode=4), 'preprocess_GAN_mode'),
    (dict(preprocess_GAN_mode='bn'), 'preprocess_GAN_mode'),
    (dict(preprocess_GAN_mode=True), 'preprocess_GAN_mode'),
    (dict(conv_dim=32), 'conv_dim'),
    (dict(image_size=32), 'image_size'),
    (dict(input_channel=0), 'input_channel'),
    (dict(input_channel=2.5), 'input_channel'),
])
def test_invalid_discriminator_settings(kwargs, name):
    with pytest.raises(LossSettingError, match=name):
        Discriminator(**kwargs)


def test_invalid_discriminator_inputs():
    model = Discriminator(2, 3)
    for size in [(63, 64), (64, 40), (8, 8)]:
        with pytest.raises(ValueError, match='--crop-size of at least 64 x the output stride'):
            model(torch.randn(1, 3, *size))
    with pytest.raises(ValueError, match='N x 3 x h x w'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='N x 3 x h x w'):
        model(torch.randn(3, 64, 64))


# ---------------------------------------------------------------- pair-wise

def random_features(n, cs, ct, h, w, dtype=torch.float64, seed=0, relu=True):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, cs, h, w, generator=generator, dtype=dtype)
    teacher = torch.randn(n, ct, h, w, generator=generator, dtype=dtype)
    if relu:  # the features are post-ReLU in the networks
        student, teacher = student.relu() + 0.05, teacher.relu() + 0.05
    return student.requires_grad_(), teacher


def test_pairwise_by_hand():
    # one image, 2 x 4 map -> two 2x2 windows -> nodes (1, 0) and (0, 1) for the student (orthogonal),
    # (1, 0) and (1, 0) for the teacher: A_S = I, A_T = all ones, sum of squares 2, / (M'^2 = 4) / N = 1
    student = torch.zeros(1, 2, 2, 4)
    student[0, 0, 1, 1] = 3.0
    student[0, 1, 0, 2] = 0.5
    teacher = torch.zeros(1, 2, 2, 4)
    teacher[0, 0, 0, 0] = 2.0
    teacher[0, 0, 1, 3] = 7.0
    assert CriterionPairWise()(student, teacher).item() == pytest.approx(0.5, rel=1e-6)
    assert CriterionPairWise()(teacher, teacher).item() == 0


@pytest.mark.parametrize('n, cs, ct, h, w', [(1, 3, 3, 4, 4), (2, 5, 7, 7, 9), (3, 4, 2, 5, 6), (4, 6, 8, 9, 3)])
def test_pairwise_matches_original(n, cs, ct, h, w):
    for dtype, rtol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        student, teacher = random_features(n, cs, ct, h, w, dtype=dtype, seed=h * w)
        ours = CriterionPairWise()(student, teacher)
        reference = original_pairwise(student, teacher)
        assert ours.dtype == dtype
        assert ours.item() == pytest.approx(reference.item(), rel=rtol)
        grad, = torch.autograd.grad(ours, student)
        reference_grad, = torch.autograd.grad(reference, student)
        torch.testing.assert_close(grad, reference_grad, rtol=rtol, atol=rtol * reference_grad.abs().max().item())


def test_pairwise_gradcheck_and_teacher_without_gradient():
    student, teacher = random_features(2, 3, 4, 5, 3, relu=False)  # no ties inside the max-pool windows
    assert torch.autograd.gradcheck(lambda s: CriterionPairWise()(s, teacher), (student,))
    teacher.requires_grad_()
    CriterionPairWise()(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------- IFV

def random_labels(n, size, classes, seed=0, absent=()):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, classes + 2, (n, *size), generator=generator)  # -1, classes, classes + 1: ignored
    for k in absent:
        labels[labels == k] = -1
    labels[0, :2, :3] = 255
    return labels


def test_ifv_by_hand():
    # one image, three pixels: two of class 0 with features a, b, one ignored (compared with itself)
    a, b, c = [1.0, 0.0], [0.0, 2.0], [5.0, 1.0]
    student = torch.tensor([a, b, c], dtype=torch.float64).t().reshape(1, 2, 1, 3)
    teacher = torch.tensor([a, a, c], dtype=torch.float64).t().reshape(1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, -1]]])
    centre = [(x + y) / (2 + 1e-6) for x, y in zip(a, b, strict=True)]

    def cos(x, y):
        return sum(p * q for p, q in zip(x, y, strict=True)) / math.hypot(*x) / math.hypot(*y)

    # teacher: both pixels equal their centre, cos 1; student: cos(a, centre) and cos(b, centre)
    expected = ((cos(a, centre) - 1) ** 2 + (cos(b, centre) - 1) ** 2 + 0.0) / 3
    assert CriterionIFV(2)(student, teacher, labels).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize('n, cs, ct, size, label_size, classes, absent', [
    (1, 3, 3, (4, 4), (32, 32), 3, ()),
    (2, 5, 7, (7, 9), (57, 70), 4, (1,)),
    (3, 6, 4, (5, 6), (37, 51), 6, (0, 4)),
    (4, 4, 8, (8, 8), (64, 64), 5, ()),
])
def test_ifv_matches_original(n, cs, ct, size, label_size, classes, absent):
    labels = random_labels(n, label_size, classes, seed=n, absent=absent)
    criterion = CriterionIFV(classes)
    for dtype, rtol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        student, teacher = random_features(n, cs, ct, *size, dtype=dtype, seed=n + cs)
        ours = criterion(student, teacher, labels)
        reference = original_ifv(student, teacher, labels, classes)
        assert ours.dtype == dtype
        assert ours.item() == pytest.approx(reference.item(), rel=rtol)
        grad, = torch.autograd.grad(ours, student)
        reference_grad, = torch.autograd.grad(reference, student)
        torch.testing.assert_close(grad, reference_grad, rtol=rtol, atol=rtol * reference_grad.abs().max().item())


def test_ifv_class_centres_divide_by_count_plus_epsilon():
    # the cosine does not see a centre's scale, so the divisor is checked on the centres themselves
    labels = random_labels(3, (24, 20), 5, absent=(2,))
    # a class present at a single pixel of image 1 (the features read every 4th label): centre = x / (1 + 1e-6)
    labels[1][labels[1] == 3] = 0
    labels[1, 4, 8] = 3
    for dtype, rtol in [(torch.float64, 1e-6), (torch.float32, 1e-5)]:
        feat, _ = random_features(3, 4, 4, 6, 5, dtype=dtype)
        ours = class_centres(feat, labels, 5)
        reference = original_class_centres(feat, labels, 5)
        assert ours.shape == (3, 4, 5) and ours.dtype == dtype
        torch.testing.assert_close(ours, reference, rtol=rtol, atol=0)
        assert ours[:, :, 2].abs().max() == 0  # absent everywhere
        assert ours[1, :, 3].tolist() == pytest.approx((feat[1, :, 1, 2] / (1 + 1e-6)).tolist(), rel=1e-7)


def test_ifv_gradient_flows_through_the_centres():
    student, teacher = random_features(2, 3, 4, 4, 5)
    labels = random_labels(2, (8, 10), 3)
    assert torch.autograd.gradcheck(lambda s: CriterionIFV(3)(s, teacher, labels), (student,))
    teacher.requires_grad_()
    CriterionIFV(3)(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None


def test_ifv_labels_without_class():
    student, teacher = random_features(2, 3, 4, 4, 4)
    labels = random_labels(2, (16, 16), 3)
    criterion = CriterionIFV(3)
    # uint8 labels with 255 for the ignored pixels: the same as -1
    as_bytes = torch.where(labels < 0, 255, labels).to(torch.uint8)
    assert criterion(student, teacher, as_bytes).item() == pytest.approx(criterion(student, teacher, labels).item(),
                                                                          rel=1e-12)
    # nothing labelled: every pixel is compared with itself, the loss is rounding noise
    loss = criterion(student, teacher, torch.full((2, 16, 16), -1))
    grad, = torch.autograd.grad(loss, student)
    assert loss.item() < 1e-25 and torch.isfinite(grad).all()


@pytest.mark.parametrize('classes', [0, -3, 2.5, True, '19'])
def test_invalid_ifv_classes(classes):
    with pytest.raises(LossSettingError, match='classes'):
        CriterionIFV(classes)


def test_invalid_feature_and_label_shapes():
    student, teacher = random_features(2, 3, 4, 4, 4)
    with pytest.raises(ValueError, match='same N, h and w'):
        CriterionIFV(3)(student, teacher[:1], torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='same N, h and w'):
        CriterionPairWise()(student[0], teacher[0])
    for labels in (torch.zeros(2, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)):
        with pytest.raises(ValueError, match='labels'):
            CriterionIFV(3)(student, teacher, labels)


# ---------------------------------------------------------------- adversarial criteria

def test_criteria_by_hand():
    d_out_S = torch.tensor([[-2.0, 0.5]])
    d_out_T = torch.tensor([[0.25, 3.0]])
    assert CriterionAdvForG()(d_out_S).item() == pytest.approx(0.75)
    # real: relu(1 - 0.25) + relu(1 - 3) = 0.75 -> mean 0.375; fake: relu(-1) + relu(1.5) -> mean 0.75
    assert CriterionAdv()(d_out_S, d_out_T).item() == pytest.approx(1.125)


@pytest.mark.parametrize('shape', [(1, 1, 1, 1), (2, 1, 1, 5), (3, 1, 2, 4)])
def test_criteria_match_original(shape):
    generator = torch.Generator().manual_seed(6)
    for dtype, rtol in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        d_out_S = (1.5 * torch.randn(shape, generator=generator, dtype=dtype)).requires_grad_()
        d_out_T = (1.5 * torch.randn(shape, generator=generator, dtype=dtype)).requires_grad_()
        cases = [(CriterionAdvForG()(d_out_S), original_adv_for_g(d_out_S), (d_out_S,)),
                 (CriterionAdv()(d_out_S, d_out_T), original_adv_hinge(d_out_S, d_out_T), (d_out_S, d_out_T))]
        for ours, reference, inputs in cases:
            assert ours.dtype == dtype and ours.item() == pytest.approx(reference.item(), rel=rtol)
            for grad, reference_grad in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(reference, inputs),
                                            strict=True):
                torch.testing.assert_close(grad, reference_grad, rtol=rtol, atol=0)


def test_hinge_trains_the_discriminator_on_both_sides():
    # both scores carry the discriminator's gradient (the logits it sees are detached by the caller)
    d_out_S = torch.zeros(2, 1, 1, 1, requires_grad=True)
    d_out_T = torch.zeros(2, 1, 1, 1, requires_grad=True)
    CriterionAdv()(d_out_S, d_out_T).backward()
    assert torch.equal(d_out_S.grad, torch.full_like(d_out_S, 0.5))
    assert torch.equal(d_out_T.grad, torch.full_like(d_out_T, -0.5))


def test_invalid_criteria_inputs():
    with pytest.raises(ValueError, match='same shape'):
        CriterionAdv()(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 5))
    with pytest.raises(ValueError, match='empty'):
        CriterionAdvForG()(torch.zeros(0, 1, 1, 1))


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize('half', [torch.bfloat16, torch.float16])
def test_autocast_half_precision(half):
    student, teacher = random_features(2, 3, 5, 6, 7, dtype=torch.float32)
    labels = random_labels(2, (24, 28), 4)
    student_half = student.detach().to(half).requires_grad_()
    teacher_half = teacher.to(half)
    scores = torch.randn(2, 1, 1, 5).to(half).requires_grad_()
    cases = [(CriterionPairWise(), student_half, (teacher_half,)),
             (CriterionIFV(4), student_half, (teacher_half, labels)),
             (CriterionAdvForG(), scores, ()),
             (CriterionAdv(), scores, (scores.detach() + 0.5,))]
    for criterion, first, rest in cases:
        with torch.autocast('cpu', dtype=half):
            loss = criterion(first, *rest)
        grad, = torch.autograd.grad(loss, first)
        assert loss.dtype == torch.float32 and grad.dtype == half and torch.isfinite(grad).all()
        # computed in float32: the same as float32 on the rounded inputs
        as_float = [r.float() if r.is_floating_point() else r for r in rest]
        assert loss.item() == pytest.approx(criterion(first.detach().float(), *as_float).item(), rel=1e-5)

