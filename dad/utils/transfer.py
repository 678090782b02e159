"""Host <-> device copies that do not make the host wait for the device."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def pinned(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A copy of a host array or tensor in pinned (page-locked) memory (CUDA only), made by
    numpy in this thread. ``Tensor.pin_memory()`` copies on torch's intra-op threads, which then
    spin for milliseconds waiting for more work: on a 16-core node ~150 ms of CPU time per copy,
    taken from the image workers (``benchmarks/cache.py``'s CPU time by thread)."""
    if isinstance(array, torch.Tensor):
        if array.is_pinned():
            return array
        if array.dtype == torch.bfloat16 or array.requires_grad:  # no numpy view of these
            return array.pin_memory()
        array = array.numpy()
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype  # numpy's dtype as torch's
    out = torch.empty(array.shape, dtype=dtype, pin_memory=True)
    np.copyto(out.numpy(), array)
    return out


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array or tensor on ``device``. To a GPU it goes from pinned memory: from pageable
    memory a copy may wait for the GPU's queue to empty, from pinned memory it is queued like a
    kernel. A tensor already on ``device`` is returned as it is."""
    if isinstance(array, torch.Tensor) and array.device == device:
        return array
    if device.type == "cuda":
        return pinned(array).to(device, non_blocking=True)
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(device)


class HostArrays:
    """Device tensors on their way to the host. From a GPU they are copied into pinned memory
    without blocking, so the host can queue more work before it waits for these and the GPU
    does not idle meanwhile; ``arrays()`` waits for the copies. From elsewhere they are copied
    at once. None entries stay None."""

    def __init__(self, tensors: Sequence[torch.Tensor | None]) -> None:
        self._done: torch.cuda.Event | None = None
        on_gpu = [t for t in tensors if t is not None and t.is_cuda]
        if on_gpu:
            with torch.cuda.device(on_gpu[0].device):  # queued, and waited for, on that GPU's stream (not cuda:0's)
                self._host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                              for t in tensors]
                # a blocking event: the waiting thread sleeps, where a default one spins a core
                self._done = torch.cuda.Event(blocking=True)
                self._done.record(torch.cuda.current_stream(on_gpu[0].device))
        else:
            self._host = [None if t is None else t.detach().cpu() for t in tensors]

    @property
    def asynchronous(self) -> bool:
        """Whether the tensors were still being computed or copied when this was made (GPUs);
        elsewhere they were complete before the launching call returned."""
        return self._done is not None

    def arrays(self) -> list[np.ndarray | None]:
        if self._done is not None:
            self._done.synchronize()
        return [None if h is None else h.numpy() for h in self._host]
