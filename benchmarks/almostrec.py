"""ALMOSTREC vs its embedding models (issue 17's table): ALMOSTREC on SASRec and on GRU4Rec
embeddings, SASRec, GRU4Rec and LRURec alone, same protocol (leave-one-out, full ranking, every
test user); HR (= Recall, one answer per user) and NDCG @10/@20, train time per example, evaluation
time per user, peak memory.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/almostrec.py --data_path=dataset --datasets=ml-100k,hm
    # the pretrained offline backbone for the ALMOSTREC rows, in files of their own:
    python benchmarks/almostrec.py --datasets=ml-100k --rows "ALMOSTREC on SASRec" \
        --set ranker_model=smollm2 --set almost_train_examples=1024 --tag smollm2
    python benchmarks/almostrec.py --smoke --out=/tmp/almost   # generated fixture, tiny caps (a test runs it)

Each run is a subprocess (its own peak memory) in a scratch folder; results go to
``<out>/almostrec_<dataset>.md`` and ``.json``. ALMOSTREC runs use ``properties/preset/almostrec-cpu.yaml``
(``--preset`` to change); its embedding-model stage is reused from ``<out>/artifacts`` across runs.
The baseline rows are trained with the preset's ``almost_base_config`` caps, and "ALMOSTREC on SASRec"
reads the SASRec row's checkpoint (``almost_base_checkpoint``), so "SASRec alone" IS the model whose
item table ALMOSTREC reads. ``--set key=value`` (a YAML value) overrides a setting of the ALMOSTREC
rows, ``--all key=value`` one of every row (e.g. ``MAX_ITEM_LIST_LENGTH=20``); ``--rows`` picks ALMOSTREC
rows by label (the baseline rows always run or are reused); ``--tag`` names the files and the
ALMOSTREC rows' folders. A row whose folder already holds the result of the same settings
is reused, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20"]

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


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def backbone_name(cfg: dict, files: list[str]) -> str:
    """The LMM an ALMOSTREC row ran with: its own setting, else its preset's, else ALMOSTREC.yaml's."""
    if "ranker_model" in cfg:
        return str(cfg["ranker_model"])
    for name in reversed(files):
        with open(name, encoding="utf-8") as f:
            value = (yaml.safe_load(f) or {}).get("ranker_model")
        if value:
            return f"{value} ({os.path.basename(name)})"
    return "ALMOSTREC.yaml default"


def run_one(label, model, dataset, cfg, files, folder) -> dict:
    """One row in its own process, reused when finished (:func:`recbole_mm.bench.run_config_row`)."""
    from recbole_mm.bench import run_config_row

    def to_row(result: dict) -> dict:
        test, stages = result["test_result"], result.get("stages") or {}
        return {"label": label, "dataset": dataset, **{m: test.get(m) for m in METRICS},
                "train_s_per_example": stages.get("head", {}).get("train_s_per_example"),
                "eval_s_per_user": (stages.get("evaluate") or {}).get("eval_s_per_user"),
                "time_per_epoch_s": result.get("time_per_epoch_s"),
                "peak_rss_mb": result.get("peak_rss_mb"), "total_time_s": result.get("total_time_s"),
                "backbone": backbone_name(cfg, files) if model == "ALMOSTREC" else "none",
                "saved_model_file": (os.path.join(folder, result["saved_model_file"])
                                     if result.get("saved_model_file") else None),
                "best_epoch": result.get("best_epoch"), "epochs_run": result.get("epochs_run"),
                "base_checkpoint": cfg.get("almost_base_checkpoint")}

    return run_config_row(label, model, dataset, cfg, files, folder, to_row, extra_pythonpath=ROOT)


def table(rows: list[dict]) -> str:
    cols = ["label", "backbone", *METRICS, "train_s_per_example", "time_per_epoch_s", "eval_s_per_user", "peak_rss_mb",
            "total_time_s", "load"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def parse_settings(items: list[str], flag: str) -> dict:
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} ranker_model=smollm2")
        settings[key] = yaml.safe_load(value)
    return settings


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default=os.path.join(ROOT, "dataset"))
    parser.add_argument("--datasets", default="ml-100k,hm")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--preset", default=os.path.join(ROOT, "properties", "preset", "almostrec-cpu.yaml"))
    parser.add_argument("--smoke", action="store_true", help="generated fixture, tiny caps (machinery only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the ALMOSTREC rows (YAML value), e.g. ranker_model=smollm2")
    parser.add_argument("--all", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of every row (YAML value), e.g. MAX_ITEM_LIST_LENGTH=20")
    parser.add_argument("--rows", action="append", default=None, help="only the rows with this label (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. smollm2")
    args = parser.parse_args(argv)
    overrides, every_row = parse_settings(args.set, "--set"), parse_settings(args.all, "--all")
    if not os.path.isfile(args.preset):  # a shipped preset's name, e.g. almostrec-smollm
        from recbole_mm.config import resolve_config_file

        args.preset = resolve_config_file(args.preset)
    args.preset = os.path.abspath(args.preset)  # the runs' working folders are their own
    with open(args.preset, encoding="utf-8") as f:
        base_caps = (yaml.safe_load(f) or {}).get("almost_base_config") or {}
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
        rows, checkpoints = [], {}
        for label, model, extra, preset in variants(args.smoke):
            if args.rows and label not in args.rows and model == "ALMOSTREC":
                continue  # baseline rows always run (or are reused): ALMOSTREC rows read their checkpoints
            if model == "ALMOSTREC":
                cfg = {**common, **every_row, **extra, "artifacts_dir": artifacts, **overrides}
                base_row = checkpoints.get(extra["almost_base_model"])
                if base_row:  # the baseline row's own model: "SASRec alone" is the table ALMOSTREC reads
                    cfg["almost_base_checkpoint"] = base_row
                    if not args.smoke:
                        cfg["almost_base_config"] = {**base_caps, **every_row}
            else:
                cfg = {**common, **({} if args.smoke else base_caps), **every_row, **extra}
            files = [args.preset] if preset else []
            tagged = f"_{args.tag}" if args.tag and model == "ALMOSTREC" else ""
            folder = os.path.join(args.out, "almostrec_runs", dataset, label.replace(" ", "_") + tagged)
            rows.append(run_one(label, model, dataset, cfg, files, folder))
            if model != "ALMOSTREC" and rows[-1]["saved_model_file"]:
                checkpoints[model] = rows[-1]["saved_model_file"]
            print(json.dumps(rows[-1]), flush=True)
        name = f"almostrec_{dataset}" + (f"_{args.tag}" if args.tag else "")
        command = "python benchmarks/almostrec.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump({"command": command, "commit": git_commit(), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(f"# ALMOSTREC vs its embedding models on {dataset}\n\nMade by `{command}` at commit "
                    f"{git_commit()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
                    f"load = /proc/loadavg (1, 5, 15 min) before -> after each row.\n\n{table(rows)}\n")
        every += rows
    return every


if __name__ == "__main__":
    main()
