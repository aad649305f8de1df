"""Inference cost: verbalizer scoring vs generating a ranked list (letters, or titles).

    python benchmarks/verbalizer_speed.py --dataset=ml-100k-posters --data_path=dataset/ [--users 20]
    python benchmarks/verbalizer_speed.py --dataset=ml-100k          # RecBole's bundled copy, text only

Same ranker (the small local model of the prime-cpu preset, or --ranker_model), same prompts (a
user's last 25 items and 25 candidates), one user at a time:
- verbalizer: one forward pass, scores = logits of the 25 index letters (PRIME);
- letters: greedy generation of the ranked list "A, B, ..., Y" plus end of turn;
- titles: greedy generation of the 25 candidate titles, one per line, plus end of turn.
The small model is not trained, so generation is forced to exactly the number of tokens a correct
answer has (min_new_tokens = max_new_tokens): the cost of a model that answers properly.
Each user's prompt is built and encoded once (timed on its own: rendering, image loading and the
processor); the three methods are timed on the same encoded inputs, so the "model" column compares
like with like, and the "end to end" column adds the prompt building to each.
Writes benchmarks/results/verbalizer_speed_<dataset>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default="dataset/")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--config_files", default="prime-cpu")
    parser.add_argument("--ranker_model", default=None)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/verbalizer_speed_<dataset>.md")
    args = parser.parse_args()

    from recbole.utils import init_seed

    from recbole_mm.config import Config
    from recbole_mm.lmm.prompts import index_letters
    from recbole_mm.lmm.verbalizer import end_of_turn_token, score_candidates
    from recbole_mm.utils import create_dataset, data_preparation, get_model, get_trainer

    extra = {"data_path": args.data_path, "state": "WARNING", "artifacts_dir": "saved/prime-bench"}
    if args.ranker_model:
        extra["ranker_model"] = args.ranker_model
    config = Config("PRIME", args.dataset, config_file_list=args.config_files.split(), config_dict=extra)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = get_model("PRIME")(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "PRIME")(config, model)
    ranker = trainer.build_ranker(train_data._dataset)
    lm = ranker.model.eval()
    k = config["n_candidates"]
    popular = torch.as_tensor(dataset.item_counter.most_common(200 + k), dtype=torch.long)[:, 0]
    feat = test_data._dataset.inter_feat[: args.users]
    histories = model.histories(feat)
    letters = index_letters(k)
    eot = end_of_turn_token(ranker.tokenizer)
    cuda = str(ranker.device).startswith("cuda")

    def now() -> float:  # CUDA runs asynchronously: wait for the queued work before reading the clock
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    times = {"prompt": [], "verbalizer": [], "letters": [], "titles": []}
    new_tokens = {"letters": [], "titles": []}
    with torch.no_grad():
        for u, history in enumerate(histories):
            cands = popular[torch.randperm(len(popular), generator=torch.Generator().manual_seed(u))[:k]].unsqueeze(0)
            start = now()
            text, images = ranker.render(history, cands[0].tolist())
            inputs = ranker.encode([text], [images])
            times["prompt"].append(now() - start)
            letter_ids = ranker.letter_ids(text, k)
            start = now()
            score_candidates(lm, inputs, letter_ids)
            times["verbalizer"].append(now() - start)
            answers = {"letters": ", ".join(letters) + eot,
                       "titles": "\n".join(str(ranker.store.attributes(i).get("title", "")) for i in cands[0].tolist()) + eot}
            for kind, answer in answers.items():
                n = len(ranker.tokenizer(answer, add_special_tokens=False)["input_ids"])
                start = now()
                out = lm.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=ranker.tokenizer.pad_token_id)
                times[kind].append(now() - start)
                new_tokens[kind].append(out.shape[1] - inputs["input_ids"].shape[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    e2e = {k: statistics.median(p + t for p, t in zip(times["prompt"], times[k])) for k in ("verbalizer", "letters", "titles")}
    prompt_tokens = inputs["input_ids"].shape[1]
    lines = [f"# Verbalizer vs generation: {args.dataset}", "",
             f"Command: `python benchmarks/verbalizer_speed.py --dataset={args.dataset} --data_path={args.data_path} "
             f"--users={args.users} --config_files={args.config_files}"
             f"{f' --ranker_model={args.ranker_model}' if args.ranker_model else ''}"
             f"{f' --out={args.out}' if args.out else ''}`; load average at the end "
             f"{' '.join(open('/proc/loadavg').read().split()[:3])}", "",
             f"Ranker: `{config['ranker_model']}` ({'vision-language' if ranker.backbone.is_vision else 'text'}, "
             f"{sum(p.numel() for p in lm.parameters()):,} parameters), "
             f"{torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'}, "
             f"{k} candidates, last {config['max_history_items']} history items, images "
             f"{'on' if ranker.use_images else 'off'}; last prompt {prompt_tokens} tokens. Median over {args.users} users, "
             f"one user at a time. Building and encoding a prompt (the same for every method): "
             f"{med['prompt']:.3f} s median.", "",
             "| method | new tokens (median) | model time per user (s) | vs verbalizer | end to end per user (s) | vs verbalizer |",
             "|---|---|---|---|---|---|",
             f"| verbalizer (one forward pass) | 0 | {med['verbalizer']:.4f} | 1.0x | {e2e['verbalizer']:.4f} | 1.0x |"]
    for kind in ("letters", "titles"):
        lines.append(f"| generate ranked {kind} | {statistics.median(new_tokens[kind]):.0f} | {med[kind]:.4f} "
                     f"| {med[kind] / med['verbalizer']:.1f}x slower | {e2e[kind]:.4f} | {e2e[kind] / e2e['verbalizer']:.1f}x slower |")
    out = args.out or f"benchmarks/results/verbalizer_speed_{args.dataset}.md"
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
