"""SIGTERM (``kill``, a batch scheduler, a container stop) as a clean stop of the command line.

Python's default ends the process at once; once Ray is connected, Ray's native failure
handler catches SIGTERM instead, prints a stack dump and aborts (exit status 134). Here the
signal raises ``Terminated`` in the main thread, so every ``finally`` runs (actors killed,
Ray disconnected, a half-written object discarded) and the CLI exits with status 143 and one
line. Work already written (whole shards, whole evaluation items) is kept, and the same
command resumes from it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

#: What a shell reports for a process ended by SIGTERM (128 + 15).
EXIT_STATUS = 128 + int(signal.SIGTERM)

_wanted = False
_received = False


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so no ``except Exception`` stops it."""


def _raise(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True
    raise Terminated


def received() -> bool:
    """Whether SIGTERM arrived: what ended the process may be ``Terminated`` or what compiled code
    made of it (raised inside Ray's ``wait``, it comes out as a ``SystemError``)."""
    return _received


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises ``Terminated`` in the main thread (what the CLI wants)."""
    global _wanted
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)
        _wanted = True


def reclaim_sigterm() -> None:
    """Take SIGTERM back after ``ray.init``, whose native handler replaces ours; a no-op unless
    ``stop_on_sigterm`` was called (Python API users keep whatever handling they had)."""
    if _wanted:
        stop_on_sigterm()
