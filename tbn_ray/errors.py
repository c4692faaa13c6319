"""What users read: the one exception type, and progress lines.

Anything raised as ``TbnError`` is a problem with the user's input or environment
(a wrong sigma, a missing checkpoint, an unreachable bucket). The CLI prints its
message on one line and exits with status 2; any other exception is a bug and keeps
its traceback.
"""

import warnings


class TbnError(Exception):
    """A user-facing error whose message says what is wrong and what to do."""


class SoundnessError(TbnError):
    """Refused because the result would not be a valid certificate."""


def log(msg: str) -> None:
    """A progress line for the user (stdout, so it interleaves with progress bars)."""
    print(f"[tbn-ray] {msg}", flush=True)


class TbnWarning(UserWarning):
    """A value that is allowed but very likely not what the user meant (the CLI prints it as one line)."""


def warn(msg: str) -> None:
    """Warn once per message: configs are validated more than once per command."""
    warnings.warn(msg, TbnWarning, stacklevel=2)
