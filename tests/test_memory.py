"""No size kills the process: under an address-space limit (``setrlimit`` in a subprocess, never
by exhausting the machine), a huge ``images_per_pass`` on a few images allocates for those images
and certifies, and a batch whose buffers cannot fit is one line naming the setting, exit 2."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .helpers import HANG_S, SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")

ROOT = Path(__file__).resolve().parents[1]
#: Enough address space for torch and a small model; far below what the refused settings need.
LIMIT = 10 * 2**30

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from tbn_ray.config import CertifyConfig
    from tbn_ray.errors import TbnError
    from tbn_ray.science.smoothing import certify_examples
    from tests.helpers import partial_test_images
    from tests.test_smoothing import LinearTwoClass

    torch.set_num_threads(1)
    images, labels = partial_test_images(4)
    w = torch.zeros(3, 32, 32)
    w[0] = 1.0
    model = LinearTwoClass(w, -0.5 * 32 * 32)
    cfg = CertifyConfig.model_validate({SETTINGS})
    try:
        records = certify_examples(model, images, labels % 2, range(4), cfg, sigma=0.25, device="cpu", num_classes=2)
    except TbnError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    print(len(records))
    """
)


def _run(settings: dict) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    return subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("{SETTINGS}", repr(settings))],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        preexec_fn=limit,
        cwd=ROOT,
    )


def test_a_huge_images_per_pass_allocates_for_the_images_there_are() -> None:
    out = _run({"n0": 10, "n": 50, "alpha": 0.01, "batch_size": 100, "images_per_pass": 10**9, "adaptive": True})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "4"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"n0": 10, "n": 10**8, "batch_size": 10**8, "images_per_pass": 4},
            "--images-per-pass 4 with --batch-size 100000000",
        ),
        ({"n0": 10, "n": 10**8, "batch_size": 10**8}, "--batch-size 100000000"),
    ],
    ids=["packed", "alone"],
)
def test_buffers_that_cannot_fit_are_one_line_naming_the_setting(settings: dict, named: str) -> None:
    out = _run(settings)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "GiB" in lines[0] and "Traceback" not in out.stderr
