"""Assertions shared by the loss tests (pytest puts tests/ on sys.path)."""
import math

import pytest
import torch


def assert_same(ours, reference, inputs, rtol, reference_inputs=None):
    """Equal finite values, and equal gradients with respect to every tensor of `inputs` (of
    `reference_inputs`, their counterparts, for the reference)."""
    assert ours.dtype == reference.dtype
    assert math.isfinite(ours.item())
    assert ours.item() == pytest.approx(reference.item(), rel=rtol, abs=rtol)
    grads = torch.autograd.grad(ours, inputs, retain_graph=True)
    reference_grads = torch.autograd.grad(reference, reference_inputs or inputs, retain_graph=True)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        # relative to the largest entry, plus half an ulp of 1: a gradient that is pure rounding noise
        # (DIST's inter-class term with two classes: the correlation of two points is always +-1) passes
        atol = rtol * reference_grad.abs().max().item() + torch.finfo(grad.dtype).eps / 2
        torch.testing.assert_close(grad, reference_grad, rtol=rtol, atol=atol)
