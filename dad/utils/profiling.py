"""Counting what a piece of eager PyTorch code asks of the device."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# operators whose result size or value the host needs before it can go on: on a GPU each one
# waits for every kernel queued before it (``.item()``, ``.tolist()``, ``bool(t)``, boolean
# masks, ``nonzero``, ``unique``, ...). Boolean-mask indexing calls nonzero inside its kernel,
# out of the dispatcher's sight, so it is recognised by its index dtype.
_SYNCING = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
    _aten.is_nonzero.default, _aten.equal.default, _aten._unique.default, _aten._unique2.default,
    _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.unique_dim_consecutive.default,
    _aten.repeat_interleave.Tensor, _aten.bincount.default,
}
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}


def _waits_for_device(func, args, kwargs) -> bool:
    if func in _SYNCING:
        return True
    if func is _aten._to_copy.default:  # a device tensor copied to the host (seen on GPUs only)
        return args[0].device.type != "cpu" and torch.device(kwargs.get("device") or args[0].device).type == "cpu"
    if func in _INDEXING and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return False


class OperatorCalls(TorchDispatchMode):
    """Counts the operator calls that reach the device kernels (views left out), forward and
    backward alike: about one kernel launch each on a GPU, where a step of many small kernels
    is bound by launching them, whatever their size. ``host_waits`` counts the calls among them
    that make the host wait for the device on a GPU, and ``waiting`` names them; on CPUs too,
    except ``.tolist()``/``.numpy()``, which read CPU memory without calling an operator. Use as ``with OperatorCalls() as c: ...``, then read ``c.calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.host_waits = 0
        self.waiting: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        self.calls += not func.is_view
        if _waits_for_device(func, args, kwargs or {}):
            self.host_waits += 1
            self.waiting.append(str(func))
        return func(*args, **(kwargs or {}))
