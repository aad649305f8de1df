"""Figures and a markdown page from stored benchmark runs: ``recbole-mm-report benchmarks/results/<name>``.

``<name>`` is either a benchmark table written by ``recbole-mm-bench`` (``<name>.runs.json`` or the
folder ``<name>_runs/`` of per-run JSON results) or one run's result JSON (``<name>.json``, e.g.
PRIME's, with its stages). The report (PNG files and ``README.md``) goes to
``<dir>/figures/<name>/`` unless ``--out`` says otherwise. Figures, each where the data exist:

- ``metrics.png``: test metrics of each model, mean with error bars (std over seeds), published
  numbers as markers;
- ``curves.png``: validation score per epoch of each model (from the results, or parsed from the
  stored RecBole logs), and per stage for PRIME (retriever epochs, ranker and preference steps);
- ``cost.png``: wall time and peak memory per model, or per PRIME stage;
- ``topk.png``: NDCG@k and Recall@k against the cutoff k (top-k sensitivity);
- ``efficiency.png``: test NDCG@10 against training time per epoch (the efficiency picture).

matplotlib is needed (``pip install "recbole-mm[report]"``); nothing else of recbole-mm is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

_EPOCH_LINE = re.compile(r"epoch (\d+) evaluating \[time: [\d.]+s, valid_score: ([\d.]+)\]")
_TRAIN_LINE = re.compile(r"epoch (\d+) training \[time: ([\d.]+)s")
_METRIC = re.compile(r"^(ndcg|recall|mrr|hit|precision)@(\d+)$")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('recbole-mm-report needs matplotlib: pip install "recbole-mm[report]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_from_log(path: str | os.PathLike) -> list[dict]:
    """Per-epoch ``valid_score`` (1-based epochs) and train seconds parsed from a RecBole log file."""
    curve: dict[int, dict] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for epoch, seconds in _TRAIN_LINE.findall(text):
        curve.setdefault(int(epoch) + 1, {})["train_s"] = float(seconds)
    for epoch, score in _EPOCH_LINE.findall(text):
        curve.setdefault(int(epoch) + 1, {})["valid_score"] = float(score)
    return [{"epoch": e, **v} for e, v in sorted(curve.items())]


def load(prefix: str | os.PathLike) -> dict:
    """``{"name", "dataset", "groups": [(model, [result per seed])], "single": result or None}``."""
    prefix = str(prefix)
    if prefix.endswith(".json") and os.path.isfile(prefix):
        prefix = prefix[:-5]
    name = os.path.basename(prefix.rstrip("/"))
    manifest, run_dir = prefix + ".runs.json", prefix + "_runs"
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            wanted = json.load(f)["runs"]
    elif os.path.isdir(run_dir):
        order = []
        if os.path.isfile(prefix + ".csv"):
            import csv

            with open(prefix + ".csv", encoding="utf-8") as f:
                order = [row["model"] for row in csv.DictReader(f)]
        wanted: dict[str, list[str]] = {}
        for file in sorted(os.listdir(run_dir)):
            if file.endswith(".json"):
                with open(os.path.join(run_dir, file), encoding="utf-8") as f:
                    model = json.load(f).get("model", file[:-5])
                wanted.setdefault(model, []).append(file[:-5])
        wanted = {m: wanted[m] for m in sorted(wanted, key=lambda m: order.index(m) if m in order else len(order))}
    elif os.path.isfile(prefix + ".json"):
        with open(prefix + ".json", encoding="utf-8") as f:
            single = json.load(f)
        groups = [(single.get("model", name), [single])]
        if single.get("retriever_test_result"):  # PRIME: the retriever alone beside the two-stage ranking
            groups.insert(0, ("retriever alone", [{"test_result": single["retriever_test_result"]}]))
        return {"name": name, "dataset": single.get("dataset", ""), "groups": groups, "single": single}
    else:
        raise SystemExit(f"recbole-mm-report: nothing found for {prefix}: expected {manifest}, {run_dir}/ "
                         f"or {prefix}.json (write them with recbole-mm-bench or --result_file)")
    from recbole_mm.bench import stored_groups

    groups = stored_groups(run_dir, wanted, "recbole-mm-report: stored run {path} not found")
    for _, runs in groups:
        for result in runs:
            if not result.get("epoch_log"):
                result["epoch_log"] = curve_from_log(os.path.join(run_dir, f"{result['bench_name']}.log"))
    dataset = groups[0][1][0].get("dataset", "") if groups else ""
    return {"name": name, "dataset": dataset, "groups": groups, "single": None}


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _metric_names(groups) -> list[str]:
    names = set()
    for _, runs in groups:
        for r in runs:
            names |= {m for m in r.get("test_result", {}) if _METRIC.match(m)}
    return sorted(names, key=lambda m: (_METRIC.match(m).group(1), int(_METRIC.match(m).group(2))))


def summary_rows(groups) -> list[dict]:
    """Per model: mean/std of every test metric, seconds per epoch, total time, peak memory."""
    rows = []
    for model, runs in groups:
        row = {"model": model, "seeds": len(runs)}
        for m in _metric_names(groups):
            row[m] = _mean_std([r.get("test_result", {}).get(m) for r in runs])
        row["time_per_epoch_s"] = _mean_std([r.get("time_per_epoch_s") for r in runs])
        row["total_time_s"] = _mean_std([r.get("total_time_s") for r in runs])
        row["peak_rss_mb"] = max((r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb")), default=None)
        rows.append(row)
    return rows


def plot_metrics(plt, groups, path, paper: dict | None = None) -> bool:
    metrics = [m for m in ("ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@10") if m in _metric_names(groups)]
    if not metrics:
        return False
    rows = summary_rows(groups)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(metrics) * max(1, len(rows)) / 2, 3.6))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(metrics))]
        means = [row[m][0] or 0.0 for m in metrics]
        stds = [row[m][1] or 0.0 for m in metrics]
        label = row["model"] + (f" ({row['seeds']} seeds)" if row["seeds"] > 1 else "")
        ax.bar(xs, means, width, yerr=stds if any(stds) else None, capsize=3, label=label)
        published = (paper or {}).get(row["model"], {})
        marks = [(x, published[m]) for x, m in zip(xs, metrics) if m in published]
        if marks:
            ax.scatter([x for x, _ in marks], [y for _, y in marks], marker="_", s=300, color="black", zorder=3,
                       label="published" if i == 0 or not ax.get_legend_handles_labels()[1].count("published") else None)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("test metric (full ranking)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _stage_curves(single: dict) -> dict[str, list[tuple[float, float]]]:
    curves = {}
    stored = single.get("curves") or {}
    retriever = stored.get("retriever") or single.get("stages", {}).get("retriever", {}).get("epoch_log") or []
    if retriever:
        metric = single.get("stages", {}).get("retriever", {}).get("valid_metric") or "NDCG@10"
        curves[f"retriever (valid {metric} per epoch)"] = [(e["epoch"], e["valid_score"]) for e in retriever
                                                         if "valid_score" in e]
    ranker = stored.get("ranker") or single.get("stages", {}).get("ranker", {}).get("history") or []
    if ranker:
        curves["ranker (sampled valid NDCG@10 per step)"] = [(h["step"], h["valid_ndcg@10"]) for h in ranker
                                                            if "valid_ndcg@10" in h]
    pref = stored.get("preference") or single.get("stages", {}).get("preference", {}).get("history") or []
    if pref:
        curves["preference (two-stage valid NDCG@10 per step)"] = [(h["step"], h.get("ndcg@10", h.get("score")))
                                                                  for h in pref if ("ndcg@10" in h or "score" in h)]
    return {k: v for k, v in curves.items() if v}


def plot_curves(plt, data, path) -> bool:
    single = data["single"]
    if single is not None and single.get("model") == "PRIME":
        curves = _stage_curves(single)
        if not curves:
            return False
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
        for ax, (title, points) in zip(axes[0], curves.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch" if title.startswith("retriever") else "optimizer step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation score")
    else:
        series = []
        for model, runs in data["groups"]:
            for k, r in enumerate(runs):
                points = [(e["epoch"], e["valid_score"]) for e in r.get("epoch_log") or [] if "valid_score" in e]
                if points:
                    series.append((model if len(runs) == 1 else f"{model} seed {r.get('seed', k)}", points))
        if not series:
            return False
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, points in series:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, lw=1.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation score (valid_metric)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cost_rows(data) -> list[tuple[str, float | None, float | None]]:
    """``(label, wall seconds, peak RSS MiB)`` per PRIME stage, or per model (means over seeds)."""
    single = data["single"]
    if single is not None and single.get("stages"):
        return [(stage + (" (reused)" if info.get("reused") else ""), info.get("wall_s"), info.get("peak_rss_mb"))
                for stage, info in single["stages"].items()]
    return [(row["model"], row["total_time_s"][0], row["peak_rss_mb"]) for row in summary_rows(data["groups"])]


def plot_cost(plt, data, path) -> bool:
    rows = [r for r in cost_rows(data) if r[1] is not None]
    if not rows:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [r[0] for r in rows]
    ax1.barh(labels, [r[1] for r in rows], color="tab:blue")
    ax1.set_xlabel("wall time (s)")
    ax2.barh(labels, [r[2] or 0 for r in rows], color="tab:orange")
    ax2.set_xlabel("peak resident memory (MiB)")
    for ax in (ax1, ax2):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    ax2.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_topk(plt, groups, path) -> bool:
    metrics = _metric_names(groups)
    families = {}
    for m in metrics:
        fam, k = _METRIC.match(m).groups()
        families.setdefault(fam, []).append(int(k))
    families = {f: sorted(ks) for f, ks in families.items() if len(ks) > 1 and f in ("ndcg", "recall")}
    if not families:
        return False
    rows = summary_rows(groups)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.2), squeeze=False)
    for ax, (fam, ks) in zip(axes[0], families.items()):
        for row in rows:
            means = [row[f"{fam}@{k}"][0] for k in ks]
            stds = [row[f"{fam}@{k}"][1] or 0.0 for k in ks]
            ax.errorbar(ks, means, yerr=stds if any(stds) else None, marker="o", ms=3, capsize=2, label=row["model"])
        ax.set_xlabel("cutoff k")
        ax.set_ylabel(f"test {fam.upper() if fam == 'ndcg' else fam.capitalize()}@k")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_efficiency(plt, groups, path) -> bool:
    rows = [r for r in summary_rows(groups) if r.get("ndcg@10", (None,))[0] is not None and r["time_per_epoch_s"][0]]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for row in rows:
        (y, ystd), (x, xstd) = row["ndcg@10"], row["time_per_epoch_s"]
        ax.errorbar([x], [y], xerr=[xstd] if xstd else None, yerr=[ystd] if ystd else None, marker="o", capsize=3,
                    label=row["model"])
        ax.annotate(row["model"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training time per epoch (s, log scale)")
    ax.set_ylabel("test NDCG@10")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(pair, digits=4):
    mean, std = pair if isinstance(pair, tuple) else (pair, None)
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def write_report(prefix: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the figures and ``README.md`` for ``prefix``; return the report folder."""
    plt = _pyplot()
    data = load(prefix)
    prefix = str(prefix)[:-5] if str(prefix).endswith(".json") else str(prefix)
    folder = Path(out) if out else Path(os.path.dirname(os.path.abspath(prefix))) / "figures" / data["name"]
    folder.mkdir(parents=True, exist_ok=True)
    from recbole_mm.bench import PAPER

    paper = PAPER.get(data["dataset"], {})
    figures = []
    for file, title, draw in (
            ("metrics.png", "Test metrics (mean ± std over seeds; black ticks: published)",
             lambda p: plot_metrics(plt, data["groups"], p, paper.get("models"))),
            ("curves.png", "Validation curves" + (" per stage" if data["single"] is not None else ""),
             lambda p: plot_curves(plt, data, p)),
            ("cost.png", "Wall time and peak memory" + (" per stage" if data["single"] is not None else " per model"),
             lambda p: plot_cost(plt, data, p)),
            ("topk.png", "Top-k sensitivity", lambda p: plot_topk(plt, data["groups"], p)),
            ("efficiency.png", "Test NDCG@10 against training time per epoch",
             lambda p: plot_efficiency(plt, data["groups"], p))):
        path = folder / file
        if draw(path):
            figures.append((file, title))
        elif path.exists():
            path.unlink()  # a figure of an older report that no longer applies
    lines = [f"# {data['name']} ({data['dataset']})", "",
             f"Made by `recbole-mm-report {prefix}` from the stored runs.", ""]
    rows = summary_rows(data["groups"])
    metrics = [m for m in ("ndcg@10", "recall@10", "mrr@10") if m in _metric_names(data["groups"])]
    lines += ["| model | seeds | " + " | ".join(metrics) + " | s/epoch | total (s) | peak RSS (MiB) |",
              "|---" * (len(metrics) + 5) + "|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['seeds']} | " + " | ".join(_fmt(row[m]) for m in metrics)
                     + f" | {_fmt(row['time_per_epoch_s'], 1)} | {_fmt(row['total_time_s'], 0)} | "
                     + (f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] else "") + " |")
    if data["single"] is not None and data["single"].get("stages"):
        lines += ["", "| stage | wall (s) | peak RSS (MiB) |", "|---|---|---|"]
        lines += [f"| {s} | {w:.1f} | {m:.0f} |" for s, w, m in cost_rows(data) if w is not None and m is not None]
    for file, title in figures:
        lines += ["", f"## {title}", "", f"![{title}]({file})"]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recbole-mm-report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="benchmarks/results/<name> (a bench table or a result .json)")
    parser.add_argument("--out", default=None, help="report folder (one input only; default <dir>/figures/<name>/)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.out and len(args.results) > 1:
        parser.error("--out needs exactly one input")
    for prefix in args.results:
        folder = write_report(prefix, args.out)
        print(f"wrote {folder}/README.md and {len(list(folder.glob('*.png')))} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
