"""Benchmark runner: several models, one dataset, one protocol, one comparison table.

``recbole-mm-bench --dataset=beauty --models=LRURec,SASRec,BERT4Rec --out=benchmarks/results/beauty``
trains and evaluates each model in its own process (so that peak memory is per model) with the
same overrides, streams each run's log and progress bars, and writes ``<out>.md`` and ``<out>.csv``.
Per-model overrides: ``--model_args="SASRec:epochs=3 BERT4Rec:epochs=3"``. ``--seeds=3`` runs every
model with seeds 2020, 2021, 2022 (or ``--seeds=1,7,42``) and reports mean +- std over the seeds and,
for each model after the first, the paired Wilcoxon signed-rank test of its per-user test NDCG@10
(averaged over seeds) against the first model's. A run whose result file already exists under
``<out>_runs/`` with the same arguments is not run again (``--rerun`` to force);
``--regenerate`` rebuilds the tables from the stored runs without running anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from recbole_mm.errors import UserError

METRICS = ["ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@5", "mrr@10"]
DEFAULT_SEED = 2020  # RecBole's default seed
TEST_METRIC = "ndcg@10"

# Published test numbers (full ranking, no history masking) to print beside ours, per dataset,
# with their source. Datasets without an entry get no paper column.
PAPER = {
    "beauty": {
        "source": "PRIME Table 2 (Amazon Beauty, full ranking)",
        "models": {
            "LRURec": {"ndcg@5": 0.0339, "recall@5": 0.0565, "ndcg@10": 0.0438, "recall@10": 0.0871},
            "SASRec": {"ndcg@10": 0.0364, "recall@10": 0.0734},
            "BERT4Rec": {"ndcg@10": 0.0350, "recall@10": 0.0653},
        },
    },
}


def _parse_model_args(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in shlex.split(text or ""):
        model, _, kv = item.partition(":")
        if not kv or "=" not in kv:
            raise UserError(f"--model_args item {item!r} must look like Model:key=value")
        out.setdefault(model, []).append(f"--{kv}")
    return out


def parse_seeds(text: str | None) -> list[int]:
    """``"3"`` -> [2020, 2021, 2022]; ``"1,7,42"`` -> [1, 7, 42]; ``None`` -> [2020]."""
    if text is None or text == "":
        return [DEFAULT_SEED]
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = [DEFAULT_SEED + k for k in range(int(text))]
    except ValueError:
        raise SystemExit(f"--seeds={text!r}: give a count (--seeds=3) or a list (--seeds=1,7,42)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds={text!r}: need at least one seed, without repeats")
    return seeds


def _stream(cmd: list[str], cwd: str, log_path: str, tag: str) -> int:
    """Run ``cmd``, copying its output (log lines and tqdm bars) to ``log_path`` and to our stdout."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
        out = getattr(sys.stdout, "buffer", None)
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
            if not chunk:
                break
            log.write(chunk)
            if out is not None and sys.stdout is sys.__stdout__:
                out.write(chunk)
                out.flush()
            else:  # a replaced stdout (tests, notebooks): text only
                sys.stdout.write(chunk.decode("utf-8", "replace"))
        return proc.wait()


def run_one(model: str, dataset: str, args: list[str], run_dir: str, rerun: bool, *, name: str | None = None,
            cwd: str | None = None, tag: str = "bench", quiet: bool = False) -> dict:
    """Run one model in a subprocess (or reuse its stored result); returns the result dict.

    The result and log are ``<run_dir>/<name>.json`` / ``.log`` (``name`` defaults to the model); a
    stored result is reused when it was made with the same ``args``. The run's working directory
    (where RecBole writes log/ and saved/) is ``cwd``, by default ``run_dir``. The run's output is
    streamed to stdout as it comes (``quiet``: only to the log file).
    """
    name = name or model
    os.makedirs(run_dir, exist_ok=True)
    result_file = os.path.join(run_dir, f"{name}.json")
    cmd = [sys.executable, "-m", "recbole_mm.cli", f"--model={model}", f"--dataset={dataset}",
           f"--result_file={os.path.abspath(result_file)}", *args]
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
    log_path = os.path.join(run_dir, f"{name}.log")
    if quiet:
        with open(log_path, "w", encoding="utf-8") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd).returncode
    else:
        code = _stream(cmd, cwd, log_path, tag)
    if code != 0:
        raise SystemExit(f"[{tag}] {name} failed (exit {code}); see {log_path}")
    with open(result_file, encoding="utf-8") as f:
        result = json.load(f)
    result.update(bench_args=args, wall_s=time.perf_counter() - start, load_avg=os.getloadavg())
    with open(result_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(result_file + ".tmp", result_file)
    return result


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as the benchmark tables record them."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


_CONFIG_RUNNER = """
import json, sys
from recbole_mm.quick_start import run_recbole_mm
model, dataset, cfg, files, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
r = run_recbole_mm(model, dataset, config_dict=cfg, config_file_list=files or None)
r.pop("test_per_user", None)
json.dump(r, open(out, "w"), default=str)
"""


def run_config_row(label: str, model: str, dataset: str, config: dict, files: list[str], folder: str,
                   to_row, extra_pythonpath: str | None = None) -> dict:
    """One benchmark row from a config dict (which the command line of :func:`run_one` cannot carry:
    nested settings) in its own process (its own peak memory), ``folder`` its working directory.
    ``to_row(result)`` turns the run's result into the row; ``wall_s`` and ``load`` (before -> after)
    are added. A finished row in ``<folder>/row.json`` made with the same model, dataset, config and
    config files is returned instead, so an interrupted table resumes."""
    from recbole_mm.files import write_json

    os.makedirs(folder, exist_ok=True)
    out, done = os.path.join(folder, "result.json"), os.path.join(folder, "row.json")
    settings = json.loads(json.dumps({"model": model, "dataset": dataset, "config": config, "files": files},
                                     default=str))
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("settings") == settings:
            print(f"reusing {label} on {dataset} ({done})", flush=True)
            return previous["row"]
    load_before, started = loadavg(), time.perf_counter()
    env = dict(os.environ)
    if extra_pythonpath:
        env["PYTHONPATH"] = extra_pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CONFIG_RUNNER, model, dataset, json.dumps(config), json.dumps(files),
                           out], cwd=folder, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{label} on {dataset} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        row = to_row(json.load(f))
    row.update(wall_s=time.perf_counter() - started, load=f"{load_before} -> {loadavg()}")
    write_json(done, {"settings": settings, "row": row})
    return row


def run_name(model: str, seed: int, seeds: list[int]) -> str:
    """Stored-run name: the model alone for a single default-seed run (older tables), else ``<model>-seed<s>``."""
    return model if seeds == [DEFAULT_SEED] else f"{model}-seed{seed}"


def _best_epoch(r: dict):
    best = r.get("best_epoch")
    if best is None:
        return None
    return best if r.get("epoch_base") == 1 else best + 1  # runs stored before best epochs were 1-based


def wilcoxon_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (``None`` when untestable)."""
    if not a or len(a) != len(b):
        return None
    from scipy.stats import wilcoxon

    if all(x == y for x, y in zip(a, b)):
        return 1.0
    return float(wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)


def _mean_per_user(runs: list[dict], metric: str) -> list[float] | None:
    series = [r.get("test_per_user", {}).get(metric) for r in runs]
    if not series or any(s is None for s in series) or len({len(s) for s in series}) != 1:
        return None
    return [sum(vals) / len(vals) for vals in zip(*series)]


def summarize(groups: list[tuple[str, list[dict]]]) -> list[dict]:
    """One row per model: mean and std (over seeds) of each metric, timings, the p-value vs the first model."""
    rows = []
    first_users = _mean_per_user(groups[0][1], TEST_METRIC) if groups else None
    base = statistics.mean(r["time_per_epoch_s"] for r in groups[0][1] if r.get("time_per_epoch_s")) \
        if groups and any(r.get("time_per_epoch_s") for r in groups[0][1]) else None
    for i, (model, runs) in enumerate(groups):
        row: dict = {"model": model, "seeds": " ".join(str(r.get("seed", DEFAULT_SEED)) for r in runs),
                     "n_seeds": len(runs)}
        for m in METRICS:
            values = [r["test_result"][m] for r in runs if r["test_result"].get(m) is not None]
            row[m] = statistics.mean(values) if values else None
            row[m + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        users = _mean_per_user(runs, TEST_METRIC)
        row[f"p_{TEST_METRIC}_vs_first"] = (wilcoxon_p(users, first_users) if i and users and first_users else None)
        row["users"] = len(users) if users else None

        def avg(key, runs=runs):
            vals = [r[key] for r in runs if r.get(key) is not None]
            return statistics.mean(vals) if vals else None

        row.update(epochs_run=avg("epochs_run"), time_per_epoch_s=avg("time_per_epoch_s"))
        bests = [_best_epoch(r) for r in runs if _best_epoch(r) is not None]
        row["best_epoch"] = statistics.mean(bests) if bests else None
        row["epoch_time_vs_first"] = (row["time_per_epoch_s"] / base) if base and row["time_per_epoch_s"] else None
        row.update(time_to_best_s=avg("time_to_best_s"), total_time_s=avg("total_time_s"),
                   peak_rss_mb=max((r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb")), default=None),
                   overrides=" ".join(a for a in runs[0].get("bench_args", []) if not a.startswith("--seed=")))
        rows.append(row)
    return rows


def _fmt(v, digits=4):
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer() and digits == 0:
        return str(int(v))
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_tables(results, dataset: str, out: str, command: str) -> list[dict]:
    """Write ``out.md`` (with the command, paper numbers and significance) and ``out.csv``.

    ``results`` is a list of ``(model, [result per seed])`` pairs (a flat list of results, one per
    model, is accepted too). Returns the rows.
    """
    groups = [(r["model"], [r]) for r in results] if results and isinstance(results[0], dict) else list(results)
    rows = summarize(groups)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paper = PAPER.get(dataset)
    multi = any(r["n_seeds"] > 1 for r in rows)
    first = rows[0]["model"]
    intro = ("Test metrics (full ranking over all items, leave-one-out)"
             + (f", mean ± std over seeds {rows[0]['seeds']}" if multi else "")
             + (f"; paper numbers in parentheses from {paper['source']} where published." if paper else
                "; no published numbers exist for this dataset under this protocol."))
    p_col = f"p ({TEST_METRIC} vs {first})"
    tested = any(r[f"p_{TEST_METRIC}_vs_first"] is not None for r in rows)
    p_note = (f"{p_col}: two-sided Wilcoxon signed-rank test on per-user test {TEST_METRIC}"
              + (" (each user's mean over seeds)" if multi else "") + f", paired with {first}." if tested else
              f"{p_col}: not available (these runs stored no per-user metrics)." if len(rows) > 1 else
              f"{p_col}: needs a second model.")
    lines = [f"# {dataset}: {', '.join(r['model'] for r in rows)}", "", f"Command: `{command}`", "", intro, "",
             p_note, "",
             "| model | " + " | ".join(METRICS) + f" | {p_col} | epochs (best) | s/epoch | vs first | "
             "time to best (s) | total (s) | peak RSS (MiB) | overrides |",
             "|---" * (len(METRICS) + 9) + "|"]
    for row in rows:
        published = (paper or {}).get("models", {}).get(row["model"], {})
        cells = []
        for m in METRICS:
            cell = _fmt(row[m]) + (f" ± {row[m + '_std']:.4f}" if row[m + "_std"] is not None else "")
            cells.append(cell + (f" ({published[m]:.4f})" if m in published else ""))
        p = row[f"p_{TEST_METRIC}_vs_first"]
        p_text = "" if p is None else (f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {p_text}"
                     + f" | {_fmt(row['epochs_run'], 0 if float(row['epochs_run'] or 0).is_integer() else 1)}"
                     + f" ({_fmt(row['best_epoch'], 0 if float(row['best_epoch'] or 0).is_integer() else 1)})"
                     + f" | {_fmt(row['time_per_epoch_s'], 1)}"
                     + f" | {_fmt(row['epoch_time_vs_first'], 3)} | {_fmt(row['time_to_best_s'], 0)}"
                     + f" | {_fmt(row['total_time_s'], 0)} | {_fmt(row['peak_rss_mb'], 0)} | {row['overrides']} |")
    lines += ["", "epochs (best): epochs run and the 1-based epoch with the best validation score"
              + (" (means over seeds)" if multi else "") + "."]
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    manifest = {"dataset": dataset, "command": command,
                "runs": {model: [r.get("bench_name", model) for r in runs] for model, runs in groups}}
    with open(out + ".runs.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return rows


def stored_groups(run_dir: str, names: dict[str, list[str]], missing: str) -> list[tuple[str, list[dict]]]:
    """``[(model, [stored run result, ...])]`` for ``{model: [run name, ...]}``, each result with its
    ``bench_name``; a missing run file is a one-line exit with ``missing`` (``{path}`` filled in)."""
    groups = []
    for model, run_names in names.items():
        runs = []
        for name in run_names:
            path = os.path.join(run_dir, f"{name}.json")
            if not os.path.isfile(path):
                raise SystemExit(missing.format(path=path))
            with open(path, encoding="utf-8") as f:
                runs.append({**json.load(f), "bench_name": name})
        groups.append((model, runs))
    return groups


def _load_stored(out: str, models: list[str] | None, seeds: list[int] | None) -> tuple[str, str, list]:
    """The stored runs of a table (its manifest, or one ``<model>.json`` per model)."""
    run_dir = out + "_runs"
    manifest_path = out + ".runs.json"
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        names = manifest["runs"]
        dataset, command = manifest["dataset"], manifest["command"]
    else:
        if not models:
            raise SystemExit(f"--regenerate: {manifest_path} not found; give --models too")
        names = {m: [run_name(m, s, seeds or [DEFAULT_SEED]) for s in (seeds or [DEFAULT_SEED])] for m in models}
        dataset, command = None, None
    groups = stored_groups(run_dir, names, "--regenerate: stored run {path} not found; run the benchmark "
                                           "without --regenerate")
    if dataset is None:
        dataset = groups[0][1][0].get("dataset", "")
        command = "recbole-mm-bench " + " ".join(groups[0][1][0].get("bench_args", []))
        if os.path.isfile(out + ".md"):  # a table written before manifests existed names its command
            with open(out + ".md", encoding="utf-8") as f:
                found = [line[len("Command: `"):-1] for line in f.read().splitlines()
                         if line.startswith("Command: `") and line.endswith("`")]
            command = found[0] if found else command
    return dataset, command, groups


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="recbole-mm-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--models", default=None, help="comma-separated model names")
    parser.add_argument("--out", required=True, help="output prefix, e.g. benchmarks/results/beauty")
    parser.add_argument("--model_args", default="", help='e.g. "SASRec:epochs=3 BERT4Rec:epochs=3"')
    parser.add_argument("--seeds", default=None, help="a count (3: seeds 2020..2022) or a list (1,7,42)")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the tables from the stored runs only")
    parser.add_argument("--quiet", action="store_true", help="write the runs' output to their log files only")
    args, common = parser.parse_known_args(argv)
    seeds = parse_seeds(args.seeds) if args.seeds else None
    if args.regenerate:
        dataset, command, groups = _load_stored(args.out, args.models.split(",") if args.models else None, seeds)
        write_tables(groups, args.dataset or dataset, args.out, command)
        print(open(args.out + ".md", encoding="utf-8").read())
        return 0
    if not args.dataset or not args.models:
        parser.error("--dataset and --models are required (unless --regenerate)")
    if any(a.startswith("--seed=") for a in common) and seeds:
        parser.error("give either --seed=N (one run) or --seeds, not both")
    seeds = seeds or [DEFAULT_SEED]
    try:
        per_model = _parse_model_args(args.model_args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(args.out + "_runs")
    command = "recbole-mm-bench " + " ".join(shlex.quote(a) for a in argv)
    groups = []
    for model in [m for m in args.models.split(",") if m]:
        runs = []
        for seed in seeds:
            extra = [] if seeds == [DEFAULT_SEED] else [f"--seed={seed}"]
            name = run_name(model, seed, seeds)
            result = run_one(model, args.dataset, common + per_model.get(model, []) + extra, run_dir, args.rerun,
                             name=name, quiet=args.quiet)
            runs.append({**result, "bench_name": name, "seed": seed})
        groups.append((model, runs))
        write_tables(groups, args.dataset, args.out, command)
    print(open(args.out + ".md", encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
