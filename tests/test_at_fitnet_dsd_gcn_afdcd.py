"""AT, FitNet, DSD, CIRKDv2's GCN block and Af-DCD against plain restatements of the originals (values and
gradients, float64 and float32), the random draws injected or taken from a seeded generator, the fixes (DSD's
two-map student list, Af-DCD's equal channels and patch crop), precision, student maps of another size, and
the refusal of invalid settings and inputs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from assertions import assert_same

import losses.gcn as gcn_module
from losses import GCN, CriterionAT, CriterionDoubleSimKD, CriterionFitNet, OmniContrastiveFeatureLoss
from losses.afdcd import EnhancedProjector
from tests.reference.at_fitnet_dsd_gcn_afdcd import (
    OriginalGCN,
    OriginalOmniContrastive,
    original_at_loss,
    original_contrastive_term,
    original_csd_loss,
    original_feature_terms,
    original_fitnet_loss,
    original_mask,
    original_psd_loss,
)

PRECISIONS = [(torch.float64, 1e-9), (torch.float32, 1e-4)]

pytestmark = pytest.mark.usefixtures('one_thread')


def randn(*shape, dtype=torch.float64, seed=0, grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.requires_grad_() if grad else x


def resized(x, like):
    return F.interpolate(x, size=like.shape[2:], mode='bilinear', align_corners=False)


# ---------------------------------------------------------------- AT and FitNet

@pytest.mark.parametrize('shape_S, shape_T', [((2, 3, 4, 5), (2, 6, 4, 5)), ((1, 4, 3, 3), (1, 4, 3, 3))])
def test_at_matches_original(shape_S, shape_T):
    for dtype, rtol in PRECISIONS:
        student = randn(*shape_S, dtype=dtype, seed=1, grad=True)
        teacher = randn(*shape_T, dtype=dtype, seed=2)
        loss = CriterionAT()(student, teacher)
        assert loss.dtype == dtype
        assert_same(loss, original_at_loss(student, teacher), [student], rtol)


def test_at_zero_feature_cross_size_and_precision():
    student = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = randn(2, 5, 4, 4, seed=3)
    loss = CriterionAT()(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and loss.item() > 0 and torch.count_nonzero(grad) == 0
    # a student at twice the teacher's size is resized to it
    student = randn(2, 3, 8, 10, seed=4, grad=True)
    teacher = randn(2, 5, 4, 5, seed=5)
    assert_same(CriterionAT()(student, teacher), original_at_loss(resized(student, teacher), teacher), [student], 1e-9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert CriterionAT()(student.detach().bfloat16(), teacher.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match='same N, h and w'):
        CriterionAT()(student, teacher[:1])


def test_fitnet_matches_original():
    fitnet = CriterionFitNet(3, 5)
    assert {key: tuple(value.shape) for key, value in fitnet.state_dict().items()} == {'conv.weight': (5, 3, 1, 1)}
    for dtype, rtol in PRECISIONS:
        module = CriterionFitNet(3, 5).to(dtype)
        student = randn(2, 3, 4, 6, dtype=dtype, seed=6, grad=True)
        teacher = randn(2, 5, 4, 6, dtype=dtype, seed=7)
        weight = module.conv.weight
        assert_same(module(student, teacher), original_fitnet_loss(weight, student, teacher), [student, weight], rtol)
    # a float32 module serves float64 features (the weight's gradient in float32); another size is resized
    module = CriterionFitNet(3, 5)
    student = randn(2, 3, 8, 12, seed=8, grad=True)
    loss = module(student, teacher)
    expected = original_fitnet_loss(module.conv.weight.double(), resized(student, teacher), teacher)
    assert_same(loss, expected, [student], 1e-9)
    loss.backward()
    assert module.conv.weight.grad.dtype == torch.float32 and module.conv.weight.grad.abs().sum() > 0


def test_fitnet_invalid():
    for args, name in [((0, 4), 's_channels'), ((3, 2.5), 't_channels'), ((None, 4), 's_channels')]:
        with pytest.raises(ValueError, match=name):
            CriterionFitNet(*args)
    with pytest.raises(ValueError, match='FitNet built for 3 student and 5 teacher'):
        CriterionFitNet(3, 5)(randn(2, 4, 3, 3), randn(2, 5, 3, 3))


# ---------------------------------------------------------------- DSD

def dsd_lists(channels_S, channels_T, size=(5, 6), dtype=torch.float64, seed=0, t_size=None):
    s_list = [randn(2, c, *size, dtype=dtype, seed=seed + i, grad=True) for i, c in enumerate(channels_S)]
    t_list = [randn(2, c, *(t_size or size), dtype=dtype, seed=seed + 10 + i) for i, c in enumerate(channels_T)]
    return s_list, t_list


@pytest.mark.parametrize('channels_S, channels_T', [
    ((3, 5, 3), (3, 8, 3)),  # aux logits, feature, logits: K = 3
    ((5, 3), (8, 3)),  # feature, logits: K = 1
    ((2, 4, 6, 3), (3, 5, 2, 3)),  # K = 6
])
def test_dsd_matches_original(channels_S, channels_T):
    for dtype, rtol in PRECISIONS:
        s_list, t_list = dsd_lists(channels_S, channels_T, size=(9, 11), dtype=dtype)  # odd: CSD's ceil pooling
        psd_loss, csd_loss = CriterionDoubleSimKD()(s_list, t_list)
        assert psd_loss.dtype == csd_loss.dtype == dtype  # the inputs' precision
        assert_same(psd_loss, original_psd_loss(s_list, t_list, accumulator_dtype=dtype), s_list, rtol)
        assert_same(csd_loss, original_csd_loss(s_list[-1], t_list[-1]), s_list[-1:], rtol)
        if dtype == torch.float64:  # the original as it ran rounds to its float32 accumulator
            assert psd_loss.item() == pytest.approx(original_psd_loss(s_list, t_list).item(), rel=1e-6)
    s_list, t_list = dsd_lists(channels_S, channels_T)
    csd_loss = CriterionDoubleSimKD(temperature=1.5)(s_list, t_list)[1]
    assert_same(csd_loss, original_csd_loss(s_list[-1], t_list[-1], tau=1.5), s_list[-1:], 1e-9)


def test_dsd_two_map_student_list_trains_the_logits():
    # the original's list for a student without an aux head, [logits, feature, logits], gives the logits
    # exactly zero PSD gradient; [feature, logits] (K = 1) gives them a gradient
    (feature, logits), teacher = dsd_lists((6, 3), (7, 3, 3), seed=20)
    (grad_original,) = torch.autograd.grad(original_psd_loss([logits, feature, logits], teacher, torch.float64), logits)
    assert torch.count_nonzero(grad_original) == 0
    psd_loss, _ = CriterionDoubleSimKD()([feature, logits], teacher[1:])
    (grad,) = torch.autograd.grad(psd_loss, logits)
    assert grad.abs().max() > 1e-4


def test_dsd_cross_size_teacher_and_precision():
    s_list, t_list = dsd_lists((3, 5, 3), (3, 4, 3), size=(8, 10), t_size=(4, 5), seed=30)
    psd_loss, csd_loss = CriterionDoubleSimKD()(s_list, t_list)
    small = [resized(x, t_list[0]) for x in s_list]
    assert_same(psd_loss, original_psd_loss(small, t_list, torch.float64), s_list, 1e-9)
    assert_same(csd_loss, original_csd_loss(small[-1], t_list[-1]), s_list[-1:], 1e-9)
    teacher_net = nn.Conv2d(3, 3, 1).double()
    t_list[-1] = teacher_net(t_list[-1])
    sum(CriterionDoubleSimKD()(s_list, t_list)).backward()
    assert teacher_net.weight.grad is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = CriterionDoubleSimKD()([x.detach().bfloat16() for x in s_list], [x.detach() for x in t_list])
    assert all(loss.dtype == torch.float64 for loss in losses)  # a float64 map: float64
    losses = CriterionDoubleSimKD()([x.detach().bfloat16() for x in s_list], [x.detach().half() for x in t_list])
    assert all(loss.dtype == torch.float32 for loss in losses)


def test_dsd_invalid():
    for temperature in (0, -1.0, float('nan'), float('inf'), 'x', None):
        with pytest.raises(ValueError, match='^temperature'):
            CriterionDoubleSimKD(temperature)
    s_list, t_list = dsd_lists((3, 5, 3), (3, 4, 3))
    dsd = CriterionDoubleSimKD()
    cases = [((s_list[:1], t_list[:1]), 'at least 2'), ((s_list, t_list[:2]), 'same number'),
             ((s_list[0], t_list), 's_list must be a list'), ((s_list, [t_list[0], t_list[1], t_list[1]]), 'classes'),
             ((s_list, [t_list[0][:1], *t_list[1:]]), 'share N'), ((s_list, [t_list[0][0], *t_list[1:]]), 'N x C')]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            dsd(*args)


# ---------------------------------------------------------------- GCN

def largest_saved(forward):
    """forward() run, and the most elements of a tensor its autograd graph keeps for the backward pass."""
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return max(sizes)


def test_gcn_keys():
    gcn = GCN(6)
    statistics = ('running_mean', 'running_var', 'num_batches_tracked')
    assert [key for key in gcn.state_dict() if not key.endswith(statistics)] == [
        'node_k.weight', 'node_v.weight', 'node_q.weight', 'conv1.0.weight', 'conv1.1.weight', 'conv1.1.bias',
        'out_conv.0.weight', 'out_conv.1.weight', 'out_conv.1.bias']
    assert gcn.node_q.weight.shape == (3, 6, 1, 1) and gcn.out_conv[0].weight.shape == (6, 12, 1, 1)


@pytest.mark.parametrize('train', [True, False])
def test_gcn_matches_original(train):
    torch.manual_seed(0)
    ours = GCN(6).double().train(train)
    with torch.no_grad():  # norms away from their initial identity, so that the comparison says something
        for module in ours.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
    original = OriginalGCN(6).double().train(train)
    original.load_state_dict(ours.state_dict())
    feat = randn(2, 6, 5, 7, seed=40, grad=True)
    weights = randn(2, 6, 5, 7, seed=41)
    out = ours(feat)
    assert out.shape == feat.shape and out.dtype == torch.float64 and (out >= 0).all()
    assert_same((out * weights).sum(), (original(feat) * weights).sum(), [feat, *ours.parameters()], 1e-9,
                reference_inputs=[feat, *original.parameters()])
    torch.testing.assert_close(ours.conv1[1].running_var, original.conv1[1].running_var, rtol=1e-12, atol=0)


@pytest.mark.parametrize('threads', [2, 3])
def test_gcn_attention_in_query_blocks(threads):
    # one image and several threads: the queries are cut into blocks (35 rows: the last block padded)
    query, key, value = (randn(1, 1, 35, 4, seed=seed, grad=True) for seed in (43, 44, 45))
    weights = randn(1, 1, 35, 4, seed=46)
    explicit = torch.softmax(query @ key.transpose(2, 3) * 0.5, dim=-1) @ value
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocked = gcn_module.attention(query, key, value, 0.5)
    finally:
        torch.set_num_threads(before)
    assert blocked.shape == explicit.shape
    assert_same((blocked * weights).sum(), (explicit * weights).sum(), [query, key, value], 1e-9)


def test_gcn_never_keeps_the_affinity_and_precision():
    gcn = GCN(4)
    feat = randn(1, 4, 12, 16, dtype=torch.float32, seed=42, grad=True)
    original = OriginalGCN(4)
    original.load_state_dict(gcn.state_dict())
    # the original keeps its 192 x 192 affinity for the backward pass
    assert largest_saved(lambda: original(feat)) == (12 * 16) ** 2
    assert largest_saved(lambda: gcn(feat)) <= 12 * 16 * 2 * 4  # at most h * w x (2 * plane): linear in h * w
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert gcn(feat.bfloat16()).dtype == torch.float32
    for plane in (1, 2.5, None):
        with pytest.raises(ValueError, match='plane'):
            GCN(plane)
    with pytest.raises(ValueError, match='GCN built for 4 channels'):
        gcn(feat[:, :3])


# ---------------------------------------------------------------- Af-DCD

AFDCD_KEYS = ['align.weight', 'align.bias', 'projector.0.weight', 'projector.0.bias', 'projector.2.weight',
              'projector.2.bias']
AFDCD_ENHANCED_KEYS = ['align.weight', 'align.bias'] + [f'projector.{layer}.{kind}' for layer in (
    'block_1.0', 'block_2.0', 'adapter_1', 'adapter_2') for kind in ('weight', 'bias')]


def afdcd_pair(c_s=3, c_t=8, dtype=torch.float64, seed=0, **settings):
    """Our module and the restated original with the same weights (the original's state_dict, in order)."""
    settings.setdefault('M_ocd', 4)
    torch.manual_seed(seed)
    original = OriginalOmniContrastive(c_s, c_t, **settings).to(dtype)
    ours = OmniContrastiveFeatureLoss(c_s, c_t, **settings).to(dtype)
    ours.load_state_dict(dict(zip(ours.state_dict(), original.state_dict().values(), strict=True)))
    return ours, original


def afdcd_teacher(*shape, dtype=torch.float64, seed=0):
    """A post-ReLU teacher feature at the scale of the projector's output at initialisation: a teacher far above
    every student sample would give the contrast an exactly zero gradient (all L1 signs alike)."""
    return randn(*shape, dtype=dtype, seed=seed).relu() * 0.1


def assert_same_terms(ours, reference, inputs, rtol, reference_inputs=None):
    for term, expected in zip(ours, reference, strict=True):
        assert_same(term, expected, inputs, rtol, reference_inputs)


@pytest.mark.parametrize('enhance, keys', [(False, AFDCD_KEYS), (True, AFDCD_ENHANCED_KEYS)])
def test_afdcd_keys_map_the_original_in_order(enhance, keys):
    ours, original = afdcd_pair(enhance_projector=enhance)
    assert list(ours.state_dict()) == keys
    assert [value.shape for value in ours.state_dict().values()] == \
        [value.shape for value in original.state_dict().values()]
    assert isinstance(ours.projector, EnhancedProjector) == enhance
    assert OmniContrastiveFeatureLoss(3, 8, M_ocd=4, patch_size=2).patch_size == (2, 2)
    ours.generator = torch.Generator()
    assert 'generator' not in str(list(ours.state_dict()))


@pytest.mark.parametrize('settings, size', [
    (dict(), (16, 16)),  # pooled 4 x 4: one patch per image
    (dict(enhance_projector=True, tau_ocd=0.5, mask_ratio=0.5), (16, 32)),
    (dict(dataset='camvid', patch_size=(2, 3)), (4, 9)),  # no pooling, 2 x 3 patches
    (dict(M_ocd=2, pool_size=2, patch_size=(2, 2)), (8, 4)),
])
def test_afdcd_matches_original(settings, size):
    for dtype, rtol in PRECISIONS:
        ours, original = afdcd_pair(dtype=dtype, **settings)
        student = randn(2, 3, *size, dtype=dtype, seed=50, grad=True)
        teacher = afdcd_teacher(2, 8, *size, dtype=dtype, seed=51)
        uniform = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(52))
        mask = original_mask(uniform, ours.mask_ratio)
        terms = ours(student, teacher, mask=mask.to(dtype))
        assert all(term.dtype == dtype for term in terms)
        assert_same_terms(terms, original(student, teacher, uniform=uniform), [student, *ours.parameters()], rtol,
                          [student, *original.parameters()])


def test_afdcd_draws_follow_the_original():
    ours, original = afdcd_pair(seed=1)
    student, teacher = randn(1, 3, 16, 16, seed=60, grad=True), afdcd_teacher(1, 8, 16, 16, seed=61)
    # the generator attribute: the original's rule on torch.rand from that generator
    ours.generator = torch.Generator().manual_seed(7)
    uniform = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours.make_mask(1, 16, 16, dtype=torch.float64), original_mask(uniform, 0.75).double())
    ours.generator.manual_seed(7)
    assert_same_terms(ours(student, teacher), original(student, teacher, uniform=uniform), [student], 1e-9)
    first, second = ours.make_mask(1, 16, 16), ours.make_mask(1, 16, 16)
    assert not torch.equal(first, second) and 0.1 < float(first.mean()) < 0.4
    # None: torch's default generator, as the original
    ours.generator = None
    torch.manual_seed(8)
    terms = ours(student, teacher)
    torch.manual_seed(8)
    assert_same_terms(terms, original(student, teacher), [student], 1e-9)
    # the fixed middle block
    ours, original = afdcd_pair(seed=2, rand_mask=False)
    state = torch.random.get_rng_state()
    assert_same_terms(ours(student, teacher), original(student, teacher), [student], 1e-9)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn
    assert ours.make_mask(1, 6, 9)[0, 0].tolist() == [[1] * 9] * 2 + [[1] * 3 + [0] * 3 + [1] * 3] * 2 + [[1] * 9] * 2


def test_afdcd_equal_channels_and_crops():
    ours = OmniContrastiveFeatureLoss(8, 8, M_ocd=4).double()
    assert isinstance(ours.align, nn.Identity) and list(ours.state_dict()) == AFDCD_KEYS[2:]
    student, teacher = randn(2, 8, 20, 28, seed=70, grad=True), afdcd_teacher(2, 8, 20, 28, seed=71)
    mask = original_mask(torch.rand(2, 1, 20, 28, generator=torch.Generator().manual_seed(72)), 0.75).double()
    terms = ours(student, teacher, mask=mask)
    rebuilt = ours.projector(student * mask)
    # pooled 5 x 7 is cropped to 4 x 4: the pooling of the top-left 16 x 16
    dis_loss = F.mse_loss(rebuilt, teacher, reduction='sum') / 2
    ctr_loss = original_contrastive_term(rebuilt[:, :, :16, :16], teacher[:, :, :16, :16], groups=4) / 2
    assert_same_terms(terms, (dis_loss, ctr_loss), [student], 1e-9)
    with pytest.raises(AttributeError):  # the original had no align layer to call
        OriginalOmniContrastive(8, 8, M_ocd=4).double()(student, teacher)
    # CamVid: no pooling, 10 x 13 cropped to 8 x 12 (the original cut 44 x 44)
    ours = OmniContrastiveFeatureLoss(3, 8, M_ocd=4, dataset='camvid').double()
    student, teacher = randn(1, 3, 10, 13, seed=73, grad=True), afdcd_teacher(1, 8, 10, 13, seed=74)
    mask = torch.ones(1, 1, 10, 13, dtype=torch.float64)
    rebuilt = ours.projector(ours.align(student))
    expected = original_feature_terms(rebuilt[:, :, :8, :12], teacher[:, :, :8, :12], groups=4, pool_size=0)
    dis_loss, ctr_loss = ours(student, teacher, mask=mask)
    assert_same(ctr_loss, expected[1], [student], 1e-9)
    assert_same(dis_loss, F.mse_loss(rebuilt, teacher, reduction='sum'), [student], 1e-9)


def test_afdcd_cross_size_precision_and_teacher():
    ours, original = afdcd_pair(dtype=torch.float32, seed=3)
    student, teacher = randn(2, 3, 8, 8, seed=80, grad=True), afdcd_teacher(2, 8, 16, 16, seed=81)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    terms = ours(student, teacher, mask=mask)  # a float32 module, float64 features: float64
    reference = original.double()(resized(student, teacher), teacher, uniform=torch.zeros(2, 1, 16, 16))
    assert_same_terms(terms, reference, [student], 1e-9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        terms = ours(student.detach().bfloat16(), teacher.bfloat16(), mask=mask)
    assert all(term.dtype == torch.float32 and torch.isfinite(term) for term in terms)
    teacher_net = nn.Conv2d(8, 8, 1)
    sum(ours(student.float(), teacher_net(teacher.float()), mask=mask)).backward()
    assert teacher_net.weight.grad is None


@pytest.mark.parametrize('settings, name', [
    (dict(M_ocd=3), 'M_ocd'), (dict(M_ocd=0), 'M_ocd'), (dict(tau_ocd=0), 'tau_ocd'), (dict(tau_ocd='a'), 'tau_ocd'),
    (dict(mask_ratio=-0.1), 'mask_ratio'), (dict(mask_ratio=1.5), 'mask_ratio'), (dict(rand_mask='False'), 'rand_mask'),
    (dict(enhance_projector=1), 'enhance_projector'), (dict(pool_size=-1), 'pool_size'),
    (dict(patch_size=(0, 4)), 'patch_size'), (dict(patch_size=(4, 4, 4)), 'patch_size'),
    (dict(dataset=None), 'dataset'),
    (dict(student_channels=0), 'student_channels'), (dict(teacher_channels=2.0), 'teacher_channels'),
])
def test_afdcd_invalid_settings(settings, name):
    arguments = dict(student_channels=3, teacher_channels=8, M_ocd=4) | settings
    with pytest.raises(ValueError, match=name):
        OmniContrastiveFeatureLoss(**arguments)


def test_afdcd_invalid_inputs():
    ours = OmniContrastiveFeatureLoss(3, 8, M_ocd=4)
    student, teacher = randn(1, 3, 16, 16, dtype=torch.float32), randn(1, 8, 16, 16, dtype=torch.float32)
    for mask, message in [(torch.ones(1, 1, 16, 8), 'shape'), (torch.ones(1, 16, 16), 'shape'),
                          (torch.full((1, 1, 16, 16), 0.5), 'only 0 and 1'), (torch.ones(1, 1, 16, 16).long(), 'bool')]:
        with pytest.raises(ValueError, match=message):
            ours(student, teacher, mask=mask)
    with pytest.raises(ValueError, match='hold no patch'):
        ours(student[:, :, :12], teacher[:, :, :12])
    with pytest.raises(ValueError, match='Af-DCD built for 3 student and 8 teacher'):
        ours(teacher, teacher)
    ours.generator = 5
    with pytest.raises(ValueError, match='generator'):
        ours(student, teacher)


def test_contrast_finite_when_left_out_samples_are_far_closer():
    """The teacher samples of a row's own group at the other pixels are neither its positive nor a negative; when
    they are far closer to the student sample than every sample the row compares (logits hundreds of units
    above the row's peak), the term stays finite and equals the original's (the left-out entries never reach
    exp())."""
    from losses.afdcd import omni_contrastive_loss
    pixels = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    groups = torch.arange(16, dtype=torch.float64).repeat_interleave(2).view(1, 32, 1, 1)
    teacher = 1000 * pixels + 100 * groups  # samples far apart by pixel, and by group
    student = torch.roll(teacher, shifts=1, dims=3).requires_grad_()  # each pixel holds its neighbour's teacher
    got = omni_contrastive_loss(student, teacher, 16, (4, 4), 0.07)
    expected = original_contrastive_term(student, teacher, pool_size=0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    got.backward()
    assert torch.isfinite(student.grad).all()
