"""Votes of a base classifier for many images at once: the packed sampling engine.

A certification procedure (``smoothing.cohen_certify``, ``adaptive.AdaptiveSampling``) is a
generator that yields "k more noisy draws, please" and is sent back the class counts of
those k draws. ``PackedSampler`` runs several such procedures side by side: every forward
pass is filled with up to ``batch_size`` noisy copies taken from the pending requests of
up to ``images_per_pass`` images, and the votes are scattered back per image with one
``index_add_`` over (image slot, class). Counts stay on the device; the host reads them
only when a request is complete, because only then does a procedure decide its next step.

Why packing keeps every image's numbers its own: an image's noise comes only from its own
generator, drawn in chunks of ``min(rows left in the request, batch_size)`` -- a sequence
that depends on that image alone, and the same one the unpacked path (``Smooth``) draws --
so its noisy inputs are bit-identical whichever images share its passes. Only the batch
composition of the forward pass changes, which may change float rounding of the logits.
That is why packing is an option (a different, equally fixed, base-classifier evaluation)
and not the default.

Nothing here validates the model: ``smoothing.certify_examples`` checks it once per call
(``check_fixed_classifier``) before any pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tbn_ray.errors import TbnError
from tbn_ray.science.memory import check_fits, named_failure

#: A certification procedure: yields a number of draws, is sent their counts, returns its outcome.
Procedure = Generator[int, np.ndarray, Any]


def check_logits(logits: Tensor, rows: int, num_classes: int) -> None:
    """The base classifier must return one row of ``num_classes`` logits per input."""
    if logits.shape != (rows, num_classes):
        raise TbnError(f"the model returned logits of shape {tuple(logits.shape)}, expected ({rows}, {num_classes})")


def compiled(model: nn.Module, backend: str | None) -> nn.Module:
    """``torch.compile(model, backend=...)`` when a backend is named, else the model itself.

    Opt-in (GPU throughput): compiling costs seconds to minutes up front and recompiles
    per batch shape, which the packed engine keeps to about one (full passes).
    """
    if backend is None:
        return model
    if not backend:
        raise TbnError("compile backend must be a torch.compile backend name (e.g. inductor), or None")
    return torch.compile(model, backend=backend, dynamic=False)  # type: ignore[return-value]


@contextmanager
def cudnn_benchmark(device: torch.device, enabled: bool) -> Iterator[None]:
    """cuDNN autotuning for the duration of a call on CUDA (restored after); nothing elsewhere.

    It picks the fastest convolution algorithm per input shape, which may differ in rounding
    from the default choice, so it is a setting the caller opts into.
    """
    if not (enabled and device.type == "cuda"):
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass
class _Slot:
    """One image in flight: its input, noise generator, procedure and current request."""

    job: int
    x: Tensor
    generator: torch.Generator
    procedure: Procedure
    undrawn: int = 0  # rows of the current request whose noise is not drawn yet
    chunk_left: int = 0  # drawn rows of the current chunk not placed in a pass yet
    chunk_at: int = 0  # where those rows start in the slot's noise buffer
    rows: int = 0  # forward rows used by this image so far


class PackedSampler:
    """Runs certification procedures for many images, several images per forward pass."""

    def __init__(
        self,
        base: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        batch_size: int,
        images_per_pass: int,
        device: torch.device,
        channels_last: bool = False,
        max_request: int | None = None,
    ) -> None:
        if images_per_pass < 1:
            raise TbnError(f"images_per_pass must be >= 1, got {images_per_pass}")
        if batch_size < 1:
            raise TbnError(f"batch_size must be >= 1, got {batch_size}")
        self.base, self.num_classes, self.sigma = base, num_classes, sigma
        self.batch_size, self.slots, self.device, self.channels_last = (
            batch_size,
            images_per_pass,
            device,
            channels_last,
        )
        self.max_request = max_request  # the most draws a procedure asks for at once, if known: bounds the buffers

    def run(
        self,
        inputs: Sequence[Tensor],
        generators: Sequence[torch.Generator],
        procedures: Sequence[Procedure],
        on_done: Callable[[], None] | None = None,
    ) -> tuple[list[Any], list[int], float]:
        """Each procedure's outcome, each image's forward rows, and the wall seconds of the whole run;
        ``on_done`` is called as each procedure finishes."""
        start = time.perf_counter()
        shape = tuple(inputs[0].shape)
        outcomes: list[Any] = [None] * len(inputs)
        rows = [0] * len(inputs)
        jobs = iter(range(len(inputs)))
        active: dict[int, _Slot] = {}
        # buffers for the images and draws that exist: no more slots than images, no more noise rows
        # per slot than a request can use; passes are still filled up to batch_size rows
        k, c = min(self.slots, max(1, len(inputs))), self.num_classes
        per_slot = min(self.batch_size, self.max_request or self.batch_size)
        b = min(self.batch_size, k * per_slot)
        free = list(range(k))
        dtype = inputs[0].dtype
        image_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        check_fits(
            (k * per_slot + b) * image_bytes,
            self.device,
            f"--images-per-pass {self.slots} with --batch-size {self.batch_size}",
        )
        noise = torch.empty((k, per_slot, *shape), dtype=dtype, device=self.device)
        batch = torch.empty((b, *shape), dtype=dtype, device=self.device)
        owner = torch.empty(b, dtype=torch.int64, device=self.device)
        counts = torch.zeros(k * c, dtype=torch.int64, device=self.device)
        ones = torch.ones(b, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            while True:
                for slot_id in list(free):  # start new images in the free slots, in input order
                    job = next(jobs, None)
                    if job is None:
                        break
                    free.remove(slot_id)
                    slot = _Slot(job, inputs[job].to(self.device), generators[job], procedures[job])
                    active[slot_id] = slot
                    self._advance(slot, None, outcomes, rows, self.max_request)
                    if slot.undrawn == 0:  # finished without drawing (e.g. a zero-draw procedure)
                        del active[slot_id]
                        free.append(slot_id)
                        if on_done is not None:
                            on_done()
                if not active:
                    break
                used = self._fill(active, noise, batch, owner, b)
                with named_failure(f"--batch-size {self.batch_size}", self.device):
                    logits = self.base(
                        batch[:used].contiguous(memory_format=torch.channels_last)
                        if self.channels_last
                        else batch[:used]
                    )
                check_logits(logits, used, c)
                counts.index_add_(0, owner[:used] * c + logits.argmax(dim=1), ones[:used])
                done = [s for s, slot in active.items() if slot.undrawn == 0 and slot.chunk_left == 0]
                if done:
                    host = counts.view(k, c)[done].cpu().numpy()  # the one host sync of this pass
                    counts.view(k, c)[done] = 0
                    for slot_id, votes in zip(done, host):
                        slot = active[slot_id]
                        self._advance(slot, votes, outcomes, rows, self.max_request)
                        if slot.undrawn == 0:
                            del active[slot_id]
                            free.append(slot_id)
                            if on_done is not None:
                                on_done()
        return outcomes, rows, time.perf_counter() - start

    @staticmethod
    def _advance(slot: _Slot, votes: np.ndarray | None, outcomes: list[Any], rows: list[int], most: int | None) -> None:
        """Send a finished request's counts to the procedure; take its next request or its outcome."""
        try:
            request = next(slot.procedure) if votes is None else slot.procedure.send(votes)
        except StopIteration as finished:
            outcomes[slot.job], rows[slot.job] = finished.value, slot.rows
            slot.undrawn = 0
            return
        if not isinstance(request, int) or request < 1:
            raise TbnError(f"a certification procedure asked for {request!r} draws; it must ask for >= 1")
        if most is not None and request > most:
            raise TbnError(
                f"a certification procedure asked for {request} draws at once, above the {most} it was sized for"
            )
        slot.undrawn = request

    def _fill(self, active: dict[int, _Slot], noise: Tensor, batch: Tensor, owner: Tensor, b: int) -> int:
        """Fill one forward batch of at most ``b`` rows from the pending requests; returns the rows used."""
        used = 0
        for slot_id, slot in active.items():
            while used < b and (slot.chunk_left or slot.undrawn):
                if slot.chunk_left == 0:  # the image's next chunk, from its own generator
                    size = min(slot.undrawn, self.batch_size)
                    torch.randn((size, *noise.shape[2:]), generator=slot.generator, out=noise[slot_id, :size])
                    slot.undrawn -= size
                    slot.chunk_left, slot.chunk_at = size, 0
                take = min(b - used, slot.chunk_left)
                torch.add(
                    slot.x,
                    noise[slot_id, slot.chunk_at : slot.chunk_at + take],
                    alpha=self.sigma,
                    out=batch[used : used + take],
                )
                owner[used : used + take] = slot_id
                slot.chunk_at += take
                slot.chunk_left -= take
                slot.rows += take
                used += take
            if used == b:
                break
        return used
