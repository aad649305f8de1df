"""Benchmark runner: several models, one dataset, one protocol, one comparison table.

``recbole-mm-bench --dataset=beauty --models=LRURec,SASRec,BERT4Rec --out=benchmarks/results/beauty``
trains and evaluates each model in its own process (so that peak memory is per model) with the
same overrides, and writes ``<out>.md`` and ``<out>.csv``. Per-model overrides:
``--model_args="SASRec:epochs=3 BERT4Rec:epochs=3"``. A model whose result file already exists
under ``<out>_runs/`` with the same arguments is not run again (``--rerun`` to force).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time

from recbole_mm.errors import UserError

METRICS = ["ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@5", "mrr@10"]

# Published test numbers (full ranking, no history masking) to print beside ours.
PAPER = {
    ("beauty", "LRURec"): {"ndcg@5": 0.0339, "recall@5": 0.0565, "ndcg@10": 0.0438, "recall@10": 0.0871},
    ("beauty", "SASRec"): {"ndcg@10": 0.0364, "recall@10": 0.0734},
    ("beauty", "BERT4Rec"): {"ndcg@10": 0.0350, "recall@10": 0.0653},
}
PAPER_SOURCE = "PRIME Table 2 (Amazon Beauty, full ranking)"


def _parse_model_args(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in shlex.split(text or ""):
        model, _, kv = item.partition(":")
        if not kv or "=" not in kv:
            raise UserError(f"--model_args item {item!r} must look like Model:key=value")
        out.setdefault(model, []).append(f"--{kv}")
    return out


def run_one(model: str, dataset: str, args: list[str], run_dir: str, rerun: bool, *, name: str | None = None,
            cwd: str | None = None, tag: str = "bench") -> dict:
    """Run one model in a subprocess (or reuse its stored result); returns the result dict.

    The result and log are ``<run_dir>/<name>.json`` / ``.log`` (``name`` defaults to the model); a
    stored result is reused when it was made with the same ``args``. The run's working directory
    (where RecBole writes log/ and saved/) is ``cwd``, by default ``run_dir``.
    """
    name = name or model
    os.makedirs(run_dir, exist_ok=True)
    result_file = os.path.join(run_dir, f"{name}.json")
    cmd = [sys.executable, "-m", "recbole_mm.cli", f"--model={model}", f"--dataset={dataset}",
           f"--result_file={os.path.abspath(result_file)}", "--show_progress=False", *args]
    if os.path.exists(result_file) and not rerun:
        with open(result_file, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("bench_args") == args:
            print(f"[{tag}] {name}: reusing {result_file}", flush=True)
            return stored
    print(f"[{tag}] {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    cwd = cwd or run_dir
    os.makedirs(cwd, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, f"{name}.log"), "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"[{tag}] {name} failed (exit {proc.returncode}); see {run_dir}/{name}.log")
    with open(result_file, encoding="utf-8") as f:
        result = json.load(f)
    result.update(bench_args=args, wall_s=time.perf_counter() - start, load_avg=os.getloadavg())
    with open(result_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(result_file + ".tmp", result_file)
    return result


def write_tables(results: list[dict], dataset: str, out: str, command: str) -> None:
    """Write ``out.md`` (with the command and paper numbers) and ``out.csv``."""
    base = results[0].get("time_per_epoch_s") or 0
    rows = []
    for r in results:
        test = r["test_result"]
        row = {"model": r["model"], **{m: test.get(m) for m in METRICS},
               "epochs_run": r.get("epochs_run"), "best_epoch": r.get("best_epoch"),
               "time_per_epoch_s": r.get("time_per_epoch_s"),
               "epoch_time_vs_first": (r["time_per_epoch_s"] / base) if base and r.get("time_per_epoch_s") else None,
               "time_to_best_s": r.get("time_to_best_s"), "total_time_s": r.get("total_time_s"),
               "peak_rss_mb": r.get("peak_rss_mb"), "overrides": " ".join(r.get("bench_args", []))}
        rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v, digits=4):
        return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    lines = [f"# {dataset}: {', '.join(r['model'] for r in results)}", "", f"Command: `{command}`", "",
             "Test metrics (full ranking over all items, leave-one-out); paper numbers in parentheses "
             f"from {PAPER_SOURCE} where published.", "",
             "| model | " + " | ".join(METRICS) + " | epochs (best) | s/epoch | vs first | time to best (s) | total (s) | peak RSS (MiB) | overrides |",
             "|---" * (len(METRICS) + 8) + "|"]
    for row in rows:
        paper = PAPER.get((dataset, row["model"]), {})
        cells = [fmt(row[m]) + (f" ({paper[m]:.4f})" if m in paper else "") for m in METRICS]
        lines.append(f"| {row['model']} | " + " | ".join(cells)
                     + f" | {row['epochs_run']} ({row['best_epoch']}) | {fmt(row['time_per_epoch_s'], 1)}"
                     + f" | {fmt(row['epoch_time_vs_first'], 3)} | {fmt(row['time_to_best_s'], 0)}"
                     + f" | {fmt(row['total_time_s'], 0)} | {fmt(row['peak_rss_mb'], 0)} | {row['overrides']} |")
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="recbole-mm-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--models", required=True, help="comma-separated model names")
    parser.add_argument("--out", required=True, help="output prefix, e.g. benchmarks/results/beauty")
    parser.add_argument("--model_args", default="", help='e.g. "SASRec:epochs=3 BERT4Rec:epochs=3"')
    parser.add_argument("--rerun", action="store_true")
    args, common = parser.parse_known_args(argv)
    try:
        per_model = _parse_model_args(args.model_args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(args.out + "_runs")
    results = []
    for model in [m for m in args.models.split(",") if m]:
        results.append(run_one(model, args.dataset, common + per_model.get(model, []), run_dir, args.rerun))
        write_tables(results, args.dataset, args.out, "recbole-mm-bench " + " ".join(shlex.quote(a) for a in argv))
    print(open(args.out + ".md", encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
