"""VLM4Rec on real data: every text source and fusion variant vs LRURec and SASRec, plus costs.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/vlm4rec.py --data_path=dataset --datasets=hm,beauty

Each run is a subprocess (``python -m recbole_mm.cli``) in a scratch folder; its result JSON and log
are kept under ``benchmarks/results/vlm4rec_runs/<dataset>/`` and reused when the arguments are the
same (``--rerun`` to force). Writes ``benchmarks/results/vlm4rec_<dataset>.md`` and ``.csv``.

- Text: the default encoder (all-MiniLM-L6-v2; from the ``minilm`` extra when installed).
- H&M: ``description`` (the dataset's human-written text) stands in for VLM-generated descriptions,
  since no pretrained vision-language model can be loaded here (no hub access); the describer
  machinery itself runs on ``--describe_items`` H&M photos with the small random local VLM to
  measure its cost. The image variants use a random-weight CLIP vision model built locally
  (no pretrained image encoder is available offline): they measure the machinery and its cost,
  not the value of real image features.
- Beauty (no images): title and title + attributes; LRURec / SASRec numbers are read from
  ``benchmarks/results/beauty_retrievers_runs`` (same protocol, mask_history off) instead of rerun;
  LRURec with mask_history on (the VLM4Rec paper's protocol) is run here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import sys
import time

from recbole_mm import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
METRICS = ["recall@5", "recall@10", "recall@20", "ndcg@10", "ndcg@20"]
# A random CLIP ViT (224 px, 32 px patches): the size of a real small image tower, not its weights.
RANDOM_CLIP = json.dumps({"image_size": 224, "patch_size": 32, "hidden_size": 256, "num_layers": 4, "num_heads": 4,
                          "projection_dim": 256}).replace(" ", "")


def variants(dataset: str) -> list[tuple[str, str, list[str]]]:
    """(label, model, overrides) of every run for a dataset."""
    runs = []
    if dataset == "hm":
        for mask in ("True", "False"):
            runs += [(f"LRURec mask={mask}", "LRURec", [f"--mask_history={mask}"]),
                     (f"SASRec mask={mask}", "SASRec", [f"--mask_history={mask}"])]
        for source in ("title", "title_attributes", "description"):
            for mask in ("True", "False"):
                runs.append((f"VLM4Rec {source} text mask={mask}", "VLM4Rec",
                             [f"--text_source={source}", "--fusion=text", f"--mask_history={mask}"]))
        for fusion in ("image", "concat", "average", "attention", "gating"):
            runs.append((f"VLM4Rec description {fusion} mask=True", "VLM4Rec",
                         ["--text_source=description", f"--fusion={fusion}", "--mask_history=True",
                          "--image_encoder=small", f"--image_encoder_small={RANDOM_CLIP}"]))
    elif dataset == "beauty":
        # the paper's protocol (mask on) for LRURec; its mask-off row and SASRec come from beauty_retrievers
        runs.append(("LRURec mask=True", "LRURec", ["--mask_history=True"]))
        for source in ("title", "title_attributes"):
            for mask in ("True", "False"):
                runs.append((f"VLM4Rec {source} text mask={mask}", "VLM4Rec",
                             [f"--text_source={source}", "--fusion=text", f"--mask_history={mask}"]))
    return runs


def run_one(label, model, dataset, args, run_dir, scratch, rerun) -> dict:
    slug = label.replace(" ", "_").replace("=", "-")
    result = bench.run_one(model, dataset, args, run_dir, rerun, name=slug, cwd=os.path.join(scratch, "runs", slug),
                           tag="vlm4rec-bench")
    result["label"] = label
    return result


def describer_cost(data_path: str, dataset: str, n_items: int, scratch: str) -> dict:
    """Items per second of the describer (small random local VLM, greedy, forced to 64 new tokens)
    on the first ``n_items`` items of the dataset, cache written to a scratch folder."""
    import torch

    from recbole_mm.data.item_store import ItemStore
    from recbole_mm.lmm.describer import (DescriberSettings, DescriptionCache, attributes_text, generate_descriptions,
                                          load_describer)

    torch.set_num_threads(1)
    folder = os.path.join(data_path, dataset)
    with open(os.path.join(folder, f"{dataset}.items.jsonl"), encoding="utf-8") as f:
        tokens = ["[PAD]"] + [json.loads(line)["item_id"] for line in f if line.strip()]
    store = ItemStore(folder, tokens, min_pixels=3136, max_pixels=50176)
    settings = DescriberSettings.defaults(model="small", max_new_tokens=64, min_new_tokens=64, batch_size=4,
                                          min_pixels=3136, max_pixels=50176)
    out = os.path.join(scratch, "descriptions")
    shutil.rmtree(out, ignore_errors=True)
    cache = DescriptionCache(out, dataset)
    texts = [attributes_text(store.attributes(i)) for i in range(1, len(store))]
    started = time.perf_counter()
    describer = load_describer(settings, "cpu", lambda: texts, small_dir=os.path.join(scratch, "describer"),
                               small_args={"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 1000})
    load_s = time.perf_counter() - started
    stats = generate_descriptions(store, cache, settings, describer, item_ids=range(1, n_items + 1))
    sample = next(iter(cache.texts().values()))
    return {**stats, "load_s": load_s, "sample": sample[:120], "settings": "small VLM (Qwen2-VL architecture, "
            "hidden 64, 2 layers, random weights), 224x224 max image, batch 4, 64 new tokens forced"}


def fmt(v, digits=4):
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def write_tables(dataset, rows, costs, command, out, notes):
    with open(out + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# VLM4Rec on {dataset}", "", f"Command: `{command}`", "", *notes, "",
             "Test metrics, full ranking over all items (leave-one-out). `mask` = mask_history (the user's "
             "earlier items excluded from the ranking; the VLM4Rec paper's protocol is mask=True). "
             "`text weight` = mean attention weight / gate value of the text vector after training "
             "(learned fusions).", "",
             "| run | text source | fusion | mask | " + " | ".join(METRICS) + " | epochs | text weight | "
             "text emb items/s | image emb items/s | score ms/user | total s |", "|---" * (len(METRICS) + 10) + "|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['text_source']} | {r['fusion']} | {r['mask_history']} | "
                     + " | ".join(fmt(r[m]) for m in METRICS)
                     + f" | {fmt(r['epochs'])} | {fmt(r['text_weight'], 2)} | {fmt(r['text_items_per_s'], 1)}"
                     + f" | {fmt(r['image_items_per_s'], 1)}"
                     + f" | {fmt(r['score_ms_per_user'], 4)} | {fmt(r['total_s'], 1)} |")
    if costs:
        lines += ["", "## Costs", ""] + costs
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def row_of(label, result) -> dict:
    info = result.get("vlm4rec", {})
    args = dict(a[2:].split("=", 1) for a in result.get("bench_args", []) if a.startswith("--") and "=" in a)
    text, image = info.get("text", {}), info.get("image", {})
    return {"run": label, "model": result["model"], "text_source": args.get("text_source", ""),
            "fusion": args.get("fusion", ""), "mask_history": args.get("mask_history", "False"),
            **{m: result["test_result"].get(m) for m in METRICS}, "epochs": result.get("epochs_run"),
            "text_items_per_s": text.get("items_per_s"), "image_items_per_s": image.get("items_per_s"),
            "score_ms_per_user": (info.get("scoring") or {}).get("ms_per_user"),
            "text_weight": (info.get("learned_fusion") or {}).get("mean_text_weight"),
            "total_s": result.get("total_time_s"), "overrides": " ".join(result.get("bench_args", []))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="dataset")
    parser.add_argument("--datasets", default="hm,beauty")
    parser.add_argument("--describe_items", type=int, default=32)
    parser.add_argument("--scratch", default="/tmp/vlm4rec_bench")
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args(argv)
    command = "python benchmarks/vlm4rec.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data_path = os.path.abspath(args.data_path)
    for dataset in [d for d in args.datasets.split(",") if d]:
        scratch = os.path.join(args.scratch, dataset)
        common = [f"--data_path={data_path}", f"--embedding_cache_dir={scratch}/cache",
                  f"--checkpoint_dir={scratch}/saved", f"--artifacts_dir={scratch}/artifacts"]
        run_dir = os.path.join(RESULTS, "vlm4rec_runs", dataset)
        rows, loads = [], []
        for label, model, extra in variants(dataset):
            base = common if model == "VLM4Rec" else [a for a in common
                                                      if a.startswith(("--data_path", "--checkpoint"))]
            result = run_one(label, model, dataset, base + extra, run_dir, scratch, args.rerun)
            loads.append((result.get("load_avg") or [0.0])[0])
            rows.append(row_of(label, result))
        notes, costs = [], []
        if dataset == "beauty":
            notes.append("LRURec mask=False and SASRec rows: copied from `benchmarks/results/beauty_retrievers_runs/"
                         "*.json` (recbole-mm-bench, mask_history off; SASRec was capped at 2 epochs there, so it "
                         "is far from converged) and, where it exists, `beauty_sasrec_b256_runs/SASRec.json` "
                         "(SASRec trained with a batch of 256). Not rerun here. LRURec mask=True is run here.")
            for model, source in (("LRURec", "beauty_retrievers"), ("SASRec", "beauty_retrievers"),
                                  ("SASRec", "beauty_sasrec_b256")):
                path = os.path.join(RESULTS, f"{source}_runs", f"{model}.json")
                if not os.path.exists(path):
                    continue
                with open(path, encoding="utf-8") as f:
                    stored = json.load(f)
                rows.append({**row_of(f"{model} mask=False ({source})", stored), "mask_history": "False"})
        if dataset == "hm":
            notes.append("`description` = H&M's human-written product text, the stand-in for VLM-generated "
                         "descriptions (no pretrained vision-language model can be loaded offline here). "
                         "Image variants use a random-weight CLIP ViT built locally (`image_encoder: small`, "
                         f"{RANDOM_CLIP}): no pretrained image encoder is available offline, so their numbers show "
                         "the machinery and its cost, not the value of real image features.")
            cost = describer_cost(data_path, dataset, args.describe_items, scratch)
            costs.append(f"- Describer ({cost['settings']}): {cost['generated']} H&M items in "
                         f"{cost['seconds']:.1f} s = **{cost['items_per_s']:.2f} items/s** (model load "
                         f"{cost['load_s']:.1f} s). Sample output (random weights): `{cost['sample']!r}`")
            with open(os.path.join(run_dir, "describer_cost.json"), "w", encoding="utf-8") as f:
                json.dump(cost, f, indent=2)
        for r in rows:
            if r["text_items_per_s"]:
                costs.append(f"- Text embedding ({r['text_source']}, all-MiniLM-L6-v2, CPU 1 thread): "
                             f"{r['text_items_per_s']:.1f} items/s (first run of that source; later runs read "
                             "the cache)")
            if r["image_items_per_s"]:
                costs.append(f"- Image embedding (random CLIP ViT, CPU 1 thread): {r['image_items_per_s']:.1f} items/s")
        costs.append("- Scoring: `score ms/user` = profile + cosine against every item, per evaluated user "
                     "(valid + test), CPU 1 thread; the item table is built once per evaluation.")
        costs.append(f"- Machine: 2 CPU cores, shared with other benchmark jobs during some runs (1-minute load "
                     f"average at the end of each run: {min(loads):.1f} to {max(loads):.1f}); timings are indicative.")
        write_tables(dataset, rows, costs, command, os.path.join(RESULTS, f"vlm4rec_{dataset}"), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
