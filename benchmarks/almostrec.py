"""ALMOSTREC vs its embedding models (issue 17's table): ALMOSTREC on SASRec and on GRU4Rec
embeddings, SASRec, GRU4Rec and LRURec alone, same protocol (leave-one-out, full ranking, every
test user); HR (= Recall, one answer per user) and NDCG @10/@20, train time per example, evaluation
time per user, peak memory.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/almostrec.py --data_path=dataset --datasets=ml-100k,hm
    python benchmarks/almostrec.py --smoke --out=/tmp/almost   # generated fixture, tiny caps (a test runs it)

Each run is a subprocess (its own peak memory) in a scratch folder; results go to
``<out>/almostrec_<dataset>.md`` and ``.json``. ALMOSTREC runs use ``properties/preset/almostrec-cpu.yaml``
(``--preset`` to change); its embedding-model stage is reused from ``<out>/artifacts`` across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20"]

_RUNNER = """
import json, sys
from recbole_mm.quick_start import run_recbole_mm
model, dataset, cfg, files, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
r = run_recbole_mm(model, dataset, config_dict=cfg, config_file_list=files or None)
r.pop("test_per_user", None)
json.dump(r, open(out, "w"), default=str)
"""


def variants(smoke: bool) -> list[tuple[str, str, dict, bool]]:
    """(label, model, overrides, uses the ALMOSTREC preset)."""
    base = {"epochs": 1, "hidden_size": 16, "inner_size": 32} if smoke else {}
    rows = [("SASRec", "SASRec", dict(base), False), ("GRU4Rec", "GRU4Rec", dict(base), False),
            ("LRURec", "LRURec", dict(base), False)]
    for emb in ("SASRec", "GRU4Rec"):
        rows.append((f"ALMOSTREC on {emb}", "ALMOSTREC", {"almost_base_model": emb, "almost_base_config": dict(base)},
                     True))
    return rows


def smoke_overrides(data_path: str) -> dict:
    return {"data_path": data_path, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "epochs": 1, "train_batch_size": 64, "eval_batch_size": 64, "hidden_size": 16, "inner_size": 32,
            "MAX_ITEM_LIST_LENGTH": 8, "show_progress": False, "state": "ERROR", "topk": [10, 20],
            "ranker_small": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
            "max_history_items": 4, "attr_max_tokens": 4, "almost_train_examples": 16, "almost_valid_users": 8,
            "almost_batch_size": 4, "almost_valid_every": 2, "almost_warmup_steps": 1}


def run_one(label, model, dataset, cfg, files, folder) -> dict:
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, "result.json")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, model, dataset, json.dumps(cfg), json.dumps(files), out],
                          cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if proc.returncode:
        raise SystemExit(f"{label} on {dataset} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    test = result["test_result"]
    stages = result.get("stages") or {}
    head = stages.get("head", {})
    row = {"label": label, "dataset": dataset, **{m: test.get(m) for m in METRICS},
           "train_s_per_example": head.get("train_s_per_example"),
           "eval_s_per_user": (stages.get("evaluate") or {}).get("eval_s_per_user"),
           "time_per_epoch_s": result.get("time_per_epoch_s"),
           "peak_rss_mb": result.get("peak_rss_mb"), "total_time_s": result.get("total_time_s")}
    return row


def table(rows: list[dict]) -> str:
    cols = ["label", *METRICS, "train_s_per_example", "time_per_epoch_s", "eval_s_per_user", "peak_rss_mb", "total_time_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default=os.path.join(ROOT, "dataset"))
    parser.add_argument("--datasets", default="ml-100k,hm")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--preset", default=os.path.join(ROOT, "properties", "preset", "almostrec-cpu.yaml"))
    parser.add_argument("--smoke", action="store_true", help="generated fixture, tiny caps (machinery only)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    artifacts = os.path.abspath(os.path.join(args.out, "artifacts"))
    if args.smoke:
        from recbole_mm.data.fixtures import FixtureSpec, make_fixture

        data_path = os.path.abspath(os.path.join(args.out, "data"))
        make_fixture(data_path, "mmfix", FixtureSpec(n_users=50, n_items=30, min_len=5, max_len=14, seed=1))
        datasets, common = ["mmfix"], smoke_overrides(data_path)
    else:
        datasets, common = args.datasets.split(","), {"data_path": os.path.abspath(args.data_path), "topk": [10, 20]}
    every = []
    for dataset in datasets:
        rows = []
        for label, model, extra, preset in variants(args.smoke):
            cfg = {**common, **extra, **({"artifacts_dir": artifacts} if model == "ALMOSTREC" else {})}
            files = [args.preset] if preset else []
            folder = os.path.join(args.out, "almostrec_runs", dataset, label.replace(" ", "_"))
            rows.append(run_one(label, model, dataset, cfg, files, folder))
            print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(args.out, f"almostrec_{dataset}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(args.out, f"almostrec_{dataset}.md"), "w") as f:
            f.write(f"# ALMOSTREC vs its embedding models on {dataset}\n\n{table(rows)}\n")
        every += rows
    return every


if __name__ == "__main__":
    main()
