"""Forward + backward time and peak memory of Af-DCD's terms, DSD and CIRKDv2's GCN block against the original
algorithms (restated in tests/reference/at_fitnet_dsd_gcn_afdcd.py), side by side in one process.

    .venv/bin/python bench/bench_dsd_gcn_afdcd.py [--repeats 5] [--threads 2] [--device cpu] [--projector]
    .venv/bin/python bench/bench_dsd_gcn_afdcd.py --smoke      # tiny shapes, one round (the test's)

Cityscapes shapes per GPU (the original scripts' batches):
- Af-DCD: 2 images, the teacher's last stage (ResNet-101 c4, 2048 channels) at 64 x 128; the two terms
  weighted as the Cityscapes script (2e-6 x FD + 0.005 x CTR), from the projector's output (the 3x3
  convolutions 2048 -> 2048 in front, the same layers in both, cost minutes on a CPU); with --projector,
  the whole module from the student's c4 (ResNet-18, 512 channels) with the same weights in both;
- DSD: 2 images, [aux logits (19), feature (512), logits (19)] at 64 x 128 for both networks,
  1000 x PSD + 10 x CSD; the original sums PSD's pair terms in a Python loop into a float32 tensor;
- GCN: a 128-channel 64 x 128 feature, 1 and 2 images; the original forms the 8192 x 8192 softmax affinity
  of each image explicitly, the block here calls scaled_dot_product_attention.

The candidates of a case run interleaved (every round in a new random order) and the table shows the medians
over the rounds and their ratio to the original. Peak memory: on a GPU, torch.cuda.max_memory_allocated
during one forward + backward, minus what was allocated before; on the CPU, the peak of the bytes torch's CPU
allocator held during one forward + backward above what it held before (from the profiler's memory events).
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.table import interleaved_medians, markdown_table  # noqa: E402
from losses import GCN, CriterionDoubleSimKD, OmniContrastiveFeatureLoss  # noqa: E402
from tests.reference.at_fitnet_dsd_gcn_afdcd import (  # noqa: E402
    OriginalGCN,
    OriginalOmniContrastive,
    original_csd_loss,
    original_feature_terms,
    original_psd_loss,
)

ORIGINAL = 'original algorithm'
# Cityscapes per GPU, and the smoke test's tiny version
FULL = dict(batch=2, height=64, width=128, afdcd_student=512, afdcd_teacher=2048, groups=16, classes=19,
            dsd_feature=512, gcn_channels=128, gcn_batches=(1, 2))
SMOKE = dict(batch=1, height=16, width=16, afdcd_student=8, afdcd_teacher=32, groups=4, classes=3, dsd_feature=6,
             gcn_channels=8, gcn_batches=(1, 2))
LAMBDA_FD, LAMBDA_CTR = 2e-6, 0.005  # the Cityscapes scripts of OSVAI/Af-DCD
LAMBDA_PSD, LAMBDA_CSD = 1000, 10  # scripts/train_kd/train_dsd.sh of winycg/CIRKD


class Candidate:
    """A forward pass giving a loss, the tensors whose gradients to clear before it, and the tensors that exist
    before it (inputs, parameters), which memory held for the backward pass does not count."""

    def __init__(self, forward, clear, persistent=()):
        self.forward = forward
        self.clear = list(clear)
        self.persistent = {tensor.untyped_storage().data_ptr() for tensor in [*self.clear, *persistent]}

    def clear_grads(self):
        for tensor in self.clear:
            tensor.grad = None

    def run(self):
        self.forward().backward()

    def step(self):
        self.clear_grads()
        self.run()

    def saved_bytes(self):
        """The bytes of the storages the autograd graph keeps for the backward pass (new ones only)."""
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.persistent:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.clear_grads()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = self.forward()
        loss.backward()
        return sum(storages.values())


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_bytes(candidate, device):
    """The bytes allocated at the peak of a forward + backward above what was allocated before it: the CUDA
    allocator's statistics, or on the CPU the profiler's memory events (its first use in a process takes
    seconds). The gradients are cleared first, so that no block allocated before is freed during the step (the
    profiler does not report those frees)."""
    candidate.clear_grads()
    step = candidate.run
    if device.type == 'cuda':
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == '[memory]']
    held = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def measure(candidates, repeats, device, with_peak, seed=0):
    """{name: (median seconds, saved bytes, peak bytes or None)} of the Candidates `candidates` ({name: candidate})."""
    def time_once(candidate):
        synchronize(device)
        start = time.perf_counter()
        candidate.step()
        synchronize(device)
        return time.perf_counter() - start

    medians = interleaved_medians(candidates, time_once, repeats, seed)
    return {name: (medians[name], candidate.saved_bytes(), peak_bytes(candidate, device) if with_peak else None)
            for name, candidate in candidates.items()}


def afdcd_candidates(shape, device, generator, with_projector):
    n, h, w = shape['batch'], shape['height'], shape['width']
    c_s, c_t, groups = shape['afdcd_student'], shape['afdcd_teacher'], shape['groups']
    teacher = torch.randn(n, c_t, h, w, generator=generator).relu_().to(device)
    ours = OmniContrastiveFeatureLoss(c_s, c_t, M_ocd=groups).to(device)

    def weighted(terms):
        def loss():
            dis_loss, ctr_loss = terms()
            return LAMBDA_FD * dis_loss + LAMBDA_CTR * ctr_loss
        return loss

    if with_projector:
        original = OriginalOmniContrastive(c_s, c_t, M_ocd=groups).to(device)
        original.load_state_dict(dict(zip(original.state_dict(), ours.state_dict().values(), strict=True)))
        student = torch.randn(n, c_s, h, w, generator=generator).relu_().to(device).requires_grad_()
        uniform = torch.rand(n, 1, h, w, generator=generator)
        mask = (uniform <= 0.25).float()  # the original's rule for mask_ratio 0.75
        return f'{n} x {c_s} -> {c_t} x {h} x {w}, with the projector', {
            'OmniContrastiveFeatureLoss': Candidate(weighted(lambda: ours(student, teacher, mask=mask)),
                                                    [student, *ours.parameters()], [teacher]),
            ORIGINAL: Candidate(weighted(lambda: original(student, teacher, uniform=uniform)),
                                [student, *original.parameters()], [teacher])}
    rebuilt = torch.randn(n, c_t, h, w, generator=generator).to(device).requires_grad_()
    return f'{n} x {c_t} x {h} x {w}, from the projector output', {
        'OmniContrastiveFeatureLoss': Candidate(weighted(lambda: ours.feature_terms(rebuilt, teacher)), [rebuilt],
                                                [teacher]),
        ORIGINAL: Candidate(weighted(lambda: original_feature_terms(rebuilt, teacher, groups=groups)), [rebuilt],
                            [teacher])}


def dsd_candidates(shape, device, generator):
    n, h, w, classes, feature = shape['batch'], shape['height'], shape['width'], shape['classes'], shape['dsd_feature']

    def maps(grad):
        listed = [torch.randn(n, c, h, w, generator=generator).to(device) for c in (classes, feature, classes)]
        return [x.requires_grad_() for x in listed] if grad else listed

    s_list, t_list = maps(True), maps(False)
    ours = CriterionDoubleSimKD()

    def ours_loss():
        psd_loss, csd_loss = ours(s_list, t_list)
        return LAMBDA_PSD * psd_loss + LAMBDA_CSD * csd_loss

    def original_loss():
        return LAMBDA_PSD * original_psd_loss(s_list, t_list) + LAMBDA_CSD * original_csd_loss(s_list[-1], t_list[-1])

    return f'{n} x [{classes}, {feature}, {classes}] x {h} x {w}', {
        'CriterionDoubleSimKD': Candidate(ours_loss, s_list, t_list),
        ORIGINAL: Candidate(original_loss, s_list, t_list)}


def gcn_candidates(shape, device, generator, batch):
    channels, h, w = shape['gcn_channels'], shape['height'], shape['width']
    feat = torch.randn(batch, channels, h, w, generator=generator).relu_().to(device).requires_grad_()
    ours = GCN(channels).to(device)
    original = OriginalGCN(channels).to(device)
    original.load_state_dict(ours.state_dict())
    return f'{batch} x {channels} x {h} x {w}', {
        'GCN (scaled_dot_product_attention)': Candidate(lambda: ours(feat).sum(), [feat, *ours.parameters()]),
        f'{ORIGINAL} (explicit affinity)': Candidate(lambda: original(feat).sum(), [feat, *original.parameters()])}


def rows_of(term, label, results):
    original = next(seconds for name, (seconds, _, _) in results.items() if name.startswith(ORIGINAL))
    return [(term, label, name, f'{seconds * 1e3:.1f}', f'{seconds / original:.2f}', f'{saved / 1e6:.1f}',
             '-' if peak is None else f'{peak / 1e6:.1f}')
            for name, (seconds, saved, peak) in results.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5, help='interleaved rounds (after one warm-up round)')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:index]')
    parser.add_argument('--projector', action='store_true',
                        help="Af-DCD: time the whole module (align and projector included)")
    parser.add_argument('--smoke', action='store_true', help='tiny shapes and one round: checks that it runs')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SMOKE if args.smoke else FULL
    repeats = 1 if args.smoke else args.repeats
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # the CPU profiler's first use costs seconds: not in the smoke run
    with_peak = device.type == 'cuda' or not args.smoke
    cases = [('Af-DCD (FD + CTR)', afdcd_candidates(shape, device, generator, args.projector)),
             ('DSD (PSD + CSD)', dsd_candidates(shape, device, generator))]
    cases += [('GCN', gcn_candidates(shape, device, generator, batch)) for batch in shape['gcn_batches']]
    rows = []
    for term, (label, candidates) in cases:
        rows += rows_of(term, label, measure(candidates, repeats, device, with_peak))
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {args.threads} thread(s)'
    allocator = 'the CUDA allocator' if device.type == 'cuda' else "torch's CPU allocator (profiler memory events)"
    print(f'\nforward + backward, float32, {where}, median over {repeats} interleaved round(s); saved: the storages '
          f'the autograd graph keeps for the backward pass; peak: the most bytes {allocator} held during one forward + '
          'backward above what it held before\n')
    print('\n'.join(markdown_table(('term', 'shape', 'candidate', 'median (ms)', 'x original', 'saved (MB)',
                                    'peak (MB)'), rows, numeric=(3, 4, 5, 6))))


if __name__ == '__main__':
    main()
