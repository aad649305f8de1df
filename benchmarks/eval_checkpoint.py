"""Valid and test metrics of a stored recbole-mm checkpoint (e.g. the best so far of a run that was
stopped at a time limit): ``python benchmarks/eval_checkpoint.py saved/LRURec-....pth [...] --out=x.json``."""

from __future__ import annotations

import argparse
import json

import torch


def evaluate(path: str) -> dict:
    from recbole_mm.quick_start import load_data_and_model
    from recbole_mm.utils import get_trainer

    config, model, _, _, valid_data, test_data = load_data_and_model(path)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {"checkpoint": path, "best_epoch": ckpt.get("epoch"), "valid_metric": config["valid_metric"],
            "best_valid_score": ckpt.get("best_valid_score"),
            "valid_result": dict(trainer.evaluate(valid_data, load_best_model=False)),
            "test_result": dict(trainer.evaluate(test_data, load_best_model=False))}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = [evaluate(p) for p in args.checkpoints]
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
