"""No setting's size kills the process: buffers are checked against the memory that is free before
they are allocated, and an allocation that still fails becomes one line naming the setting.

The kernel's out-of-memory killer gives no message and may take other processes with it, so the
check comes first: what a buffer needs is known exactly (rows x image bytes); what is free is the
smallest of the address-space limit of this process (``ulimit -v``), the machine's available
memory, and on CUDA the device's free memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from collections.abc import Iterator

import torch

from tbn_ray.errors import TbnError

#: Of the free memory, the share buffers may take: the forward pass needs room beside them.
BUFFER_SHARE = 0.5


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def free_bytes(device: torch.device) -> float:
    """Memory this process can still take on ``device`` (an estimate, never above the truth's order)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    limits = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limits.append(soft - used)
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            limits.append(int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024)
    return float(min(limits)) if limits else math.inf


def check_fits(needed: float, device: torch.device, setting: str) -> None:
    """Refuse at once, in one line naming ``setting``, buffers that would not fit beside the forward pass."""
    free = free_bytes(device)
    if needed > BUFFER_SHARE * free:
        raise TbnError(
            f"{setting} needs {_gib(needed)} of buffers on {device.type}, more than half of the {_gib(free)} free: lower it"
        )


@contextlib.contextmanager
def named_failure(setting: str, device: torch.device) -> Iterator[None]:
    """An allocation that fails inside (the forward pass at this batch size) is one line naming ``setting``."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise TbnError(f"{setting}: out of {device.type} memory in a forward pass; lower it") from None
    except RuntimeError as e:
        if "allocate" not in str(e) and "out of memory" not in str(e):
            raise
        raise TbnError(
            f"{setting}: out of {device.type} memory in a forward pass ({str(e).splitlines()[0][:120]}); lower it"
        ) from None
