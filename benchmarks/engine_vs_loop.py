"""PRIME stages 2 and 3 through their public trainer classes: per-step losses, validation curves, wall time.

    OMP_NUM_THREADS=1 PYTHONPATH=<tree> python benchmarks/engine_vs_loop.py --out results.json \
        [--dataset ml-100k] [--config_files prime-cpu] [--artifacts saved/engine-bench] [--stages 2,3]
    python benchmarks/engine_vs_loop.py --report loop*.json engine*.json   # benchmarks/results/engine_vs_loop.md

Runs against whichever recbole_mm is first on ``PYTHONPATH`` (today's hand-written loops in
``trainer/ranker.py`` or the engine in ``trainer/ranker_training.py``), so the same script measures
both. Stage 1 (the retriever) is trained once into ``--artifacts`` and reused by every later run
(its key does not depend on the trainer code); stages 2 and 3 always train, into a fresh folder.
The per-step loss is the mean over the optimizer step's micro-batches, read from the ranker's
``loss`` calls (stage 2) and from the tracker (stage 3), identically for both codes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Recorder:
    """A StageTracker stand-in: every (step, scalars) call."""

    def __init__(self):
        self.calls = []

    def log(self, step, **scalars):
        self.calls.append({"step": int(step), **{k: float(v) for k, v in scalars.items()
                                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}})


def measure(args) -> dict:
    import torch
    from recbole.utils import init_seed

    import recbole_mm
    from recbole_mm.config import Config
    from recbole_mm.utils import get_trainer, rebuild_data_and_model

    try:
        from recbole_mm.trainer.ranker_training import RankerTrainer
        code = "engine"
    except ImportError:
        from recbole_mm.trainer.ranker import RankerTrainer
        code = "loop"
    if args.loop_schedule:
        if code != "engine":
            raise SystemExit("--loop_schedule is for the engine")
        import math

        from recbole_mm.trainer import engine

        def loop_schedule(optimizer, name, warmup, total):
            """The loops' factors (warmup from lr/warmup, not 0), to isolate the schedule's share."""
            def factor(step):
                if step < warmup:
                    return (step + 1) / warmup
                if name == "cosine":
                    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
                return max(0.0, (total - step) / max(1, total - warmup))
            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

        engine.make_schedule = loop_schedule
        code = "engine+loop_schedule"
    from recbole_mm.trainer.preference import PreferenceTrainer

    config = Config(model="PRIME", dataset=args.dataset, config_file_list=[args.config_files],
                    config_dict={"artifacts_dir": args.artifacts, "show_progress": False, "seed": args.seed,
                                 "checkpoint_dir": os.path.join(args.artifacts, "saved")})
    model, _, train_data, valid_data, _ = rebuild_data_and_model(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.train_retriever()
    out = {"code": code, "package": os.path.dirname(recbole_mm.__file__), "dataset": args.dataset,
           "config_files": args.config_files, "seed": args.seed, "threads": torch.get_num_threads(),
           "loadavg_before": open("/proc/loadavg").read().split()[:3]}
    work = tempfile.mkdtemp(prefix="engine-bench-", dir=args.artifacts)
    try:
        ranker = trainer.build_ranker(train_data._dataset)
        train, valid = trainer.training_examples(train_data, valid_data), trainer.validation_examples(valid_data)
        micro = []
        real_loss = ranker.loss

        def recording_loss(histories, candidates, answer_pos):
            loss = real_loss(histories, candidates, answer_pos)
            micro.append((len(histories), float(loss.detach())))
            return loss

        ranker.loss = recording_loss
        tracker = Recorder()
        rt = RankerTrainer(ranker, config, os.path.join(work, "ranker"), tracker=tracker)
        os.makedirs(os.path.join(work, "ranker"), exist_ok=True)
        init_seed(config["seed"], config["reproducibility"])  # as PRIMETrainer.train_ranker
        started = time.perf_counter()
        best = rt.fit(train, valid, seed=config["seed"])
        wall = time.perf_counter() - started
        per_step = config["ranker_batch_size"] * config["ranker_grad_accum"]
        losses, i = [], 0
        while i < len(micro):  # group micro-batches into optimizer steps by example count
            n, taken = 0, []
            while i < len(micro) and n < per_step:
                taken.append(micro[i])
                n += micro[i][0]
                i += 1
            losses.append(sum(k * v for k, v in taken) / n)
        n_valid_calls = sum(1 for c in tracker.calls if "valid_ndcg@10" in c)
        out["stage2"] = {"wall_s": wall, "best_valid_ndcg@10": best, "optimizer_steps": len(losses),
                         "train_prompts": len(train), "valid_users": len(valid), "validations": n_valid_calls,
                         "step_loss": losses, "lr": [c["lr"] for c in tracker.calls if "lr" in c],
                         "history": rt.history}
        print(f"[engine-bench] {code} stage 2: {len(losses)} steps, {wall:.1f} s, best {best:.4f}", flush=True)
        if 3 in args.stages:
            ranker.loss = real_loss
            ranker.model.eval()
            trainer.model.ranker = ranker
            init_seed(config["seed"], config["reproducibility"])  # as PRIMETrainer.optimize_retriever
            tracker3 = Recorder()
            pt = PreferenceTrainer(trainer.model, config, os.path.join(work, "preference"),
                                   validate=lambda: trainer.preference_validation(valid_data), tracker=tracker3)
            os.makedirs(os.path.join(work, "preference"), exist_ok=True)
            started = time.perf_counter()
            info = pt.fit(train_data._dataset, trainer.device)
            wall3 = time.perf_counter() - started
            out["stage3"] = {"wall_s": wall3, "best_valid_score": info["best_valid_score"], "steps": info["steps"],
                             "total_steps": info["total_steps"], "pairs": info["pairs"],
                             "ranker_prompts": info["ranker_prompts"],
                             "step_loss": [c["loss"] for c in tracker3.calls if "loss" in c],
                             "history": info["history"]}
            print(f"[engine-bench] {code} stage 3: {info['steps']} steps, {wall3:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    return out


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def report(files: list[str], target: str) -> None:
    """The table of ``files`` (JSONs of this script): per code, the median wall times over its runs,
    and the per-step losses and validation curves of each code's first run side by side."""
    runs: dict[str, list[dict]] = {}
    for name in files:
        with open(name, encoding="utf-8") as f:
            result = json.load(f)
        runs.setdefault(result["code"], []).append(result)
    codes = list(runs)
    first = {c: runs[c][0] for c in codes}
    base = first[codes[0]]
    lines = ["# Training engine vs the hand-written loops (PRIME stages 2 and 3)", "",
             f"Made by `benchmarks/engine_vs_loop.py` on `{base['dataset']}` with `--config_files={base['config_files']}` "
             f"(small local ranker), seed {base['seed']}, `OMP_NUM_THREADS=1`, {base['threads']} torch thread(s); "
             "stage 1 trained once and reused by every run, stages 2 and 3 trained by the public classes "
             "(`RankerTrainer.fit`, `PreferenceTrainer.fit`) as `PRIMETrainer` calls them. `loop`: the code before "
             "issue 13 (a read-only worktree of main); `engine`: transformers' Trainer; `engine+loop_schedule`: the "
             "engine with the loops' learning-rate factors patched in (`--loop_schedule`), to separate the "
             "schedule's share of any difference from the rest of the machinery. Runs one after another on the "
             "same shared 2-core machine; wall times are medians over the runs listed.", ""]
    lines += ["| | " + " | ".join(codes) + " |", "|---" * (len(codes) + 1) + "|"]
    lines.append("| runs | " + " | ".join(str(len(runs[c])) for c in codes) + " |")
    for stage in ("stage2", "stage3"):
        if all(stage in first[c] for c in codes):
            walls = {c: _median([r[stage]["wall_s"] for r in runs[c]]) for c in codes}
            lines.append(f"| {stage} wall, median (s) | " + " | ".join(
                f"{walls[c]:.1f}" + (f" ({walls[c] / walls[codes[0]]:.3f}x)" if c != codes[0] else "")
                for c in codes) + " |")
            lines.append(f"| {stage} wall, each run (s) | " + " | ".join(
                ", ".join(f"{r[stage]['wall_s']:.1f}" for r in runs[c]) for c in codes) + " |")
    lines.append("| stage2 optimizer steps (of total) | " + " | ".join(
        f"{first[c]['stage2']['optimizer_steps']}" for c in codes) + " |")
    lines.append("| stage2 best valid NDCG@10 | " + " | ".join(
        f"{first[c]['stage2']['best_valid_ndcg@10']:.4f}" for c in codes) + " |")
    if all("stage3" in first[c] for c in codes):
        lines.append("| stage3 steps (of total) | " + " | ".join(
            f"{first[c]['stage3']['steps']}/{first[c]['stage3']['total_steps']}" for c in codes) + " |")
        lines.append("| stage3 best valid NDCG@10 | " + " | ".join(
            f"{first[c]['stage3']['best_valid_score']:.4f}" for c in codes) + " |")
    lines += ["", "Load average (1/5/15 min) before -> after each run: " + "; ".join(
        f"{c}: " + ", ".join(f"{' '.join(r['loadavg_before'])} -> {' '.join(r['loadavg_after'])}" for r in runs[c])
        for c in codes) + ".", ""]

    def cell(xs, j, fmt="{:.4f}"):
        return fmt.format(xs[j]) if j < len(xs) else "—"

    lines += ["## Stage 2: loss per optimizer step (mean over its micro-batches) and learning rate", "",
              "| step | " + " | ".join(f"{c} loss" for c in codes) + " | " + " | ".join(f"{c} lr" for c in codes) + " |",
              "|---" * (2 * len(codes) + 1) + "|"]
    n = max(len(first[c]["stage2"]["step_loss"]) for c in codes)
    for i in range(n):
        lines.append(f"| {i + 1} | " + " | ".join(cell(first[c]["stage2"]["step_loss"], i) for c in codes) + " | "
                     + " | ".join(cell(first[c]["stage2"]["lr"], i, "{:.2e}") for c in codes) + " |")
    lines += ["", "## Stage 2: validation NDCG@10 (step 0 = before training)", "",
              "| step | " + " | ".join(codes) + " |", "|---" * (len(codes) + 1) + "|"]
    curves = {c: {h["step"]: h["valid_ndcg@10"] for h in first[c]["stage2"]["history"]} for c in codes}
    for step in sorted(set().union(*curves.values())):
        lines.append(f"| {step} | " + " | ".join(
            f"{curves[c][step]:.4f}" if step in curves[c] else "—" for c in codes) + " |")
    if all("stage3" in first[c] for c in codes):
        lines += ["", "## Stage 3: loss per step", "", "| step | " + " | ".join(codes) + " |",
                  "|---" * (len(codes) + 1) + "|"]
        n = max(len(first[c]["stage3"]["step_loss"]) for c in codes)
        for i in range(n):
            lines.append(f"| {i + 1} | " + " | ".join(cell(first[c]["stage3"]["step_loss"], i, "{:.5f}")
                                                     for c in codes) + " |")
        lines += ["", "## Stage 3: validation, two-stage NDCG@10 (step 0 = before)", "",
                  "| step | " + " | ".join(codes) + " |", "|---" * (len(codes) + 1) + "|"]
        curves = {c: {h["step"]: h["score"] for h in first[c]["stage3"]["history"]} for c in codes}
        for step in sorted(set().union(*curves.values())):
            lines.append(f"| {step} | " + " | ".join(
                f"{curves[c][step]:.4f}" if step in curves[c] else "—" for c in codes) + " |")
    with open(target, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"[engine-bench] wrote {target}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default="prime-cpu")
    parser.add_argument("--artifacts", default=os.path.join(ROOT, "saved", "engine-bench"))
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--loop_schedule", action="store_true",
                        help="engine only: replace transformers' schedule by the loops' (warmup from lr/warmup)")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="JSONs of earlier runs (loop first)")
    parser.add_argument("--target", default=os.path.join(ROOT, "benchmarks", "results", "engine_vs_loop.md"))
    args = parser.parse_args()
    if args.report:
        report(args.report, args.target)
        return 0
    args.stages = {int(s) for s in args.stages.split(",")}
    os.makedirs(args.artifacts, exist_ok=True)
    result = measure(args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
