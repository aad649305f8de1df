"""HaNoRec's ablation table (issue 16): SFT only, SFT + DPO, + HaRS, + NoDO, full (HaRS + NoDO),
SASRec and LRURec, one protocol per table; test metrics, time and peak memory per stage.

Protocols:
  sampled  the paper's: each user's last ``--history_cap`` interactions (a truncated copy of the
           dataset, optionally a seeded sample of ``--users`` users), leave-one-out on those, the
           target + 9 uniformly sampled unobserved items (RecBole ``uni9``), HR@3, NDCG@3 and (HaNoRec
           rows) AUC. The paper splits whole sequences 8:1:1 instead.
  full     the project's: RecBole full ranking, HaNoRec reranks the retriever's top n_candidates.

    # ml-1m, the paper's protocol (recbole-mm-data prepare ml-1m-llamarec writes dataset/ml-1m-llamarec):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/hanorec.py --protocol=sampled \\
        --data_path=dataset --dataset=ml-1m-llamarec --history_cap=6 --users=300
    # ml-100k (RecBole's bundled copy), full ranking:
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/hanorec.py --protocol=full --dataset=ml-100k \\
        --set n_candidates=10   # k = 5, 10 only: the ranker runs just for users whose answer is a candidate
    python benchmarks/hanorec.py --smoke --out=/tmp/hanorec   # generated fixture, tiny caps (a test runs it)

Each run is a subprocess (its own peak memory) in a scratch folder; HaNoRec rows share
``<out>/artifacts`` (the SFT stage -- and for ``full`` the retriever -- is trained once and reused
by every ablation row). Results: ``<out>/hanorec_<dataset>_<protocol>.md`` and ``.json``, with the
command, the git commit and ``/proc/loadavg`` before and after.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "properties", "preset", "hanorec-cpu.yaml")

ABLATIONS = [("SFT only", {"hanorec_stages": "sft"}),
             ("SFT + DPO", {"hanorec_stages": "sft+dpo", "hars": False, "nodo": False}),
             ("+ HaRS", {"hanorec_stages": "sft+dpo", "hars": True, "nodo": False}),
             ("+ NoDO", {"hanorec_stages": "sft+dpo", "hars": False, "nodo": True}),
             ("full", {"hanorec_stages": "sft+dpo", "hars": True, "nodo": True})]
BASELINES = ["SASRec", "LRURec"]


def protocol_settings(protocol: str, n_candidates: int = 10) -> dict:
    """RecBole's evaluation settings of a protocol. ``full``: the cut-offs k <= ``n_candidates`` only,
    so the ranker is called just for the users whose answer is a candidate (``rank_only_hits``)."""
    if protocol == "sampled":
        return {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni9"},
                "metrics": ["Hit", "NDCG"], "topk": [3], "valid_metric": "NDCG@3", "n_candidates": 10}
    if protocol == "full":
        topk = [k for k in (5, 10, 20) if k <= n_candidates]
        if not topk:
            raise SystemExit(f"--set n_candidates={n_candidates}: the full protocol reports k = 5, 10, 20; use >= 5")
        return {"topk": topk, "metrics": ["Recall", "NDCG", "MRR"], "valid_metric": f"NDCG@{max(topk)}"}
    raise SystemExit(f"--protocol={protocol!r}: choose sampled or full")


def truncate(data_path: str, name: str, cap: int, out_root: str, users: int | None = None, seed: int = 0) -> str:
    """Write ``<out_root>/<name>-last<cap>[-u<users>]/``: each user's last ``cap`` interactions of
    ``<data_path>/<name>/<name>.inter`` (by timestamp; ties keep the file order), of ``users``
    seeded-sampled users when given; the item files and images are linked. Returns the new name."""
    src = os.path.join(data_path, name)
    inter = os.path.join(src, f"{name}.inter")
    if not os.path.isfile(inter):
        raise SystemExit(f"{inter} not found: --history_cap needs a dataset folder with <name>.inter (--data_path)")
    new = f"{name}-last{cap}" + (f"-u{users}" if users else "")
    dst = os.path.join(out_root, new)
    target = os.path.join(dst, f"{new}.inter")
    if os.path.isfile(target):
        return new
    with open(inter, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        col = {h.split(":")[0]: i for i, h in enumerate(header)}
        by_user: dict[str, list[tuple[float, int, list[str]]]] = {}
        for n, row in enumerate(reader):
            by_user.setdefault(row[col["user_id"]], []).append((float(row[col["timestamp"]]), n, row))
    names = sorted(by_user)
    if users and users < len(names):
        names = sorted(random.Random(seed).sample(names, users))
    os.makedirs(dst, exist_ok=True)
    with open(target + ".part", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for u in names:
            for _, _, row in sorted(by_user[u])[-cap:]:
                writer.writerow(row)
    for suffix in (".item", ".items.jsonl", ".captions.jsonl"):
        path = os.path.join(src, name + suffix)
        if os.path.isfile(path) and not os.path.exists(os.path.join(dst, new + suffix)):
            os.symlink(os.path.abspath(path), os.path.join(dst, new + suffix))
    if os.path.isdir(os.path.join(src, "images")) and not os.path.exists(os.path.join(dst, "images")):
        os.symlink(os.path.abspath(os.path.join(src, "images")), os.path.join(dst, "images"))
    os.replace(target + ".part", target)
    return new


def run_one(label, model, dataset, cfg, files, folder) -> dict:
    """One row in its own process, reused when finished (:func:`recbole_mm.bench.run_config_row`)."""
    from recbole_mm.bench import run_config_row

    def to_row(result: dict) -> dict:
        stages = {k: {"wall_s": v.get("wall_s"), "peak_rss_mb": v.get("peak_rss_mb"), "reused": bool(v.get("reused"))}
                  for k, v in (result.get("stages") or {}).items()}
        return {"label": label, "model": model, "dataset": dataset, **result["test_result"],
                "time_per_epoch_s": result.get("time_per_epoch_s"), "peak_rss_mb": result.get("peak_rss_mb"),
                "total_time_s": result.get("total_time_s"), "stages": stages,
                **({"retriever_test": result["retriever_test_result"]} if result.get("retriever_test_result") else {})}

    return run_config_row(label, model, dataset, cfg, files, folder, to_row, extra_pythonpath=ROOT)


def _stage_cell(stage: dict) -> str:
    took = "reused" if stage["reused"] else f"{stage['wall_s'] or 0:.0f} s"
    return f"{took} / {stage['peak_rss_mb'] or 0:.0f} MB"


def table(rows: list[dict], metrics: list[str]) -> str:
    cols = ["label", *metrics, "peak_rss_mb", "wall_s", "stages (wall s / peak MB)", "load"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        stages = "; ".join(f"{k} {_stage_cell(v)}" for k, v in r["stages"].items())
        cells = [r["label"], *(r.get(m) for m in metrics), r["peak_rss_mb"], r["wall_s"], stages or "-", r.get("load")]
        lines.append("| " + " | ".join("-" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c)
                                       for c in cells) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    proc = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" (dirty)" if dirty else "")


def parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write key=value")
        out[key] = yaml.safe_load(value)
    return out


def write_table(rows: list[dict], meta: dict, dataset: str, protocol: str, out: str, topk=(5, 10, 20),
                tag: str | None = None) -> None:
    """``hanorec_<dataset>_<protocol>.md`` and ``.json`` of the rows so far."""
    from recbole_mm.files import atomic_output, write_json

    from recbole_mm.bench import loadavg

    meta = {**meta, "loadavg_end": loadavg()}
    metrics = (["hit@3", "ndcg@3", "auc"] if protocol == "sampled"
               else [f"{m}@{k}" for k in topk for m in ("recall", "ndcg")] + [f"mrr@{max(topk)}"])
    stage1 = next((r for r in rows if r.get("retriever_test")), None)
    if stage1:  # full ranking: the retriever every HaNoRec row reranks, on its own (the same checkpoint)
        rows = rows + [{"label": "HaNoRec's retriever alone (stage 1)", **stage1["retriever_test"],
                        "peak_rss_mb": None, "wall_s": None, "stages": {}, "load": None}]
    stem = os.path.join(out, f"hanorec_{dataset}_{protocol}" + (f"_{tag}" if tag else ""))
    write_json(stem + ".json", {"meta": meta, "rows": rows})
    with atomic_output(stem + ".md") as f:
        f.write(f"# HaNoRec on {dataset}, protocol {protocol}{f' ({tag})' if tag else ''}\n\n{table(rows, metrics)}\n\n"
                f"AUC: HaNoRec rows only (share of (target, negative) pairs ordered correctly). "
                f"load: /proc/loadavg (1, 5, 15 min) before -> after each row.\n\n"
                + "".join(f"- {k}: `{v}`\n" for k, v in meta.items()))


def main(argv=None) -> list[dict]:
    from recbole_mm.bench import loadavg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="sampled", choices=("sampled", "full"))
    parser.add_argument("--dataset", default="ml-1m-llamarec")
    parser.add_argument("--data_path", default=None, help="folder of dataset folders (~: the project's default)")
    parser.add_argument("--history_cap", type=int, default=None, help="keep each user's last N interactions (paper: 6)")
    parser.add_argument("--users", type=int, default=None, help="with --history_cap: a seeded sample of users")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--rows", default=None, help="comma-separated labels to run (default: every row)")
    parser.add_argument("--set", action="append", default=[], help="key=value for every HaNoRec row")
    parser.add_argument("--tag", default=None, help="suffix of the row folders and the table (rows made with --set)")
    parser.add_argument("--smoke", action="store_true", help="generated fixture, tiny caps (machinery only)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    meta = {"command": " ".join(shlex.quote(a) for a in [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]),
            "git_commit": git_commit(), "loadavg_start": loadavg()}
    hanorec_extra, baseline_extra = parse_set(args.set), {}
    common = protocol_settings(args.protocol, int(hanorec_extra.get("n_candidates", 10)))
    dataset, data_path = args.dataset, args.data_path
    if args.smoke:
        from recbole_mm.data.fixtures import FixtureSpec, make_fixture

        data_path = os.path.join(out, "fixture")
        make_fixture(data_path, "mmfix", FixtureSpec(n_users=50, n_items=30, min_len=5, max_len=14, seed=1))
        dataset, args.history_cap = "mmfix", args.history_cap or (6 if args.protocol == "sampled" else None)
        small = {"epochs": 1, "hidden_size": 16, "inner_size": 32, "train_batch_size": 64, "eval_batch_size": 100}
        baseline_extra = dict(small)
        hanorec_extra = {**small, "ranker_small": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                   "vocab_size": 400},
                         "ranker_model": "small", "retriever_config": dict(small), "text_encoder": "small",
                         "attr_max_tokens": 6,
                         "ranker_train_examples": 16, "ranker_valid_users": 8, "ranker_valid_every": 2,
                         "dpo_train_examples": 8, "dpo_valid_every": 2, "hars_top_k": 5,
                         "show_progress": False, **hanorec_extra}
        common = {**common, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "state": "ERROR",
                  "show_progress": False, "MAX_ITEM_LIST_LENGTH": 8,
                  **({"n_candidates": 5} if args.protocol == "full" else {})}
    if args.history_cap:
        if data_path is None:
            raise SystemExit("--history_cap needs --data_path (the folder holding the dataset's folder)")
        dataset = truncate(data_path, dataset, args.history_cap, os.path.join(out, "data"), args.users)
        data_path = os.path.join(out, "data")
        hanorec_extra.setdefault("hanorec_history_cap", args.history_cap)
        # the copy has a new name, so no dataset yaml: its columns, and no filtering (every user keeps N)
        common = {"load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "TIME_FIELD": "timestamp",
                  "filter_inter_by_user_or_item": False, "user_inter_num_interval": "[0,inf)",
                  "item_inter_num_interval": "[0,inf)", "rm_dup_inter": None, "val_interval": None, **common}
    if data_path:
        common["data_path"] = os.path.abspath(data_path)
    artifacts = os.path.join(out, "artifacts")
    wanted = set(args.rows.split(",")) if args.rows else None
    rows = []
    plan = [(label, "HaNoRec", {**common, **hanorec_extra, **extra, "artifacts_dir": artifacts}, [args.preset])
            for label, extra in ABLATIONS]
    plan += [(name, name, {**common, **baseline_extra}, []) for name in BASELINES]
    for label, model, cfg, files in plan:
        if wanted and label not in wanted:
            continue
        folder = os.path.join(out, "hanorec_runs", f"{dataset}_{args.protocol}" + (f"_{args.tag}" if args.tag else ""),
                              label.replace(" ", "_").replace("+", "p"))
        rows.append(run_one(label, model, dataset, cfg, files, folder))
        print(json.dumps(rows[-1]), flush=True)
        write_table(rows, meta, dataset, args.protocol, out, common.get("topk", (3,)), args.tag)  # after every row: an interrupted table keeps its rows
    return rows


if __name__ == "__main__":
    main()
