"""The reproduction's verdicts (docs/method.md section 7) on results whose answer is known: each
claim holds just inside its margin, fails just outside it, and is "not measured" when the config
gave it nothing to compare. The data has the shape ``reports.reproduce.collect`` reads from storage."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tbn_ray.reports.claims import FAILS, HOLDS, NOT_MEASURED, REPORTED, judge


def _summary(acc: dict[str, float]) -> dict[str, Any]:
    radii = ("0.0", "0.25", "0.5", "0.75", "1.0", "1.25")
    return {
        "certified_accuracy": {r: acc.get(r, 0.0) for r in radii},
        "acr": 0.3,
        "images": 500,
        "params": {"n": 5000, "n0": 100, "alpha": 0.001, "skip": 20},
    }


def _training(objective: str, norm: str | None, sigma: float = 0.25) -> dict[str, Any]:
    return {"objective": objective, "noise_trained": objective != "adversarial", "norm": norm, "noise_sigma": sigma}


def _corruptions(clean: float, batch: float) -> dict[str, Any]:
    def mode(spec: str, acc: float) -> dict[str, Any]:
        return {
            "spec": spec,
            "corruption_mean": {"gaussian_noise": acc, "shot_noise": acc, "impulse_noise": acc, "contrast": 0.9},
            "mean": acc,
        }

    return {"modes": {"clean": mode("clean", clean), "test-batch-b250": mode("test-batch", batch)}}


def _data() -> dict[str, Any]:
    """l2 AT 2 points below the Gaussian baseline, l-inf 9 points below l2, TBN +30 points under
    noise, test-batch +15 points on the noise corruptions: every claim holds."""
    at = {"0.25": 0.60, "0.5": 0.40, "1.0": 0.20}
    base = {"0.25": 0.62, "0.5": 0.42, "1.0": 0.22}
    linf = {"0.25": 0.51, "0.5": 0.31}
    noise = {
        "rows": [
            {"sigma": 0.25, "accuracy_clean_bn": 0.3, "accuracy_tbn": 0.6},
            {"sigma": 0.5, "accuracy_clean_bn": 0.1, "accuracy_tbn": 0.4},
        ]
    }
    attack = {
        "attack": {"attacks": ["pgd"], "norm": "l2", "eps": 1.0},
        "test_images": 500,
        "modes": {"clean": {"variants": {"standard": {"pgd": 0.4, "clean_accuracy": 0.7}}}},
    }
    return {
        "models": {
            "l2": {
                "training": _training("adversarial", "l2"),
                "noise": noise,
                "corruptions": _corruptions(0.3, 0.45),
                "attack": attack,
                "certify": {"tbn": {"0.25": _summary(at), "0.5": _summary(at)}, "clean": {"0.25": _summary({})}},
            },
            "g25": {
                "training": _training("gaussian", None, 0.25),
                "noise": noise,
                "corruptions": _corruptions(0.5, 0.5),
                "certify": {"clean": {"0.25": _summary(base)}},
            },
            "g50": {
                "training": _training("gaussian", None, 0.5),
                "noise": noise,
                "corruptions": _corruptions(0.5, 0.5),
                "certify": {"clean": {"0.5": _summary(base)}},
            },
            "linf": {
                "training": _training("adversarial", "linf"),
                "noise": noise,
                "corruptions": _corruptions(0.3, 0.45),
                "certify": {"tbn": {"0.25": _summary(linf), "0.5": _summary(linf)}},
            },
        }
    }


def _verdicts(data: dict[str, Any]) -> dict[str, str]:
    return {c.key: c.verdict for c in judge(data)}


def test_every_claim_holds_inside_its_margin() -> None:
    claims = {c.key: c for c in judge(_data())}
    assert {k: c.verdict for k, c in claims.items()} == {"a": HOLDS, "b": HOLDS, "c": HOLDS, "d": HOLDS, "e": REPORTED}
    assert len(claims["a"].checks) == 4  # two AT models x two sigmas; the baselines are not judged
    # (b): l2 at each sigma against the baseline trained there, at r = sigma and 2 sigma
    assert [k.what.split(":")[0] for k in claims["b"].checks] == [
        "l2 + TBN vs g25, sigma 0.25, r = 0.25",
        "l2 + TBN vs g25, sigma 0.25, r = 0.5",
        "l2 + TBN vs g50, sigma 0.5, r = 0.5",
        "l2 + TBN vs g50, sigma 0.5, r = 1",
    ]
    assert claims["b"].checks[0].measured == pytest.approx(-0.02)
    assert len(claims["c"].checks) == 4 and len(claims["d"].checks) == 2
    assert claims["e"].checks[0].measured == 0.4 and claims["e"].checks[0].holds is None


@pytest.mark.parametrize(
    ("claim", "change"),
    [
        (
            "a",
            lambda d: d["models"]["linf"]["noise"].update(
                rows=[{"sigma": 0.25, "accuracy_clean_bn": 0.3, "accuracy_tbn": 0.49}]
            ),
        ),
        ("b", lambda d: d["models"]["g50"]["certify"]["clean"]["0.5"]["certified_accuracy"].update({"1.0": 0.24})),
        ("c", lambda d: d["models"]["linf"]["certify"]["tbn"]["0.5"]["certified_accuracy"].update({"0.5": 0.29})),
        ("d", lambda d: d["models"]["linf"].update(corruptions=_corruptions(0.3, 0.39))),
    ],
)
def test_one_comparison_outside_its_margin_fails_the_claim(claim: str, change: Any) -> None:
    data = copy.deepcopy(_data())
    change(data)
    verdicts = _verdicts(data)
    assert verdicts[claim] == FAILS
    assert all(v in (HOLDS, REPORTED) for k, v in verdicts.items() if k != claim)


def test_a_claim_without_its_models_is_not_measured() -> None:
    data = _data()
    del data["models"]["g25"], data["models"]["g50"], data["models"]["linf"]
    verdicts = _verdicts(data)
    assert verdicts["b"] == NOT_MEASURED and verdicts["c"] == NOT_MEASURED
    assert verdicts["a"] == HOLDS
