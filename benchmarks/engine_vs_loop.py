"""PRIME stages 2 and 3 through their public trainer classes: per-step losses, validation curves, wall time.

    OMP_NUM_THREADS=1 PYTHONPATH=<tree> python benchmarks/engine_vs_loop.py --out results.json \
        [--dataset ml-100k] [--config_files prime-cpu] [--artifacts saved/engine-bench] [--stages 2,3]
    python benchmarks/engine_vs_loop.py --report old.json new.json   # benchmarks/results/engine_vs_loop.md

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
            n, total, taken = 0, 0.0, []
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


def report(old_file: str, new_file: str, target: str) -> None:
    with open(old_file, encoding="utf-8") as f:
        old = json.load(f)
    with open(new_file, encoding="utf-8") as f:
        new = json.load(f)
    lines = ["# Training engine vs the hand-written loops (PRIME stages 2 and 3)", "",
             f"Made by `benchmarks/engine_vs_loop.py` on `{old['dataset']}` with `--config_files={old['config_files']}` "
             f"(small local ranker), seed {old['seed']}, `OMP_NUM_THREADS=1`, {old['threads']} torch thread(s); "
             "stage 1 trained once and reused by both runs. `loop`: the code before issue 13 "
             f"(`{old['package']}`); `engine`: transformers' Trainer (`{new['package']}`). The two ran one "
             "after the other on the same machine.", ""]
    lines += ["| | loop | engine | engine / loop |", "|---|---|---|---|"]
    for stage, wall_key in (("stage2", "wall_s"), ("stage3", "wall_s")):
        if stage in old and stage in new:
            a, b = old[stage][wall_key], new[stage][wall_key]
            lines.append(f"| {stage} wall (s) | {a:.1f} | {b:.1f} | {b / a:.3f} |")
    s2o, s2n = old["stage2"], new["stage2"]
    lines.append(f"| stage2 optimizer steps | {s2o['optimizer_steps']} | {s2n['optimizer_steps']} | |")
    lines.append(f"| stage2 best valid NDCG@10 | {s2o['best_valid_ndcg@10']:.4f} | {s2n['best_valid_ndcg@10']:.4f} | |")
    if "stage3" in old and "stage3" in new:
        lines.append(f"| stage3 steps | {old['stage3']['steps']} | {new['stage3']['steps']} | |")
        lines.append(f"| stage3 best valid NDCG@10 | {old['stage3']['best_valid_score']:.4f} | "
                     f"{new['stage3']['best_valid_score']:.4f} | |")
    lines += ["", f"Load average (1/5/15 min) before / after: loop {old['loadavg_before']} / {old['loadavg_after']}, "
              f"engine {new['loadavg_before']} / {new['loadavg_after']}.", ""]
    lines += ["## Stage 2: loss per optimizer step (mean over its micro-batches)", "",
              "| step | loop loss | engine loss | loop lr | engine lr |", "|---|---|---|---|---|"]
    lo, ln = s2o["step_loss"], s2n["step_loss"]
    for i in range(max(len(lo), len(ln))):
        cell = lambda xs, j, f="{:.4f}": f.format(xs[j]) if j < len(xs) else "—"  # noqa: E731
        lines.append(f"| {i + 1} | {cell(lo, i)} | {cell(ln, i)} | {cell(s2o['lr'], i, '{:.2e}')} | "
                     f"{cell(s2n['lr'], i, '{:.2e}')} |")
    lines += ["", "## Stage 2: validation NDCG@10", "", "| step | loop | engine |", "|---|---|---|"]
    vo = {h["step"]: h["valid_ndcg@10"] for h in s2o["history"]}
    vn = {h["step"]: h["valid_ndcg@10"] for h in s2n["history"]}
    for step in sorted(set(vo) | set(vn)):
        lines.append(f"| {step} | {vo.get(step, float('nan')):.4f} | {vn.get(step, float('nan')):.4f} |")
    if "stage3" in old and "stage3" in new:
        lines += ["", "## Stage 3: loss per step and validation (two-stage NDCG@10)", "",
                  "| step | loop loss | engine loss |", "|---|---|---|"]
        a, b = old["stage3"]["step_loss"], new["stage3"]["step_loss"]
        for i in range(max(len(a), len(b))):
            lines.append(f"| {i + 1} | {a[i]:.5f} | {b[i]:.5f} |" if i < len(a) and i < len(b) else
                         f"| {i + 1} | {a[i] if i < len(a) else '—'} | {b[i] if i < len(b) else '—'} |")
        lines += ["", "| step | loop | engine |", "|---|---|---|"]
        vo = {h["step"]: h["score"] for h in old["stage3"]["history"]}
        vn = {h["step"]: h["score"] for h in new["stage3"]["history"]}
        for step in sorted(set(vo) | set(vn)):
            lines.append(f"| {step} | {vo.get(step, float('nan')):.4f} | {vn.get(step, float('nan')):.4f} |")
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
    parser.add_argument("--report", nargs=2, metavar=("LOOP_JSON", "ENGINE_JSON"))
    parser.add_argument("--target", default=os.path.join(ROOT, "benchmarks", "results", "engine_vs_loop.md"))
    args = parser.parse_args()
    if args.report:
        report(*args.report, args.target)
        return 0
    args.stages = {int(s) for s in args.stages.split(",")}
    os.makedirs(args.artifacts, exist_ok=True)
    result = measure(args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
