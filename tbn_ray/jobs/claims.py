"""Claims: how two runs of the same job share its units instead of each computing all of them.

A run claims each unit before computing it, as a marker object under ``<out>/.claims/``
written create-if-absent, refreshes the claims it holds, and releases them when done. A claim
not refreshed for ``CLAIM_TTL_S``, or whose run has ended, is taken over. Claims only save work:
what is stored and checked decides every result (``engine``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from tbn_ray.errors import TbnError, log
from tbn_ray.store.storage import Storage, map_concurrently

#: Folder of the claims, under a job's ``out``.
CLAIMS = ".claims"
#: A claim not refreshed for this long is a dead run's: another run takes the unit over.
CLAIM_TTL_S = 120.0
#: How often a run rewrites the claims it holds (a long unit keeps its claim fresh).
CLAIM_REFRESH_S = 20.0
#: Wait between writing claims and reading them back: another run that wrote the same claim in
#: the same moment is seen then (the last write wins, and only its run computes the unit).
CLAIM_SETTLE_S = 0.25
#: How often a run that has nothing left of its own looks again at the units other runs hold.
CLAIM_POLL_S = 2.0


def run_owner() -> str:
    """Who a run is, in its claims: host, process and a random part (two runs in one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


#: Owners of the claims of this process's runs still going (``Claims`` blocks not yet left).
_LIVE_OWNERS: set[str] = set()


def owner_gone(owner: str) -> bool:
    """Whether the run that wrote a claim has certainly ended: a process of this host that no longer
    exists, or an ended run of this process (a re-run after a crash or an error need not wait for
    its claims to go stale). Runs on other hosts are judged by the age of their claims only."""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return owner not in _LIVE_OWNERS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


@dataclass(frozen=True)
class Claim:
    owner: str
    label: str
    time: float  # the owner's clock when it last wrote the claim

    def age(self) -> float:
        return max(0.0, time.time() - self.time)


class Claims:
    """This run's claims on the units of one job, as objects ``<out>/.claims/<digest>.claim``
    (JSON, under a suffix that no listing of results matches).

    A free unit is claimed with ``Storage.create_bytes`` (create-if-absent: a hard link locally,
    ``If-None-Match: *`` on S3), so of two runs claiming it at once exactly one gets it. A claim
    left stale by a run that is gone is overwritten, waited on ``settle_s`` and read back; the last
    write wins. What remains is two runs taking over one stale claim more than ``settle_s`` apart:
    then both compute it (the same objects, written twice; results stay right). Ages are the
    writers' clocks against the reader's: clocks of different machines must agree to well within
    ``ttl_s``."""

    def __init__(
        self,
        out: Storage,
        owner: str | None = None,
        *,
        ttl_s: float = CLAIM_TTL_S,
        refresh_s: float = CLAIM_REFRESH_S,
        settle_s: float = CLAIM_SETTLE_S,
    ) -> None:
        if refresh_s >= ttl_s:
            raise TbnError(f"claims must be refreshed ({refresh_s:g} s) more often than they go stale ({ttl_s:g} s)")
        self.out, self.owner = out, owner or run_owner()
        self.ttl_s, self.refresh_s, self.settle_s = ttl_s, refresh_s, settle_s
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    @staticmethod
    def key(label: str) -> str:
        return f"{CLAIMS}/{hashlib.sha256(label.encode()).hexdigest()[:24]}.claim"  # JSON, but no result's suffix

    def read(self, label: str) -> Claim | None:
        """The claim on ``label``, or None (none, or unreadable: a claim is only a hint)."""
        try:
            raw = self.out.read_json(self.key(label))
            return Claim(str(raw["owner"]), str(raw["label"]), float(raw["time"]))
        except (TbnError, KeyError, TypeError, ValueError):
            return None

    def fresh(self, claim: Claim | None) -> bool:
        """Whether the claim's run may still be computing its unit."""
        return claim is not None and claim.age() < self.ttl_s and not owner_gone(claim.owner)

    def _write(self, label: str) -> None:
        self.out.write_json(self.key(label), {"owner": self.owner, "label": label, "time": time.time()})

    def _create(self, label: str) -> bool:
        body = json.dumps({"owner": self.owner, "label": label, "time": time.time()}).encode()
        return self.out.create_bytes(self.key(label), body)

    def take(self, labels: Sequence[str]) -> dict[str, Claim | None]:
        """Claim every label no other run holds fresh. By label: None when this run holds it now,
        else the other run's claim.

        A unit nobody claimed is claimed by create-if-absent: of runs racing for it, exactly one
        gets it, however slow the machine. Only a claim left stale (its run gone) is overwritten,
        then read back after ``settle_s``: the last write wins."""
        found = dict(zip(labels, map_concurrently(self.read, list(labels))))
        others = {label: c for label, c in found.items() if c is not None and c.owner != self.owner and self.fresh(c)}
        result: dict[str, Claim | None] = dict(others)
        absent = [label for label in labels if label not in others and found[label] is None]
        taken_over = [label for label in labels if label not in others and found[label] is not None]
        created = dict(zip(absent, map_concurrently(self._create, absent)))
        for label in (label for label, ok in created.items() if not ok):  # another run created it first
            result[label] = self.read(label) or Claim("another run", label, time.time())
        after: dict[str, Claim | None] = {}
        if taken_over:
            map_concurrently(self._write, taken_over)
            time.sleep(self.settle_s)
            after = dict(zip(taken_over, map_concurrently(self.read, taken_over)))
        with self._lock:
            for label in (label for label, ok in created.items() if ok):
                self.held.add(label)
                result[label] = None
            for label in taken_over:
                claim = after[label]
                if claim is None or claim.owner == self.owner:  # unreadable now: ours was written, keep it
                    self.held.add(label)
                    result[label] = None
                else:
                    result[label] = claim
        return result

    def release(self, label: str) -> None:
        """Delete this run's claim (after the unit is stored, or when giving it up)."""
        with self._lock:
            self.held.discard(label)
        claim = self.read(label)
        if claim is None or claim.owner == self.owner:
            self.out.delete(self.key(label))

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                labels = sorted(self.held)
            for label in labels:
                with self._lock:  # never rewrite a claim that ``release`` has just deleted
                    if label not in self.held:
                        continue
                    try:
                        self._write(label)
                    except TbnError as e:  # storage down for a moment: the next refresh retries
                        log(f"warning: could not refresh the claim on {label}: {e}")

    def __enter__(self) -> Claims:
        _LIVE_OWNERS.add(self.owner)
        self._refresher = threading.Thread(target=self._refresh, name="tbn-claims", daemon=True)
        self._refresher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _LIVE_OWNERS.discard(self.owner)
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=1.0)  # a write hung on an unreachable store must not hold up the exit
        for label in sorted(self.held):  # units not finished (an error, an interrupt): free them at once
            try:
                self.release(label)
            except TbnError:
                break  # the store is failing: leave the rest, they are this run's (``owner_gone``) or go stale
