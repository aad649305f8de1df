"""PRIME end to end (small local ranker) vs its retriever alone, with wall time and memory per stage.

    python benchmarks/prime_two_stage.py ml-100k-posters beauty [--data_path dataset/] [--rerun]
        [--extra "beauty:--retriever_checkpoint=PATH"]

Each dataset runs `run_recbole_mm.py --model=PRIME --config_files=prime-cpu` in its own process
(results in benchmarks/results/prime_<dataset>_small.json, reused unless --rerun) and the table
goes to benchmarks/results/prime_two_stage.md. The small ranker is NOT pretrained: these numbers
show the pipeline's cost and that it runs end to end, not the paper's ranking quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = {"beauty": "beauty product", "ml-100k-posters": "movie", "ml-100k": "movie", "ml-1m": "movie", "ml-1m-llamarec": "movie",
           "hm": "fashion item"}
METRICS = ["ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@10"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--data_path", default="dataset/")
    parser.add_argument("--extra", action="append", default=[], help='"dataset:--key=value ..."')
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args()
    extra = {}
    for item in args.extra:
        name, _, rest = item.partition(":")
        extra.setdefault(name, []).extend(shlex.split(rest))
    rows = []
    for ds in args.datasets:
        out = os.path.join(ROOT, "benchmarks", "results", f"prime_{ds}_small.json")
        cmd = [sys.executable, os.path.join(ROOT, "run_recbole_mm.py"), "--model=PRIME", f"--dataset={ds}",
               f"--data_path={args.data_path}", "--config_files=prime-cpu", f"--prompt_domain={DOMAINS.get(ds, 'item')}",
               f"--result_file={out}", "--show_progress=False", *extra.get(ds, [])]
        if args.rerun or not os.path.exists(out):
            print("[prime-bench]", " ".join(shlex.quote(c) for c in cmd), flush=True)
            subprocess.run(cmd, check=True)
        with open(out, encoding="utf-8") as f:
            rows.append((ds, json.load(f), cmd))
    lines = ["# PRIME two-stage, small local ranker (CPU)", "",
             "Made by `python benchmarks/prime_two_stage.py " + " ".join(args.datasets) + "`; each run: "
             "`run_recbole_mm.py --model=PRIME --config_files=prime-cpu` (the preset's caps: 512 training prompts, "
             "64 validation users, small Qwen2-VL-architecture ranker with random weights). Test metrics, full "
             "ranking over all items, no history masking.", "",
             "The small ranker is not pretrained, so it cannot know which candidate fits a history: it shows "
             "the pipeline's cost and that every stage runs, not the paper's ranking quality (that needs "
             "`ranker_model: Qwen/Qwen2-VL-2B-Instruct` on a GPU).", "",
             "| dataset | ranking | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for ds, r, _ in rows:
        lines.append(f"| {ds} | retriever alone (LRURec) | " + " | ".join(f"{r['retriever_test_result'][m]:.4f}" for m in METRICS) + " |")
        lines.append(f"| {ds} | PRIME (retriever + small ranker) | " + " | ".join(f"{r['test_result'][m]:.4f}" for m in METRICS) + " |")
    lines += ["", "| dataset | stage | wall time (s) | peak RSS so far (MiB) | notes |", "|---|---|---|---|---|"]
    for ds, r, _ in rows:
        for stage, info in r["stages"].items():
            notes = ", ".join(f"{k}={info[k]}" for k in ("train_prompts", "valid_users", "ranked_users", "trainable_share",
                                                          "loaded_from", "reused") if k in info)
            lines.append(f"| {ds} | {stage} | {info['wall_s']:.0f} | {info['peak_rss_mb']:.0f} | {notes} |")
        lines.append(f"| {ds} | total | {r['total_time_s']:.0f} | {r['peak_rss_mb']:.0f} | |")
    lines += ["", "Commands:", ""] + [f"- `{' '.join(shlex.quote(c) for c in cmd[1:])}`" for _, _, cmd in rows]
    with open(os.path.join(ROOT, "benchmarks", "results", "prime_two_stage.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
