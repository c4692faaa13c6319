"""The evaluation report: markdown, a corruption plot and every number in one JSON.

Reads nothing but the stored ``result.json`` files under ``<run>/evaluate/`` (written by the
evaluation jobs), so it can be rebuilt at any time, and the certification report can show the
same section next to the certificates.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from tbn_ray.science.corruptions import CORRUPTIONS
from tbn_ray.science.robustness import ATTACK_VARIANTS
from tbn_ray.science.tbn import CLEAN
from tbn_ray.store.storage import Storage

RESULT_FORMAT = "tbn-ray/evaluate-result-v1"
EVALUATE_DIR = "evaluate"


def load_results(run_storage: Storage) -> list[dict[str, Any]]:
    """Every result.json under ``<run>/evaluate/``, corruption results first, oldest layout order."""
    keys = [k for k in run_storage.list(f"{EVALUATE_DIR}/") if k.endswith("/result.json")]
    results = [run_storage.read_json(k) for k in keys]
    results = [r for r in results if isinstance(r, dict) and r.get("format") == RESULT_FORMAT]
    return sorted(results, key=lambda r: (r["kind"] != "corruptions", r["eval_id"]))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _corruption_markdown(r: dict[str, Any]) -> list[str]:
    modes = list(r["modes"].values())
    sev = sorted({s for m in modes for s in m["severity_mean"]}, key=int)
    lines = [
        f"### Corruption robustness: {r['source']}",
        "",
        f"Run {r['run']} (epoch {r['epoch']}, {r['model']}), {r['test_images']} test images ({r['test_indices']}); eval id `{r['eval_id']}`.",
        "",
        "| BN mode | batch size | clean | mean | grid | " + " | ".join(f"severity {s}" for s in sev) + " |",
        "|" + "---|" * (5 + len(sev)),
    ]
    for m in modes:
        cells = [_pct(m["severity_mean"].get(s)) for s in sev]
        lines.append(
            f"| {m['spec']} | {m['batch_size'] or '-'} | {_pct(m['clean_accuracy'])} | **{_pct(m['mean'])}** | {m['grid']} | "
            + " | ".join(cells)
            + " |"
        )
    corr = [c for c in CORRUPTIONS if any(c in m["corruption_mean"] for m in modes)]
    lines += [
        "",
        "Accuracy (%) per corruption, mean over the severities:",
        "",
        "| corruption | " + " | ".join(m["spec"] for m in modes) + " |",
        "|" + "---|" * (1 + len(modes)),
    ]
    lines += [f"| {c} | " + " | ".join(_pct(m["corruption_mean"].get(c)) for m in modes) + " |" for c in corr]
    lines += ["", *(f"- {m['definition']}" for m in modes), ""]
    return lines


def _attack_settings(a: dict[str, Any]) -> str:
    """The settings of the attacks that ran, and only those: AutoAttack's standard version sets its own."""
    iterative = [x for x in a["attacks"] if x != "autoattack"]
    parts = []
    if iterative:
        pgd = f", PGD step {a['pgd_step_size']:g}" if "pgd" in iterative else ""
        which = f" ({', '.join(iterative)})" if len(iterative) < len(a["attacks"]) else ""
        parts.append(f"{a['steps']} steps, {a['restarts']} restart(s){pgd}{which}")
    if "autoattack" in a["attacks"]:
        parts.append("AutoAttack's standard version with its own iterations and restarts")
    return ", ".join(parts)


def _attack_markdown(r: dict[str, Any]) -> list[str]:
    a = r["attack"]
    attacks = a["attacks"]
    lines = [
        f"### Adversarial robustness: {a['norm']}, eps={a['eps']:g}"
        + (f" ({255 * a['eps']:.3g}/255)" if a["norm"] == "linf" else "")
        + f" ({r['source']})",
        "",
        f"Run {r['run']} (epoch {r['epoch']}, {r['model']}), {r['test_images']} test images ({r['test_indices']}), "
        f"{_attack_settings(a)}, seed {a['seed']}, batch size {r['batch_size']}; eval id `{r['eval_id']}`.",
        "",
        "| BN mode | variant | clean | " + " | ".join(attacks) + (" | worst case |" if len(attacks) > 1 else " |"),
        "|" + "---|" * (3 + len(attacks) + (len(attacks) > 1)),
    ]
    used = set()
    for m in r["modes"].values():
        for variant, row in m["variants"].items():
            used.add(variant)
            cells = [_pct(row.get(x)) for x in attacks] + ([_pct(row.get("worst_case"))] if len(attacks) > 1 else [])
            label = m["spec"] + (" (reference)" if m["spec"] == CLEAN else "")
            lines.append(f"| {label} | {variant} | {_pct(row['clean_accuracy'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy (%) on the perturbed images. The clean-statistics row is the reference the paper says TBN "
        "maintains. Worst case: per image the strongest of the attacks (per batch for adaptive / non-adaptive, "
        "whose batches cannot be spliced).",
        "",
        *(f"- {m['definition']}" for m in r["modes"].values()),
        *(f"- variant {v}: {ATTACK_VARIANTS[v]}" for v in ATTACK_VARIANTS if v in used),
        "",
    ]
    return lines


def evaluation_section(storage: Storage, *, image: str | None = "evaluate/corruption_accuracy.png") -> str | None:
    """Markdown of every evaluation of a run (``storage``: the run's location), for ``tbn-ray
    report`` next to the certification results; None when the run has no evaluation.

    ``image``: the link to the corruption plot as seen from where the markdown is written
    (default: from the run directory), or None for no link."""
    results = load_results(storage)
    if not results:
        return None
    lines = ["## Corruption and adversarial robustness (tbn-ray evaluate)", ""]
    for r in results:
        lines += _corruption_markdown(r) if r["kind"] == "corruptions" else _attack_markdown(r)
    if image and any(r["kind"] == "corruptions" for r in results):
        lines += [f"![corruption accuracy per BN mode]({image})", ""]
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    rs = [r for r in results if r["kind"] == "corruptions"]
    fig = Figure(figsize=(11, 3.8 * len(rs)), dpi=110)
    for row, r in enumerate(rs):
        modes = list(r["modes"].values())
        ax_bar, ax_sev = fig.add_subplot(len(rs), 2, 2 * row + 1), fig.add_subplot(len(rs), 2, 2 * row + 2)
        means = [100 * (m["mean"] or 0) for m in modes]
        bars = ax_bar.bar(range(len(modes)), means, color=[f"C{i}" for i in range(len(modes))])
        ax_bar.bar_label(bars, fmt="%.1f", fontsize=7)
        ax_bar.set_xticks(range(len(modes)), [m["spec"] for m in modes], fontsize=7, rotation=15)
        ax_bar.set(
            ylabel=f"mean accuracy (%) over {modes[0]['grid']}",
            ylim=(0, 100),
            title="\n".join(textwrap.wrap(r["source"], 70)),
        )
        ax_bar.title.set_fontsize(7)
        for i, m in enumerate(modes):
            sev = sorted(m["severity_mean"], key=int)
            xs = [0, *map(int, sev)]
            ys = [100 * (m["clean_accuracy"] or 0), *(100 * m["severity_mean"][s] for s in sev)]
            ax_sev.plot(
                xs,
                ys,
                marker="o",
                color=f"C{i}",
                label=m["spec"] + (f" (batch {m['batch_size']})" if m["batch_size"] else ""),
            )
        ax_sev.set(
            xlabel="severity (0: clean test images)",
            ylabel="accuracy (%)",
            ylim=(0, 100),
            title=f"{r['test_images']} test images, {r['model']}",
        )
        ax_sev.title.set_fontsize(7)
        ax_sev.grid(alpha=0.3)
        ax_sev.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_evaluation_report(run_storage: Storage) -> dict[str, str]:
    """``<run>/evaluate/report.md``, ``corruption_accuracy.png`` and ``evaluation.json`` (every number,
    the data sources, BN mode and variant definitions, attack parameters), from the result.json files."""
    results = load_results(run_storage)
    out = run_storage.child(EVALUATE_DIR)
    section = evaluation_section(run_storage, image="corruption_accuracy.png") or ""
    files = {}
    if any(r["kind"] == "corruptions" for r in results):
        with out.writer("corruption_accuracy.png") as f:
            _plot(results).savefig(f, format="png")
        files["corruption_accuracy.png"] = out.object_uri("corruption_accuracy.png")
    files["report.md"] = out.write_text("report.md", section + "\n")
    files["evaluation.json"] = out.write_text(
        "evaluation.json",
        json.dumps({"run": run_storage.uri, "variants": ATTACK_VARIANTS, "results": results}, indent=2, sort_keys=True)
        + "\n",
    )
    return files
