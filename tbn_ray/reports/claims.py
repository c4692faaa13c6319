"""The verdicts of the reproduction: each claim of Nandy et al. as comparisons of stored numbers
against a target fixed in advance (docs/method.md section 7).

Reads only the dictionary ``reports.reproduce.collect`` builds from the stored results; computes
no metric of its own. A claim holds when every one of its comparisons does, does not hold when
one fails, and is "not measured" when the config gave it nothing to compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: CIFAR-10-C corruptions that make up the noise family of claim (d).
NOISE_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise")
#: The batch-statistics BN mode claim (d) is judged on.
CORRUPTION_TBN = "test-batch"

HOLDS, FAILS, NOT_MEASURED, REPORTED = "holds", "does not hold", "not measured", "reported (context, no target)"


@dataclass(frozen=True)
class Check:
    """One comparison: what was compared, the measured difference (or value), and whether it meets the target."""

    what: str
    measured: float | None
    holds: bool | None


@dataclass
class Claim:
    key: str
    title: str
    target: str
    checks: list[Check] = field(default_factory=list)
    context: bool = False

    @property
    def verdict(self) -> str:
        if self.context:
            return REPORTED
        judged = [c.holds for c in self.checks if c.holds is not None]
        if not judged:
            return NOT_MEASURED
        return HOLDS if all(judged) else FAILS


def _acc(summary: dict[str, Any] | None, radius: float) -> float | None:
    if summary is None:
        return None
    return summary["certified_accuracy"].get(str(float(radius)))


def _at_models(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: m for k, m in data["models"].items() if not m["training"]["noise_trained"]}


def baseline(data: dict[str, Any], sigma: str) -> tuple[str, dict[str, Any]] | None:
    """The ``gaussian`` model trained at ``sigma`` and certified there with its own statistics."""
    for name, m in data["models"].items():
        t = m["training"]
        if t["objective"] == "gaussian" and f"{t['noise_sigma']:g}" == sigma and sigma in m["certify"].get("clean", {}):
            return name, m["certify"]["clean"][sigma]
    return None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def claim_a(data: dict[str, Any]) -> Claim:
    c = Claim(
        "a",
        "TBN makes an adversarially trained model accurate under noise",
        "TBN noise accuracy >= clean-BN noise accuracy + 20 points",
    )
    for name, m in _at_models(data).items():
        for row in m["noise"]["rows"]:
            gain = _diff(row.get("accuracy_tbn"), row.get("accuracy_clean_bn"))
            c.checks.append(
                Check(
                    f"{name}, sigma {row['sigma']:g}: TBN {_pct(row.get('accuracy_tbn'))} vs clean BN {_pct(row.get('accuracy_clean_bn'))}",
                    gain,
                    None if gain is None else gain >= 0.20,
                )
            )
    return c


def claim_b(data: dict[str, Any]) -> Claim:
    c = Claim(
        "b",
        "l2 adversarial training + TBN certifies like Gaussian augmentation",
        "certified accuracy >= the gaussian model's - 3 points at r = sigma and 2 sigma",
    )
    for name, m in _at_models(data).items():
        if m["training"]["norm"] != "l2":
            continue
        for sigma, summary in m["certify"].get("tbn", {}).items():
            base = baseline(data, sigma)
            if base is None:
                continue
            for r in (float(sigma), 2 * float(sigma)):
                ours, theirs = _acc(summary, r), _acc(base[1], r)
                d = _diff(ours, theirs)
                c.checks.append(
                    Check(
                        f"{name} + TBN vs {base[0]}, sigma {sigma}, r = {r:g}: {_pct(ours)} vs {_pct(theirs)}",
                        d,
                        None if d is None else d >= -0.03,
                    )
                )
    return c


def claim_c(data: dict[str, Any]) -> Claim:
    c = Claim(
        "c",
        "l-inf adversarial training + TBN certifies l2 radii",
        "certified accuracy >= the l2 model's - 10 points at r = 0.25 and 0.5",
    )
    at = _at_models(data)
    l2 = next((k for k, m in at.items() if m["training"]["norm"] == "l2"), None)
    if l2 is None:
        return c
    for name, m in at.items():
        if m["training"]["norm"] != "linf":
            continue
        for sigma, summary in m["certify"].get("tbn", {}).items():
            other = at[l2]["certify"].get("tbn", {}).get(sigma)
            for r in (0.25, 0.5):
                ours, theirs = _acc(summary, r), _acc(other, r)
                d = _diff(ours, theirs)
                c.checks.append(
                    Check(
                        f"{name} + TBN vs {l2} + TBN, sigma {sigma}, r = {r:g}: {_pct(ours)} vs {_pct(theirs)}",
                        d,
                        None if d is None else d >= -0.10,
                    )
                )
    return c


def noise_corruption_mean(mode: dict[str, Any]) -> float | None:
    """Mean accuracy over the noise corruptions a corruption result holds for one BN mode."""
    values = [mode["corruption_mean"][k] for k in NOISE_CORRUPTIONS if k in mode["corruption_mean"]]
    return sum(values) / len(values) if values else None


def claim_d(data: dict[str, Any]) -> Claim:
    c = Claim(
        "d",
        "test-time BN helps on the noise corruptions of CIFAR-10-C",
        f"{CORRUPTION_TBN} BN mean accuracy on the noise corruptions >= clean BN's + 10 points",
    )
    for name, m in _at_models(data).items():
        modes = m["corruptions"]["modes"]
        clean = modes.get("clean")
        adapted = next((v for k, v in modes.items() if v.get("spec") == CORRUPTION_TBN), None)
        if clean is None or adapted is None:
            continue
        a, b = noise_corruption_mean(adapted), noise_corruption_mean(clean)
        d = _diff(a, b)
        c.checks.append(
            Check(f"{name}: {CORRUPTION_TBN} {_pct(a)} vs clean {_pct(b)}", d, None if d is None else d >= 0.10)
        )
    return c


def claim_e(data: dict[str, Any]) -> Claim:
    c = Claim(
        "e",
        "empirical robustness with the clean statistics",
        "none: context beside published adversarial training",
        context=True,
    )
    for name, m in _at_models(data).items():
        for key in ("attack", "autoattack"):
            result = m.get(key)
            if result is None:
                continue
            row = result["modes"]["clean"]["variants"]["standard"]
            for attack in result["attack"].get("attacks", []):
                c.checks.append(
                    Check(
                        f"{name}: {attack} ({result['attack']['norm']} eps {result['attack']['eps']:g}, {result['test_images']} images)",
                        row.get(attack),
                        None,
                    )
                )
    return c


def judge(data: dict[str, Any]) -> list[Claim]:
    """Claims (a)-(e), in order."""
    return [claim_a(data), claim_b(data), claim_c(data), claim_d(data), claim_e(data)]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def claims_markdown(claims: list[Claim]) -> list[str]:
    """The verdict table, then each claim's comparisons."""
    lines = [
        "## Verdicts",
        "",
        "Targets fixed before the run (docs/method.md section 7); a claim holds when every comparison does.",
        "",
        "| claim | target | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| ({c.key}) {c.title} | {c.target} | **{c.verdict}** |" for c in claims]
    lines.append("")
    for c in claims:
        if not c.checks:
            continue
        head = "value" if c.context else "difference (points)"
        lines += [
            f"### ({c.key}) {c.title}: {c.verdict}",
            "",
            f"| comparison | {head} | meets target |",
            "|---|---|---|",
        ]
        for k in c.checks:
            value = (
                "-" if k.measured is None else (f"{100 * k.measured:.1f}" if c.context else f"{100 * k.measured:+.1f}")
            )
            met = "-" if k.holds is None else ("yes" if k.holds else "**no**")
            lines.append(f"| {k.what} | {value} | {met} |")
        lines.append("")
    return lines


def claims_json(claims: list[Claim]) -> list[dict[str, Any]]:
    return [
        {
            "claim": c.key,
            "title": c.title,
            "target": c.target,
            "verdict": c.verdict,
            "checks": [{"what": k.what, "measured": k.measured, "holds": k.holds} for k in c.checks],
        }
        for c in claims
    ]
