"""Devices: names as users write them (``--device``, ``--dtype``), resolved in one place; honest clocks;
running out of memory recognised on every device.

``ptp infer`` and ``ptp bench`` accept the same spellings and fail with the same one-line errors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ptp_cli.errors import OutOfMemoryError, UsageError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; else ``UsageError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` (bf16 on CUDA, fp32 on CPU: CPU half-precision matmuls are slow) or a name in ``DTYPES``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name reports and rows carry)."""
    return str(dtype).removeprefix("torch.")


# How allocators other than CUDA's caching one say that memory ran out: the CPU's DefaultCPUAllocator raises a
# plain RuntimeError ("can't allocate memory"), MPS and XPU say "... out of memory", a CUDA error outside the
# caching allocator is "CUDA error: out of memory".
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that a device (or the host) ran out of memory, whichever device raised it."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OUT_OF_MEMORY)


def free_cached_memory() -> None:
    """After a failed batch (often out of memory), hand the allocator's cached blocks back before retrying."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Stage wall times; synchronises the device before each reading so GPU work is attributed correctly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        sync_device(device)
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        sync_device(self.device)
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + now - self.t
        self.t = now


@contextlib.contextmanager
def out_of_memory_stage(name: str) -> Iterator[None]:
    """Turn running out of memory (on any device: CUDA, the CPU allocator, MPS) into ``OutOfMemoryError`` naming
    the stage, which callers treat as the batch's failure (split it, retry); other exceptions pass untouched."""
    try:
        yield
    except Exception as e:
        if isinstance(e, OutOfMemoryError) or not is_out_of_memory(e):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        raise OutOfMemoryError(f"out of memory in {name}: {type(e).__name__}: {first_line}", stage=name) from e
