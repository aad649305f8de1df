"""What a pretrained ranker buys: SmolLM2-135M-Instruct vs the retriever's own order (ml-100k, Beauty).

    python benchmarks/smollm_ranker.py --row retriever            # stage 1 (shared by every row)
    python benchmarks/smollm_ranker.py --row zeroshot
    python benchmarks/smollm_ranker.py --row lora --lr 5e-4       # LoRA on N training prompts
    python benchmarks/smollm_ranker.py --row small --lr 1e-3      # today's small random model, same prompts
    python benchmarks/smollm_ranker.py --row lora --lr 1e-3 --set ranker_min_history=4 --tag minhist4
    python benchmarks/smollm_ranker.py --report                   # benchmarks/results/smollm_ranker.md
    python benchmarks/smollm_ranker.py --dataset beauty --data_path dataset --users 1000 --row retriever   # etc.

Every row uses PRIME with the prime-smollm preset on RecBole's bundled ml-100k (text only; or
``--dataset``, e.g. the prepared Beauty: results ``smollm_ranker_<dataset>_*``), the same
retriever checkpoint (stage 1 is keyed by its settings and reused), and the same fixed random sample
of test users (``--users``, drawn with the config's seed). For each user the retriever's top-k
(``n_candidates``) are the candidates; a row reorders them (the retriever row keeps its own order).
Two-stage NDCG@10 / Recall@10 / MRR@10 count a user whose answer is not a candidate as 0 (for
cutoffs <= k this equals full ranking); "within candidates" is NDCG@10 of the answer among the
candidates on the users whose answer is a candidate: the difference to the retriever row is what
the ranker adds. Standard errors are over users. Each row writes
benchmarks/results/smollm_ranker_<row>.json; rows can run in parallel once the retriever exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SMALL = {"ranker_model": "small", "ranker_small": {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                                  "vocab_size": 2000}}


def rank_metrics(rank: torch.Tensor, k: int = 10) -> dict:
    """Per-user NDCG@k, Recall@k, MRR@k from the answer's 0-based rank (-1: not a candidate)."""
    inside = (rank >= 0) & (rank < k)
    r = rank.clamp(min=0).float()
    return {f"ndcg@{k}": torch.where(inside, 1.0 / torch.log2(r + 2), torch.zeros_like(r)),
            f"recall@{k}": inside.float(),
            f"mrr@{k}": torch.where(inside, 1.0 / (r + 1), torch.zeros_like(r))}


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def summarize(rank: torch.Tensor) -> dict:
    """Two-stage metrics over all sampled users and NDCG@10 within the candidates on the hit users."""
    out = {}
    for name, values in rank_metrics(rank).items():
        out[name], out[name + "_se"] = mean_se(values)
    hits = rank >= 0
    out["within_ndcg@10"], out["within_ndcg@10_se"] = mean_se(rank_metrics(rank[hits])["ndcg@10"])
    out["users"], out["hit_users"] = len(rank), int(hits.sum())
    return out


DOMAINS = {"ml-100k": "movie", "ml-100k-posters": "movie", "ml-1m-llamarec": "movie", "beauty": "beauty product"}


def setup(overrides: dict, dataset: str = "ml-100k", data_path: str | None = None):
    from recbole.utils import init_seed

    from recbole_mm.config import Config
    from recbole_mm.utils import create_dataset, data_preparation, get_model, get_trainer

    config_dict = {"state": "INFO", "artifacts_dir": os.path.join(ROOT, "saved", "smollm-bench"),
                   "show_progress": False, **({"prompt_domain": DOMAINS[dataset]} if dataset in DOMAINS else {}),
                   **({"data_path": os.path.abspath(data_path)} if data_path else {}), **overrides}
    config = Config("PRIME", dataset, config_file_list=["prime-smollm"], config_dict=config_dict)
    init_seed(config["seed"], True)
    from recbole.utils import init_logger

    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model("PRIME")(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "PRIME")(config, model)
    trainer.train_retriever()
    return config, trainer, train_data, valid_data, test_data


@torch.no_grad()
def ranker_ranks(ranker, examples, batch_size: int) -> tuple[torch.Tensor, float]:
    """0-based rank of the answer among the candidates after reranking (-1: not a candidate), and
    the median seconds per scored prompt."""
    ranker.model.eval()
    rank = torch.full_like(examples.answer_pos, -1)
    hits = torch.nonzero(examples.answer_pos >= 0).squeeze(1)
    per_prompt = []
    for start in range(0, len(hits), batch_size):
        idx = hits[start:start + batch_size]
        part = examples.subset(idx)
        t = time.perf_counter()
        scores = ranker.score(part.histories, part.candidates).cpu()
        per_prompt.append((time.perf_counter() - t) / len(idx))
        answer = scores.gather(1, part.answer_pos.unsqueeze(1))
        rank[idx] = (scores > answer).sum(1)
        print(f"[smollm-bench] scored {min(start + batch_size, len(hits))}/{len(hits)} hit users", flush=True)
    per_prompt.sort()
    return rank, per_prompt[len(per_prompt) // 2] if per_prompt else float("nan")


def parse_set(items: list[str]) -> dict:
    """``key=value`` settings (values read as YAML: numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set ranker_min_history=4")
        out[key] = yaml.safe_load(value)
    return out


def run_row(args) -> dict:
    overrides = {}
    if args.row == "small":
        overrides.update(SMALL)
    if args.lr is not None:
        overrides["ranker_learning_rate"] = args.lr
    if args.prompts is not None:
        overrides["ranker_train_examples"] = args.prompts
    overrides.update(parse_set(args.set))
    started = time.perf_counter()
    config, trainer, train_data, valid_data, test_data = setup(overrides, args.dataset, args.data_path)
    examples = trainer.validation_examples(test_data, users=args.users)
    row = {"row": args.row, "ranker_model": config["ranker_model"], "n_candidates": config["n_candidates"],
           "max_history_items": config["max_history_items"], "load": open("/proc/loadavg").read().split()[:3],
           "threads": torch.get_num_threads()}
    if args.row == "retriever":
        rank = examples.answer_pos.clone()   # candidates are in the retriever's order
    elif args.row == "zeroshot":
        t = time.perf_counter()
        ranker = trainer.build_ranker(train_data._dataset)
        row["load_s"] = time.perf_counter() - t
        rank, row["score_s_per_prompt"] = ranker_ranks(ranker, examples, config["ranker_eval_batch_size"])
    else:
        trainer.train_ranker(train_data, valid_data)
        info = trainer.stages.done("ranker", trainer.ranker_key)
        row.update(learning_rate=config["ranker_learning_rate"], train_prompts=info.get("train_prompts"),
                   valid_users=info.get("valid_users"), history=info.get("history"),
                   best_valid=info.get("best_valid_ndcg@10_sample"),
                   ranker_stage_s=trainer.stage_log["ranker"]["wall_s"],
                   reused=bool(info.get("reused") or trainer.stage_log["ranker"].get("reused")))
        rank, row["score_s_per_prompt"] = ranker_ranks(trainer.model.ranker, examples, config["ranker_eval_batch_size"])
    row.update(summarize(rank))
    row["wall_s"] = time.perf_counter() - started
    name = args.row + (f"_lr{args.lr:g}" if args.lr is not None and args.row == "lora" else "")
    name += f"_{args.tag}" if args.tag else ""
    row.update(name=name, tag=args.tag, settings=parse_set(args.set), dataset=args.dataset)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{_stem(args.dataset)}_{name}.json"), "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
    print(json.dumps({k: v for k, v in row.items() if k != "history"}, indent=1))
    return row


DATASET_NOTES = {"ml-100k": "RecBole's bundled ml-100k",
                 "beauty": "Amazon Beauty (`recbole-mm-data prepare beauty`: titles, brands, categories)"}
LABELS = {"retriever": "retriever alone (LRURec order)", "zeroshot": "SmolLM2 zero-shot",
          "small": "small random model + training"}


def _stem(dataset: str) -> str:
    """Start of a dataset's result files: ml-100k's keep their first names, others carry the dataset's."""
    return "smollm_ranker" if dataset == "ml-100k" else f"smollm_ranker_{dataset}"


def _label(r: dict) -> str:
    label = LABELS.get(r["row"], f"SmolLM2 + LoRA (lr {r.get('learning_rate')})")
    if r.get("settings"):
        label += ", " + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
    return label


def _best_validation(r: dict) -> dict | None:
    hist = r.get("history") or []
    return max(hist, key=lambda h: h["valid_ndcg@10"]) if hist else None


def report(dataset: str = "ml-100k") -> None:
    rows = []
    for name in sorted(os.listdir(RESULTS)):
        if name.startswith("smollm_ranker_") and name.endswith(".json"):
            with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
                row = json.load(f)
            if row.get("dataset", "ml-100k") == dataset:
                rows.append(row)
    order = {"retriever": 0, "zeroshot": 1, "lora": 2, "small": 3}
    rows.sort(key=lambda r: (order.get(r["row"], 9), r.get("learning_rate") or 0, r.get("tag") or ""))
    tagged = [r for r in rows if r.get("tag")]
    rows = [r for r in rows if not r.get("tag")]
    base = next((r for r in rows if r["row"] == "retriever"), None)
    lines = [f"# SmolLM2-135M-Instruct as PRIME's ranker on {dataset} (CPU)", "",
             "Made by `benchmarks/smollm_ranker.py` (one process per row, then `--report`); preset "
             f"`prime-smollm`, {DATASET_NOTES.get(dataset, dataset)}, text-only prompts, same LRURec checkpoint for every row, "
             f"the same {base['users'] if base else '?'} test users (fixed random sample). Two-stage metrics count "
             "users whose answer is not among the candidates as 0; 'within candidates' is NDCG@10 among the "
             "candidates on the users whose answer is one of them (the ranker's own contribution). "
             "± = standard error over users.", "",
             "| row | backbone | NDCG@10 | Recall@10 | MRR@10 | within candidates NDCG@10 | hit users | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = _label(r)
        notes = []
        if "train_prompts" in r and r["train_prompts"] is not None:
            notes.append(f"{r['train_prompts']} training prompts, ranker stage {r['ranker_stage_s']:.0f} s "
                         f"({r['ranker_stage_s'] / max(1, r['train_prompts']):.1f} s/prompt incl. validation)")
            best = _best_validation(r)
            if best is not None:
                notes.append(f"best validation at step {best['step']}")
        if "score_s_per_prompt" in r:
            notes.append(f"{r['score_s_per_prompt']:.2f} s/prompt scoring")
        notes.append(f"load {' '.join(r['load'])}")
        backbone = "none (LRURec)" if r["row"] == "retriever" else r["ranker_model"]
        lines.append(f"| {label} | {backbone} | {r['ndcg@10']:.4f} ± {r['ndcg@10_se']:.4f} | "
                     f"{r['recall@10']:.4f} ± {r['recall@10_se']:.4f} | {r['mrr@10']:.4f} ± {r['mrr@10_se']:.4f} | "
                     f"{r['within_ndcg@10']:.4f} ± {r['within_ndcg@10_se']:.4f} | {r['hit_users']}/{r['users']} | "
                     f"{'; '.join(notes)} |")
    if base:
        k = base["n_candidates"]
        uniform = sum(1 / math.log2(r + 2) for r in range(min(10, k))) / k
        lines += ["", f"Reference: a uniformly random order of the {k} candidates has expected within-candidates "
                  f"NDCG@10 {uniform:.4f}."]
    if tagged:  # rows made with --tag: a later run, its own retriever row; compared within this table only
        lines += ["", "Rows made with `--tag` (a later run with the retriever of that day; compare them with each "
                  "other, not with the table above):", "",
                  "| row | tag | NDCG@10 | Recall@10 | within candidates NDCG@10 | hit users | train prompts | "
                  "best validation NDCG@10 (step 0 = before training) | ranker stage s | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tagged:
            best = _best_validation(r)
            lines.append(f"| {_label(r)} | {r['tag']} | {r['ndcg@10']:.4f} ± {r['ndcg@10_se']:.4f} | "
                         f"{r['recall@10']:.4f} | {r['within_ndcg@10']:.4f} ± {r['within_ndcg@10_se']:.4f} | "
                         f"{r['hit_users']}/{r['users']} | {r.get('train_prompts') or '-'} | "
                         + (f"{best['valid_ndcg@10']:.4f} (step {best['step']})" if best else "-") + " | "
                         + (f"{r['ranker_stage_s']:.0f}" if r.get("ranker_stage_s") else "-") + f" | {' '.join(r['load'])} |")
    curves = [r for r in rows + tagged if r.get("history")]
    if curves:
        lines += ["", "Validation curves of stage 2 (NDCG@10 on the preset's validation users, retriever "
                  "top-k as candidates; step 0 = before training):", ""]
        for r in curves:
            lines.append(f"- {LABELS.get(r['row'], 'SmolLM2 + LoRA lr ' + str(r.get('learning_rate')))}"
                         f"{' (' + r['tag'] + ')' if r.get('tag') else ''}: " +
                         ", ".join(f"step {h['step']}: {h['valid_ndcg@10']:.4f}"
                                   + (f" (loss {h['loss']:.3f})" if 'loss' in h else "") for h in r["history"]))
    with open(os.path.join(RESULTS, f"{_stem(dataset)}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", choices=("retriever", "zeroshot", "lora", "small"))
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="training prompts (default: the preset's)")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--set", action="append", default=[], help="key=value for the row's config (repeatable)")
    parser.add_argument("--tag", default=None, help="suffix of the row's result file (rows that differ by --set)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None, help="folder holding the dataset's folder (~: the project's default)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.row:
        run_row(args)
    if args.report:
        report(args.dataset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
