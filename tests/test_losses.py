"""Losses: hand-worked cases, agreement with a plain statement of the original algorithm, invariances,
gradients, degenerate inputs and invalid settings."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import CriterionCWD, CriterionHWD, FeatureAdapter, LossSettingError, SegCrossEntropyLoss
from losses.channel import channel_distance, channel_kl
from losses.hwd_loss import class_pixel_counts, resize_labels_nearest
from tests.reference.hwd import original_hwd_loss

ALL_SETTINGS = [
    dict(norm=norm, L=L, process=process, parameter=parameter, DivPixel=div, shift=shift, activation=act)
    for L, act in [('MSE', False), ('MSE', True), ('L1', False), ('L1', True), ('SMOOTHL1', False),
                   ('SMOOTHL1', True), ('KL', True)]
    for process, parameter, shift in [('E', 0.1, 1.0), ('E', 3.0, 0.0), ('T', 0.5, 0.0), ('T', 2.0, 1.0)]
    for div in ['None', 'N', 'SqrtN', 'N2']
    for norm in [True, False]
]


pytestmark = pytest.mark.usefixtures('one_thread')


RECOMMENDED = dict(activation=True, L='MSE', process='E', parameter=0.1, shift=1.0, DivPixel='None')


def setting_id(setting):
    return '-'.join(f'{value}' for value in setting.values())


def random_inputs(n=2, c=5, size=8, label_size=32, dtype=torch.float32, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n, c, size, size, generator=generator, dtype=dtype)).requires_grad_()
    teacher = scale * torch.randn(n, c, size, size, generator=generator, dtype=dtype)
    # -1 is ignored, c and c + 1 are outside the classes: both count for no class.
    labels = torch.randint(-1, c + 2, (n, label_size, label_size), generator=generator)
    return student, teacher, labels


def kl_by_hand(s, t, tau=4.0):
    p_s = [math.exp(v / tau) for v in s]
    p_t = [math.exp(v / tau) for v in t]
    p_s = [v / sum(p_s) for v in p_s]
    p_t = [v / sum(p_t) for v in p_t]
    return sum(b * (math.log(b) - math.log(a)) for a, b in zip(p_s, p_t, strict=True))


# ---------------------------------------------------------------- hand-worked cases

def test_distances_by_hand():
    # channel 0 differs by (1, 3), channel 1 by (0.5, 0)
    a = torch.tensor([[[1.0, 3.0], [0.5, 0.0]]])
    b = torch.zeros_like(a)
    assert channel_distance('MSE', a, b).tolist() == [[10.0, 0.25]]
    assert channel_distance('L1', a, b).tolist() == [[4.0, 0.5]]
    # smooth L1 (beta 1): |x| - 0.5 from 1 on, x^2 / 2 below
    assert channel_distance('SMOOTHL1', a, b).tolist() == [[0.5 + 2.5, 0.125]]


def test_kl_term_by_hand():
    s = [[1.0, -2.0], [0.0, 4.0]]
    t = [[3.0, 0.5], [2.0, 2.0]]
    student = torch.tensor(s, dtype=torch.float64).reshape(1, 2, 1, 2)
    teacher = torch.tensor(t, dtype=torch.float64).reshape(1, 2, 1, 2)
    kl, _ = channel_kl(student, teacher, 4.0)
    assert kl[0].tolist() == pytest.approx([kl_by_hand(s[0], t[0]), kl_by_hand(s[1], t[1])], rel=1e-5)
    expected_cwd = 16 * (kl_by_hand(s[0], t[0]) + kl_by_hand(s[1], t[1])) / 2
    assert CriterionCWD(4.0)(student, teacher).item() == pytest.approx(expected_cwd, rel=1e-5)


def two_channel_weight(beta=None, tau=None, shift=0.0):
    """Two channels, the first farther: normalised scores are +1/sqrt(2) and -1/sqrt(2) whatever the
    distances (unbiased std of two values is |d0 - d1| / sqrt(2))."""
    z = [1 / math.sqrt(2) + shift, -1 / math.sqrt(2) + shift]
    if beta is not None:
        e = [(1 - beta ** v) / (1 - beta) for v in z]
    else:
        e = [v / tau for v in z]
    return [2 * math.exp(v) / (math.exp(e[0]) + math.exp(e[1])) for v in e]


@pytest.mark.parametrize('process, parameter, shift', [('E', 0.1, 0.0), ('E', 0.1, 1.0), ('E', 3.0, 0.5),
                                                       ('T', 0.5, 0.0), ('T', 2.0, 1.0)])
def test_two_channel_weights_by_hand(process, parameter, shift):
    hwd = CriterionHWD(L='MSE', process=process, parameter=parameter, shift=shift)
    weights = hwd.channel_weights(torch.tensor([[10.0, 0.25]]), torch.full((1, 1, 1), -1), (1, 1))
    beta, tau = (parameter, None) if process == 'E' else (None, parameter)
    assert weights[0].tolist() == pytest.approx(two_channel_weight(beta, tau, shift), rel=1e-5)
    if process == 'E' and shift == 0.0:
        # 0.1^0.7071 = 0.19623 and 0.1^-0.7071 = 5.0961: scores 0.89308, -4.5512
        assert weights[0].tolist() == pytest.approx([1.99139, 0.00861], abs=2e-5)


def test_whole_loss_by_hand():
    s = [[1.0, -2.0], [0.0, 4.0]]
    t = [[3.0, 0.5], [2.0, 2.0]]
    student = torch.tensor(s, dtype=torch.float64).reshape(1, 2, 1, 2)
    teacher = torch.tensor(t, dtype=torch.float64).reshape(1, 2, 1, 2)
    labels = torch.full((1, 1, 2), -1)
    # raw-logit MSE: channel 0: 4 + 6.25, channel 1: 4 + 4 -> channel 0 is the farther one
    w0, w1 = two_channel_weight(beta=0.1)
    expected = 16 * (w0 * kl_by_hand(s[0], t[0]) + w1 * kl_by_hand(s[1], t[1])) / 2
    assert CriterionHWD()(student, teacher, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('div, divided', [('None', [4.0, 4.0, 4.0]), ('N', [1.0, 4.0, 4.0]),
                                          ('SqrtN', [2.0, 4.0, 4.0]), ('N2', [0.25, 4.0, 4.0])])
def test_pixel_division_by_hand(div, divided):
    # three positions of class 0 (count 1 + 3 = 4), none of classes 1 and 2 (count 1), one ignored
    labels = torch.tensor([[[0, 0], [0, -1]]])
    distance = torch.tensor([[4.0, 4.0, 4.0]])
    hwd = CriterionHWD(norm=False, process='T', parameter=1.0, DivPixel=div)
    weights = hwd.channel_weights(distance, labels, (2, 2))
    total = sum(math.exp(v) for v in divided)
    assert weights[0].tolist() == pytest.approx([3 * math.exp(v) / total for v in divided], rel=1e-6)
    # with norm: N gives scores (-2, 1, 1) / sqrt(3)
    if div == 'N':
        normed = CriterionHWD(process='T', parameter=1.0, DivPixel='N').channel_weights(distance, labels, (2, 2))
        z = [-2 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)]
        total = sum(math.exp(v) for v in z)
        assert normed[0].tolist() == pytest.approx([3 * math.exp(v) / total for v in z], rel=1e-6)


def test_counts_use_labels_resized_by_nearest():
    # 4 x 4 labels to 2 x 2 logits: nearest reads rows 0, 2 and columns 0, 2
    labels = torch.tensor([[[1, 9, 2, 9],
                            [9, 9, 9, 9],
                            [2, 9, -1, 9],
                            [9, 9, 9, 9]]])
    small = resize_labels_nearest(labels, (2, 2))
    assert small.tolist() == [[[1, 2], [2, -1]]]
    assert class_pixel_counts(small, 3).tolist() == [[1, 2, 3]]  # 1 + count; 9 >= C and -1 count for no class


@pytest.mark.parametrize('label_size, size', [((512, 512), (64, 64)), ((513, 1025), (65, 129)),
                                              ((100, 60), (64, 64)), ((32, 40), (64, 80)), ((7, 9), (1, 1))])
def test_label_resize_matches_interpolate(label_size, size):
    labels = torch.randint(-1, 30, (2, *label_size), generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(labels.unsqueeze(1).float(), size, mode='nearest').squeeze(1).long()
    assert torch.equal(resize_labels_nearest(labels, size), expected)


def test_counts_match_a_loop():
    labels = torch.randint(-1, 9, (3, 16, 16), generator=torch.Generator().manual_seed(2))
    counts = class_pixel_counts(labels, 7)
    for i in range(3):
        for j in range(7):
            assert counts[i, j] == 1 + (labels[i] == j).sum()
    for dtype in (torch.int32, torch.uint8):
        torch.testing.assert_close(class_pixel_counts(labels.clamp(min=0).to(dtype), 7),
                                   class_pixel_counts(labels.clamp(min=0), 7))


# ---------------------------------------------------------------- the original algorithm

@pytest.mark.parametrize('setting', ALL_SETTINGS, ids=setting_id)
def test_matches_original_algorithm(setting):
    for dtype, rtol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        student, teacher, labels = random_inputs(dtype=dtype)
        ours = CriterionHWD(**setting)(student, teacher, labels)
        (grad,) = torch.autograd.grad(ours, student)
        reference = original_hwd_loss(student, teacher, labels, **setting)
        if not torch.isfinite(reference):
            # norm off with beta > 1: beta ** distance overflows in the original; ours stays finite
            assert torch.isfinite(ours) and torch.isfinite(grad).all()
            continue
        (reference_grad,) = torch.autograd.grad(reference, student)
        assert ours.item() == pytest.approx(reference.item(), rel=rtol)
        torch.testing.assert_close(grad, reference_grad, rtol=rtol, atol=rtol * reference_grad.abs().max().item())


def test_cwd_and_task_loss_match_plain_statements():
    student, teacher, labels = random_inputs(dtype=torch.float64)
    n, c = student.shape[:2]
    plain_cwd = F.kl_div(F.log_softmax(student.reshape(n, c, -1) / 4, -1),
                         F.softmax(teacher.reshape(n, c, -1) / 4, -1), reduction='sum') * 16 / (n * c)
    assert CriterionCWD()(student, teacher).item() == pytest.approx(plain_cwd.item(), rel=1e-12)
    labels = labels.clamp(max=c - 1)
    plain_ce = nn.CrossEntropyLoss(ignore_index=-1)(
        F.interpolate(student, labels.shape[-2:], mode='bilinear', align_corners=True), labels)
    assert SegCrossEntropyLoss()(student, labels).item() == pytest.approx(plain_ce.item(), rel=1e-12)


# ---------------------------------------------------------------- invariances

@pytest.mark.parametrize('setting', [RECOMMENDED, dict(RECOMMENDED, DivPixel='N'),
                                     dict(process='T', parameter=0.5, DivPixel='SqrtN', L='L1')], ids=setting_id)
def test_permuting_channels_permutes_weights(setting):
    hwd = CriterionHWD(**setting)
    generator = torch.Generator().manual_seed(3)
    distance = torch.rand(2, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(-1, 6, (2, 8, 8), generator=generator)
    perm = torch.randperm(6, generator=generator)
    inverse = torch.argsort(perm)
    # new channel j is old channel perm[j]; a pixel of old class k becomes class inverse[k]
    relabelled = torch.where(labels >= 0, inverse[labels.clamp(min=0)], labels)
    weights = hwd.channel_weights(distance, labels, (8, 8))
    permuted = hwd.channel_weights(distance[:, perm], relabelled, (8, 8))
    torch.testing.assert_close(permuted, weights[:, perm])


@pytest.mark.parametrize('process, div', list(itertools.product(['E', 'T'], ['None', 'N', 'N2'])))
def test_scaling_distances_keeps_normalised_weights(process, div):
    hwd = CriterionHWD(process=process, parameter=0.1 if process == 'E' else 0.5, DivPixel=div, shift=1.0)
    generator = torch.Generator().manual_seed(4)
    distance = torch.rand(2, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(-1, 5, (2, 4, 4), generator=generator)
    torch.testing.assert_close(hwd.channel_weights(7.5 * distance, labels, (4, 4)),
                               hwd.channel_weights(distance, labels, (4, 4)))


# ---------------------------------------------------------------- gradients

def test_channel_kl_gradcheck():
    student, teacher, _ = random_inputs(n=2, c=3, size=3, dtype=torch.float64, scale=1.0)
    weights = torch.rand(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: (channel_kl(s, teacher, 4.0)[0] * weights).sum(), (student,))
    assert torch.autograd.gradcheck(lambda s: CriterionCWD(2.0)(s, teacher), (student,))
    labels = torch.randint(-1, 3, (2, 5, 5))
    assert torch.autograd.gradcheck(lambda s: SegCrossEntropyLoss()(s, labels), (student,))


@pytest.mark.parametrize('setting', [RECOMMENDED, dict(L='SMOOTHL1', process='T', parameter=0.5, DivPixel='N'),
                                     dict(L='KL', activation=True, DivPixel='N2', shift=1.0)], ids=setting_id)
def test_hwd_gradient_is_weighted_kl_gradient(setting):
    # The weights carry no gradient, so gradcheck of the whole loss does not apply (its numerical
    # derivative moves the weights too); instead: the gradient with the weights held fixed.
    student, teacher, labels = random_inputs(n=2, c=4, size=4, dtype=torch.float64)
    hwd = CriterionHWD(**setting)
    (grad,) = torch.autograd.grad(hwd(student, teacher, labels), student)
    kl, distance = channel_kl(student.detach(), teacher, 4.0, hwd.L, hwd.activation)
    weights = hwd.channel_weights(distance, labels, (4, 4))
    assert torch.autograd.gradcheck(lambda s: (weights * channel_kl(s, teacher, 4.0)[0]).sum() * 16 / 8, (student,))
    fixed = (weights * channel_kl(student, teacher, 4.0)[0]).sum() * 16 / 8
    torch.testing.assert_close(grad, torch.autograd.grad(fixed, student)[0])
    assert teacher.grad is None


def test_teacher_gets_no_gradient():
    student, teacher, labels = random_inputs()
    teacher.requires_grad_()
    (CriterionHWD(**RECOMMENDED)(student, teacher, labels) + CriterionCWD()(student, teacher)).backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------- degenerate inputs

def finite_loss_and_grad(loss_fn, student, *args):
    loss = loss_fn(student, *args)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    return loss, grad


SAFETY_SETTINGS = [RECOMMENDED, dict(RECOMMENDED, DivPixel='N'), dict(L='MSE'), dict(L='L1', DivPixel='N2'),
                   dict(L='SMOOTHL1', process='T', parameter=0.5, DivPixel='SqrtN'),
                   dict(L='KL', activation=True, process='T', parameter=2.0), dict(norm=False, L='MSE', parameter=3.0)]


@pytest.mark.parametrize('setting', SAFETY_SETTINGS, ids=setting_id)
def test_student_equals_teacher(setting):
    student, _, labels = random_inputs()
    teacher = student.detach().clone()
    hwd = CriterionHWD(**setting)
    loss, grad = finite_loss_and_grad(hwd, student, teacher, labels)
    assert loss.item() == 0 and grad.abs().max().item() == 0


# The safety settings without pixel division, each once (two of them differ only in it).
UNDIVIDED_SETTINGS = []
for _setting in SAFETY_SETTINGS:
    if dict(_setting, DivPixel='None') not in UNDIVIDED_SETTINGS:
        UNDIVIDED_SETTINGS.append(dict(_setting, DivPixel='None'))


@pytest.mark.parametrize('setting', UNDIVIDED_SETTINGS, ids=setting_id)
def test_equally_far_channels_give_cwd(setting):
    # Every channel is the same pair of maps, rolled differently: all distances agree up to rounding.
    generator = torch.Generator().manual_seed(5)
    base_s, base_t = 3 * torch.randn(2, 8, 8, generator=generator)
    student = torch.stack([torch.roll(base_s, (k, 2 * k), (0, 1)) for k in range(6)])[None].requires_grad_()
    teacher = torch.stack([torch.roll(base_t, (k, 2 * k), (0, 1)) for k in range(6)])[None]
    labels = torch.randint(-1, 6, (1, 32, 32), generator=generator)
    criterion = CriterionHWD(**setting)
    hwd, _ = finite_loss_and_grad(criterion, student, teacher, labels)
    cwd = CriterionCWD()(student, teacher)
    assert hwd.item() == pytest.approx(cwd.item(), rel=1e-4)
    # the KL terms are equal here too, so check the weights themselves: rounding noise in the
    # distances must not be blown up by the normalisation
    _, distance = channel_kl(student, teacher, 4.0, criterion.L, criterion.activation)
    assert distance.std() > 0  # the case under test: the channels differ by rounding only
    weights = criterion.channel_weights(distance, labels, (8, 8))
    torch.testing.assert_close(weights, torch.ones_like(weights), rtol=0, atol=1e-4)


@pytest.mark.parametrize('L', ['MSE', 'L1', 'SMOOTHL1'])
def test_equal_logit_distances_with_different_kl_give_cwd(L):
    # student = teacher + the same map in every channel: equal raw-logit distances (up to rounding),
    # different KL terms; the weights must all be 1
    generator = torch.Generator().manual_seed(6)
    teacher = 3 * torch.randn(2, 6, 8, 8, generator=generator)
    student = (teacher + 3 * torch.randn(2, 1, 8, 8, generator=generator)).requires_grad_()
    labels = torch.full((2, 8, 8), -1)
    hwd, _ = finite_loss_and_grad(CriterionHWD(L=L, shift=1.0), student, teacher, labels)
    assert hwd.item() == pytest.approx(CriterionCWD()(student, teacher).item(), rel=1e-4)


@pytest.mark.parametrize('setting', SAFETY_SETTINGS, ids=setting_id)
def test_all_labels_ignored_or_one_class(setting):
    student, teacher, _ = random_inputs()
    hwd = CriterionHWD(**setting)
    ignored = torch.full((2, 32, 32), -1)
    loss, _ = finite_loss_and_grad(hwd, student, teacher, ignored)
    # no class anywhere: every count is 1 and pixel division changes nothing
    undivided = CriterionHWD(**dict(setting, DivPixel='None'))(student, teacher, ignored)
    assert loss.item() == pytest.approx(undivided.item(), rel=1e-6)
    finite_loss_and_grad(hwd, student, teacher, torch.zeros(2, 32, 32, dtype=torch.long))


@pytest.mark.parametrize('setting', SAFETY_SETTINGS, ids=setting_id)
def test_huge_logits(setting):
    student, teacher, labels = random_inputs(scale=1e4)
    finite_loss_and_grad(CriterionHWD(**setting), student, teacher, labels)
    finite_loss_and_grad(CriterionCWD(), student, teacher)
    finite_loss_and_grad(SegCrossEntropyLoss(), student, labels.clamp(max=4))


@pytest.mark.parametrize('half', [torch.bfloat16, torch.float16])
def test_autocast_half_precision(half):
    student, teacher, labels = random_inputs()
    student_half = student.detach().to(half).requires_grad_()
    teacher_half = teacher.to(half)
    losses = [(CriterionHWD(**RECOMMENDED), (teacher_half, labels)), (CriterionCWD(), (teacher_half,)),
              (SegCrossEntropyLoss(), (labels.clamp(max=4),))]
    for loss_fn, args in losses:
        with torch.autocast('cpu', dtype=half):
            loss, grad = finite_loss_and_grad(loss_fn, student_half, *args)
        assert loss.dtype == torch.float32 and grad.dtype == half
        # computed in float32 internally: the same as float32 on the rounded inputs
        reference = loss_fn(student_half.detach().float(), *[a.float() if a.is_floating_point() else a
                                                             for a in args])
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_single_channel_and_huge_E_exponents():
    student, teacher, labels = random_inputs(c=1)
    finite_loss_and_grad(CriterionHWD(**RECOMMENDED), student, teacher, labels)
    # without norm, beta ** distance overflows float32 in a plain implementation
    student, teacher, labels = random_inputs(scale=30.0)
    finite_loss_and_grad(CriterionHWD(norm=False, parameter=3.0), student, teacher, labels)
    finite_loss_and_grad(CriterionHWD(norm=False, parameter=1e-3), student, teacher, labels)


def test_task_loss_with_every_label_ignored():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = SegCrossEntropyLoss()(logits, torch.full((2, 64, 64), -1))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


def test_task_loss_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match='ignore-label'):
        SegCrossEntropyLoss()(torch.randn(1, 4, 8, 8), torch.full((1, 16, 16), 255))


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize('kwargs, flag', [
    (dict(L='KL'), '--activation'),
    (dict(process='E', parameter=0.0), '--parameter'),
    (dict(process='E', parameter=-0.5), '--parameter'),
    (dict(process='E', parameter=1.0), '--parameter'),
    (dict(process='T', parameter=0.0), '--parameter'),
    (dict(process='T', parameter=-2.0), '--parameter'),
    (dict(process='T', parameter=float('nan')), '--parameter'),
    (dict(L='mse'), '--L'),
    (dict(process='X'), '--process'),
    (dict(DivPixel='n'), '--DivPixel'),
    (dict(temperature=0.0), '--temperature'),
    (dict(shift=float('inf')), '--shift'),
])
def test_invalid_settings(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        CriterionHWD(**kwargs)


def test_invalid_settings_are_user_errors():
    from utils.errors import UserError
    with pytest.raises(UserError):
        CriterionCWD(temperature=-1)
    assert issubclass(LossSettingError, UserError) and issubclass(LossSettingError, ValueError)
    CriterionHWD(process='T', parameter=1.0)  # 1 is fine as a temperature


def test_bad_shapes_are_reported():
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError, match='same shape'):
        CriterionHWD()(student, teacher[:, :3], labels)
    with pytest.raises(ValueError, match='labels'):
        CriterionHWD()(student, teacher, labels.float())


def test_feature_adapter():
    adapter = FeatureAdapter(128, 256)
    conv, bn, relu = adapter
    assert conv.kernel_size == (1, 1) and conv.bias is None and isinstance(bn, nn.BatchNorm2d)
    out = adapter(torch.randn(2, 128, 4, 4))
    assert out.shape == (2, 256, 4, 4) and out.min() >= 0
    feat_loss = CriterionCWD()(out, torch.randn(2, 256, 4, 4))
    feat_loss.backward()
    assert conv.weight.grad.abs().sum() > 0  # the adapter trains


def test_weights_method_gives_the_weights_the_loss_uses():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.randint(-1, 3, (2, 8, 8))
    hwd = CriterionHWD(activation=True, shift=1.0)
    w = hwd.weights(s, t, labels)
    assert w.shape == (2, 3) and not w.requires_grad
    assert torch.allclose(w.sum(1), torch.full((2,), 3.0))
    kl = (F.softmax(t.reshape(2, 3, -1) / 4, -1) * (F.log_softmax(t.reshape(2, 3, -1) / 4, -1)
                                                   - F.log_softmax(s.reshape(2, 3, -1) / 4, -1))).sum(-1)
    assert torch.allclose(hwd(s, t, labels), (w * kl).sum() * 16 / 6, rtol=1e-5)
