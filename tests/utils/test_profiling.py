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


def test_counts_the_calls_that_make_the_host_wait():
    x = torch.rand(6)
    with OperatorCalls() as none:
        y = torch.where(x > 0.5, x, 0.0).sort().values.cumsum(0)
    assert none.host_waits == 0 and none.calls >= 4
    with OperatorCalls() as waits:
        y.sum().item()
        x[x > 0.5]
        (x > 2).nonzero()
        bool(x[0] > 0)
        x[torch.tensor([0, 2])]  # integer indices: no wait
    assert waits.host_waits == 4, waits.waiting
