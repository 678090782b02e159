"""dad.utils.profiling: counting the operator calls that reach the device."""

from __future__ import annotations

import torch

from dad.utils.profiling import OperatorCalls


def test_counts_forward_and_backward_calls_and_leaves_views_out():
    x = torch.rand(4, 5, requires_grad=True)
    with OperatorCalls() as forward:
        y = (x.sin() * 2).sum()
    assert forward.calls == 3  # sin, mul, sum
    with OperatorCalls() as views:
        x.detach().view(20).t().reshape(5, 4)[1:]
    assert views.calls == 0
    with OperatorCalls() as backward:
        y.backward()
    assert backward.calls >= 3  # the gradient of sum, mul and sin: more kernels, not views
    assert torch.allclose(x.grad, 2 * x.detach().cos())
