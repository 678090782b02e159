"""Counting what a piece of eager PyTorch code asks of the device."""

from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class OperatorCalls(TorchDispatchMode):
    """Counts the operator calls that reach the device kernels (views left out), forward and
    backward alike: about one kernel launch each on a GPU, where a step of many small kernels
    is bound by launching them, whatever their size. Use as ``with OperatorCalls() as c: ...``,
    then read ``c.calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        self.calls += not func.is_view
        return func(*args, **(kwargs or {}))
