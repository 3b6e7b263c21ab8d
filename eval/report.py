"""The comparison report: report.json (schema below), report.md (tables), report.png (plot).

report.json:
    {"schema": "wq.eval/1", "settings": {...}, "versions": {...}, "models": ["baseline", name, ...],
     "baseline": {"model", "bits_per_weight", "ppl": {dataset: {"ppl", "nll_sum", "tokens", "seqlen", ...}},
                  "tasks": {task: {"acc", "acc_stderr", "acc_norm", ..., "n"}}},
     <name>: {same as baseline},
     "deltas": {<name>: {"ppl": {dataset: CMP}, "tasks": {task: {metric: CMP}}, "avg_acc": CMP}}}
    CMP = {"baseline", "quant", "delta" (quant - baseline), "relative" (delta / baseline),
           "recovery" (quant/baseline when higher is better, baseline/quant when lower; 1.0 = nothing lost),
           "z", "significant" (|z| > 1.96)}
Perplexity significance is a paired test over the windows (same text for both models: the z of the mean
per-token NLL difference per window); task metrics use lm-eval's stderr of each side, taken as independent.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

SCHEMA = "wq.eval/1"
Z_95 = 1.96
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "ppl")


def _compare(b: float, q: float, *, lower_is_better: bool, z: float | None) -> dict:
    delta = q - b
    rel = delta / b if b else None
    if lower_is_better:
        recovery = b / q if q else None
    else:
        recovery = q / b if b else None
    return {"baseline": b, "quant": q, "delta": delta, "relative": rel, "recovery": recovery,
            "z": z, "significant": None if z is None else bool(abs(z) > Z_95)}


def compare_ppl(base: dict, quant: dict) -> dict:
    """Baseline vs quant perplexity of one dataset, with a paired per-window z."""
    z = None
    wb, wq = base.get("window_nll"), quant.get("window_nll")
    if wb and wq and len(wb) == len(wq) >= 2 and base["seqlen"] == quant["seqlen"]:
        per_tok = base["seqlen"] - 1
        diffs = [(q - b) / per_tok for b, q in zip(wb, wq)]
        sd = statistics.stdev(diffs)
        mean = statistics.fmean(diffs)
        z = mean / (sd / math.sqrt(len(diffs))) if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return _compare(base["ppl"], quant["ppl"], lower_is_better=True, z=z)


def compare_task(base: dict, quant: dict) -> dict:
    out = {}
    for metric, b in base.items():
        if metric.endswith("_stderr") or metric == "n" or b is None or quant.get(metric) is None:
            continue
        q = quant[metric]
        sb, sq = base.get(f"{metric}_stderr"), quant.get(f"{metric}_stderr")
        z = None
        if sb is not None and sq is not None:
            se = math.sqrt(sb**2 + sq**2)
            z = (q - b) / se if se > 0 else None
        out[metric] = _compare(b, q, lower_is_better=metric in LOWER_IS_BETTER, z=z)
    return out


def avg_acc(tasks: dict) -> float | None:
    """Mean "acc" over the tasks that report one (the leaderboard convention)."""
    accs = [t["acc"] for t in tasks.values() if t.get("acc") is not None]
    return statistics.fmean(accs) if accs else None


def build_report(baseline: dict, quants: dict[str, dict], settings: dict, versions: dict) -> dict:
    """baseline/quants: {"model", "bits_per_weight", "ppl": {...}, "tasks": {...}} per model."""
    report = {"schema": SCHEMA, "settings": settings, "versions": versions,
              "models": ["baseline", *quants], "baseline": baseline}
    deltas = {}
    for name, q in quants.items():
        if name in ("schema", "settings", "versions", "models", "baseline", "deltas"):
            raise ValueError(f"a quantized model cannot be named {name!r}; rename its directory")
        report[name] = q
        d = {"ppl": {}, "tasks": {}}
        for ds, b in baseline.get("ppl", {}).items():
            if ds in q.get("ppl", {}):
                d["ppl"][ds] = compare_ppl(b, q["ppl"][ds])
        for task, b in baseline.get("tasks", {}).items():
            if task in q.get("tasks", {}):
                d["tasks"][task] = compare_task(b, q["tasks"][task])
        ab, aq = avg_acc(baseline.get("tasks", {})), avg_acc(q.get("tasks", {}))
        if ab is not None and aq is not None:
            d["avg_acc"] = _compare(ab, aq, lower_is_better=False, z=None)
        deltas[name] = d
    report["deltas"] = deltas
    return report


# ------------------------------------------------------------------------------------ writing


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def _fmt_ppl(x):
    return _fmt(x, ".4g" if x is not None and x >= 1e4 else ".3f")


def _fmt_rel(c):
    """+53.1%, or x17264 once the change passes +1000%."""
    if c["relative"] is None:
        return "—"
    if c["relative"] > 10:
        return f"x{c['quant'] / c['baseline']:.4g}"
    return f"{c['relative']:+.1%}"


def to_markdown(report: dict) -> str:
    s = report["settings"]
    names = report["models"]
    datasets = list(report["baseline"].get("ppl", {}))
    tasks = list(report["baseline"].get("tasks", {}))
    lines = ["# Evaluation vs the baseline", ""]
    lines.append(f"- baseline: `{report['baseline'].get('model')}`")
    for name in names[1:]:
        lines.append(f"- {name}: `{report[name].get('model')}`")
    lines.append(f"- dtype {s.get('dtype')}, device {s.get('device')}, processes {s.get('world_size')}, "
                 f"seqlen {s.get('seqlen')}, windows {s.get('windows') or 'all'}")
    for ds, proto in s.get("ppl_protocols", {}).items():
        lines.append(f"- ppl `{ds}`: {proto}")
    ts = s.get("tasks") or {}
    if tasks:
        docs = f"first {ts['limit']} docs" if ts.get("limit") else "all docs"
        if ts.get("local_docs"):
            docs += f" (local tasks: {ts['local_docs']} generated)"
        lines.append(f"- tasks: {docs} per task, batch {ts.get('batch_size')}, BOS {ts.get('add_bos')}, "
                     f"fewshot {ts.get('num_fewshot') or 0}")
    lines.append("")
    head = ["model", "algorithm", "scheme", "bits/weight"] + [f"ppl {d}" for d in datasets] + [f"{t} acc" for t in tasks]
    if tasks:
        head.append("avg acc")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        m = report[name]
        dl = report["deltas"].get(name, {})
        algo, scheme = (("—", "—") if name == "baseline" else (m.get("algo") or "—", m.get("scheme") or "—"))
        row = [name, algo, scheme, _fmt(m.get("bits_per_weight"), ".2f")]
        for ds in datasets:
            cell = _fmt_ppl(m["ppl"].get(ds, {}).get("ppl"))
            c = dl.get("ppl", {}).get(ds)
            if c:
                cell += f" ({_fmt_rel(c)}{'*' if c['significant'] else ''})"
            row.append(cell)
        for t in tasks:
            r = m.get("tasks", {}).get(t, {})
            cell = _fmt(r.get("acc"), ".4f")
            if r.get("acc_stderr") is not None:
                cell += f" ± {r['acc_stderr']:.4f}"
            c = dl.get("tasks", {}).get(t, {}).get("acc")
            if c and c["significant"]:
                cell += "*"
            row.append(cell)
        if tasks:
            row.append(_fmt(avg_acc(m.get("tasks", {})), ".4f"))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Relative change vs the baseline in brackets; `*` = significant at 95% "
              "(perplexity: paired over windows; accuracy: both stderrs)."]
    for t in tasks:
        extra = [k for k in report["baseline"]["tasks"][t] if k not in ("acc", "n") and not k.endswith("_stderr")]
        for metric in extra:
            fmt = _fmt_ppl if "perplexity" in metric else (lambda x: _fmt(x, ".4f"))
            vals = ", ".join(f"{n} {fmt(report[n]['tasks'].get(t, {}).get(metric))}" for n in names)
            lines.append(f"- {t} {metric}: {vals}")
    return "\n".join(lines) + "\n"


def _points(report: dict, panel: str, dataset: str | None) -> list[tuple[float, float, str, str]]:
    """(bits per weight, value, name, algorithm) of every quantized model that has the panel's value."""
    pts = []
    for n in report["models"][1:]:
        m = report[n]
        y = m["ppl"].get(dataset, {}).get("ppl") if panel == "ppl" else avg_acc(m.get("tasks", {}))
        if y is not None and m.get("bits_per_weight") is not None:
            pts.append((m["bits_per_weight"], y, n, m.get("algo") or "?"))
    return pts


def axis_scale(values: list[float], span: float = 20.0) -> str:
    """"log" when the values span more than `span`x (a 2-bit model at 10^4 next to BF16 at 20), else "linear"."""
    return "log" if min(values) > 0 and max(values) / min(values) > span else "linear"


def plot(report: dict, path: str | Path) -> None:
    """Perplexity (first dataset) and average accuracy against bits per weight, BF16 as a dashed line.

    Each model is its own marker in the legend (no text on the plot, so labels of close or equal points cannot
    overprint); points are joined only within one algorithm (a series over bit widths), never across
    unrelated models. The perplexity axis is linear unless the values span more than 20x; a log axis is
    labelled with plain numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    base = report["baseline"]
    datasets = list(base.get("ppl", {}))
    has_acc = avg_acc(base.get("tasks", {})) is not None
    panels = (["ppl"] if datasets else []) + (["acc"] if has_acc else [])
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.2), squeeze=False)
    markers = "osD^vP*Xh<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        dataset = datasets[0] if datasets else None
        pts = _points(report, panel, dataset)
        for k, (x, y, n, _) in enumerate(pts):
            ax.plot([x], [y], markers[k % len(markers)], color=colors[k % len(colors)], ms=8, alpha=0.85,
                    label=n, zorder=3)
        for algo in sorted({a for *_, a in pts}):
            series = sorted((x, y) for x, y, _, a in pts if a == algo)
            if len(series) > 1 and len({x for x, _ in series}) == len(series):  # one point per bit width
                ax.plot([x for x, _ in series], [y for _, y in series], "-", color="gray", lw=1, alpha=0.6, zorder=2)
        ref = base["ppl"][dataset]["ppl"] if panel == "ppl" else avg_acc(base["tasks"])
        ax.axhline(ref, ls="--", color="black", lw=1, label="baseline (BF16)")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(f"perplexity ({dataset}, lower is better)" if panel == "ppl" else "average accuracy")
        if panel == "ppl" and axis_scale([y for _, y, _, _ in pts] + [ref]) == "log":
            ax.set_yscale("log")
            plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(to_markdown(report), encoding="utf-8")
    plot(report, out / "report.png")
    return out
