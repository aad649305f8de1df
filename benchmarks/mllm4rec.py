"""MLLM4Rec (issue 15): LRURec alone, MLLM4Rec with and without captions and PRIME's text prompt
with the same backbone, all from ONE retriever checkpoint per dataset; test metrics through
RecBole's full-ranking evaluator, plus the within-candidates NDCG@10 of each ranking.

    python benchmarks/mllm4rec.py ml-100k-posters:none hm:description beauty:generated \\
        [--data_path dataset/] [--preset mllm4rec-cpu] [--set ranker_model=smollm2] \\
        [--set beauty:key=value] [--sensitivity ml-100k-posters] [--candidates 5 10 20]
    python benchmarks/mllm4rec.py --smoke          # the generated fixture, tiny settings (a test runs it)

Each dataset is ``name:caption_source`` (``none``: the "with captions" row is left out). The retriever
(LRURec, ``--preset``'s ``retriever_config``) is trained once per dataset and handed to every row as
``retriever_checkpoint``; rows run at n_candidates 20 and, on ``--sensitivity``, also at 5 and 10
(MLLM4Rec Fig. 4). "Within-candidates NDCG@10" is NDCG@min(10, k) / Recall@k of the full ranking:
the ranked candidates fill the top k, so this is the NDCG@10 of the answer among the k candidates
over the users whose answer is a candidate (the retriever row: in the retriever's order). Results
go to ``--out`` (default benchmarks/results/mllm4rec{_TAG}.{json,md}). Every finished run is kept in
``<out>/<stem>_runs.json`` keyed by its model, dataset and settings, so a rerun of an interrupted
table skips what is done (the retriever checkpoint it names must still exist). Each row records its
wall time and the machine's load (``/proc/loadavg`` before -> after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = {"beauty": "beauty product", "ml-100k": "movie", "ml-100k-posters": "movie", "ml-1m": "movie",
           "hm": "fashion item"}
METRICS = ["ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@10"]
SMOKE = {"MAX_ITEM_LIST_LENGTH": 10, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
         "epochs": 1, "train_batch_size": 64, "eval_batch_size": 256, "hidden_size": 16,
         "retriever_config": {"epochs": 1, "hidden_size": 16, "train_batch_size": 64},
         "ranker_model": "small", "ranker_small": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
         "max_history_items": 4, "attr_max_tokens": 16, "ranker_train_examples": 8, "ranker_valid_users": 4,
         "ranker_batch_size": 2, "ranker_grad_accum": 1, "ranker_eval_batch_size": 8, "ranker_warmup_steps": 1,
         "ranker_valid_every": 4, "ranker_patience": 1, "image_min_pixels": 784, "image_max_pixels": 784}


def within_candidates_ndcg10(result: dict, k: int) -> float:
    """NDCG@10 of the answer among the k candidates, over users whose answer is one of them."""
    recall = result[f"recall@{k}"]
    return result[f"ndcg@{min(10, k)}"] / recall if recall else 0.0


RUNS_FILE: str | None = None  # set by main(): the finished runs of this table


def run(model: str, dataset: str, config: dict) -> dict:
    from recbole_mm.bench import loadavg
    from recbole_mm.files import write_json
    from recbole_mm.quick_start import run_recbole_mm

    key = json.dumps([model, dataset, config], sort_keys=True, default=str)
    done = {}
    if RUNS_FILE and os.path.isfile(RUNS_FILE):
        with open(RUNS_FILE, encoding="utf-8") as f:
            done = json.load(f)
    if key in done and os.path.exists(done[key].get("saved_model_file") or ROOT):
        print(f"reusing the finished run {model} on {dataset}", flush=True)
        return done[key]
    load_before, started = loadavg(), time.perf_counter()
    result = run_recbole_mm(model, dataset, config_dict=config)
    result.pop("test_per_user", None)
    result["bench_wall_s"] = time.perf_counter() - started
    result["bench_load"] = f"{load_before} -> {loadavg()}"
    if RUNS_FILE:
        done[key] = json.loads(json.dumps(result, default=str))
        write_json(RUNS_FILE, done)
    return result


def preset_settings(name: str | None) -> dict:
    if not name:
        return {}
    from recbole_mm.config import load_yaml_file, resolve_config_file

    return load_yaml_file(resolve_config_file(name)) or {}


def bench_dataset(dataset: str, source: str, ks: list[int], base: dict, with_prime: bool = True) -> dict:
    """Every row of one dataset; returns ``{"rows": [...], "retriever_checkpoint": path}``."""
    topk = sorted({5, 10, *ks})
    common = {**base, "topk": topk, "prompt_domain": DOMAINS.get(dataset, "item"), "show_progress": False}
    retriever = {**{k: v for k, v in common.items() if k != "retriever_config"}, **(base.get("retriever_config") or {}),
                 "valid_metric": f"Recall@{max(ks)}", "metrics": ["Recall", "NDCG", "MRR"]}
    lru = run("LRURec", dataset, retriever)
    ckpt = lru["saved_model_file"]
    rows = []
    for k in ks:
        shared = {**common, "n_candidates": k, "retriever_checkpoint": ckpt}
        variants = []
        if source != "none":
            variants.append(("MLLM4Rec", f"MLLM4Rec, captions = {source}", {"caption_source": source}))
        variants.append(("MLLM4Rec", "MLLM4Rec, titles only (captions none)", {"caption_source": "none"}))
        if with_prime:
            variants.append(("PRIME", "PRIME text prompt (JSON, no image), no stage 3",
                             {"prompt_variant": "no_image", "preference_optimization": False}))
        retriever_row = None
        for model, label, extra in variants:
            result = run(model, dataset, {**shared, **extra})
            if retriever_row is None:
                retriever_row = {"dataset": dataset, "k": k, "ranking": "LRURec alone",
                                 "test": dict(result["retriever_test_result"])}
                rows.append(retriever_row)
            rows.append({"dataset": dataset, "k": k, "ranking": label, "test": dict(result["test_result"]),
                         "wall_s": result["bench_wall_s"], "load": result["bench_load"],
                         "ranked_users": result["stages"].get("evaluate_test", {}).get("ranked_users")})
        for row in rows:
            if row["k"] == k:
                row["within_candidates_ndcg@10"] = within_candidates_ndcg10(row["test"], k)
    return {"rows": rows, "retriever_checkpoint": ckpt, "retriever_test": dict(lru["test_result"])}


def table(results: dict, header: list[str]) -> str:
    lines = [*header, "", "| dataset | k | ranking | " + " | ".join(METRICS)
             + " | within-cand. NDCG@10 | wall (s) | load before -> after |",
             "|---|---|---|" + "---|" * (len(METRICS) + 3)]
    for dataset, res in results.items():
        for r in res["rows"]:
            wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "(in the rows after it)"
            lines.append(f"| {dataset} | {r['k']} | {r['ranking']} | "
                         + " | ".join(f"{r['test'][m]:.4f}" for m in METRICS)
                         + f" | {r['within_candidates_ndcg@10']:.4f} | {wall} | {r.get('load', '')} |")
    return "\n".join(lines) + "\n"


def smoke_dataset(root: str) -> tuple[str, str]:
    """The generated fixture with a caption cache for half its items (the others: titles alone)."""
    from recbole_mm.data.fixtures import FixtureSpec, make_fixture
    from recbole_mm.lmm.describer import DescriptionCache

    make_fixture(root, "mmfix", FixtureSpec(n_users=50, n_items=30, min_len=5, max_len=14, seed=1))
    DescriptionCache(os.path.join(root, "mmfix"), "mmfix", tag="captions").append(
        [{"item_id": f"i{i:04d}", "caption": f"a {'red' if i % 2 else 'blue'} shape number {i}"} for i in range(0, 30, 2)])
    return root, "mmfix"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", help="name:caption_source (generated | none | <item field>)")
    parser.add_argument("--data_path", default="dataset/")
    parser.add_argument("--preset", default="mllm4rec-cpu", help="shipped preset or yaml file under every run")
    parser.add_argument("--set", action="append", default=[], help="key=value (all datasets) or dataset:key=value")
    parser.add_argument("--sensitivity", default=None, help="dataset also run at n_candidates 5 and 10")
    parser.add_argument("--candidates", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--smoke", action="store_true", help="the generated fixture, tiny settings, k 3 and 6")
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. smollm2")
    parser.add_argument("--no_prime", action="store_true", help="leave out the PRIME text-prompt rows")
    args = parser.parse_args(argv)
    global RUNS_FILE
    scratch = None
    base = preset_settings(args.preset)
    if args.smoke:
        scratch = tempfile.mkdtemp(prefix="mllm4rec-smoke-")
        data_path, name = smoke_dataset(os.path.join(scratch, "data"))
        args.datasets, args.sensitivity, args.candidates = [f"{name}:generated"], name, [3, 6]
        base = {**SMOKE, "data_path": data_path, "artifacts_dir": os.path.join(scratch, "artifacts"),
                "checkpoint_dir": os.path.join(scratch, "saved"), "log_wandb": False}
    else:
        base["data_path"] = args.data_path
    per_dataset: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        scope, _, key = key.rpartition(":")
        per_dataset.setdefault(scope, {})[key] = yaml.safe_load(value)
    if not args.datasets:
        parser.error("give datasets as name:caption_source, or --smoke")
    stem = ("mllm4rec_smoke" if args.smoke else "mllm4rec") + (f"_{args.tag}" if args.tag else "")
    os.makedirs(args.out, exist_ok=True)
    RUNS_FILE = os.path.join(args.out, f"{stem}_runs.json")
    results = {}
    for spec in args.datasets:
        dataset, _, source = spec.partition(":")
        ks = sorted(set(args.candidates)) if dataset == args.sensitivity else [max(args.candidates)]
        config = {**base, **per_dataset.get("", {}), **per_dataset.get(dataset, {})}
        results[dataset] = bench_dataset(dataset, source or "none", ks, config, with_prime=not args.no_prime)
    header = ["# MLLM4Rec vs LRURec and PRIME's text prompt (one retriever checkpoint per dataset)", "",
              "Made by `python benchmarks/mllm4rec.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`. "
              "Test metrics, full ranking over all items (RecBole's evaluator). Backbone: "
              f"`{config.get('ranker_model', 'see MLLM4Rec.yaml')}`; preset `{args.preset}`; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. 'wall' is the whole run (retriever "
              "checkpoint loaded, ranker stage, validation and test evaluation)."]
    with open(os.path.join(args.out, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    text = table(results, header)
    with open(os.path.join(args.out, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    if scratch:  # the fixture, checkpoints and adapters of a smoke run
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
