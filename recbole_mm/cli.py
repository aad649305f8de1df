"""Command line of ``run_recbole_mm.py`` (RecBole's conventions: --model, --dataset, --key=value)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_recbole_mm.py",
        description="Train and evaluate a recbole-mm model or any RecBole model. Any other "
                    "--key=value is a RecBole/recbole-mm config override (e.g. --epochs=5); an unknown key "
                    "warns with the closest known one (--strict_config=True: error).",
        epilog="Datasets: RecBole's own names (ml-100k, ml-1m, amazon-beauty, ...) are read or downloaded by "
               "RecBole. recbole-mm's prepared datasets (beauty, ml-100k-posters, ml-1m-llamarec, hm) are made "
               "with `recbole-mm-data prepare NAME --out dataset` from the project's shared data; Beauty also "
               "from the public Amazon 2014 files (reviews_Beauty_5.json.gz and meta_Beauty.json.gz from "
               "https://jmcauley.ucsd.edu/data/amazon/): `recbole-mm-data prepare beauty --raw FOLDER`. "
               "Then pass --data_path=dataset/.")
    parser.add_argument("--model", "-m", default="LRURec", help="model name (ours or RecBole's)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--resume", default=None, help="checkpoint (.pth) of a run to continue")
    parser.add_argument("--result_file", default=None, help="write the results as JSON here")
    group = parser.add_argument_group(
        "several processes (RecBole's distributed path; gloo on CPU, nccl on GPUs)",
        "one machine: --nproc=N; several: the same command on each machine with --world_size=total "
        "processes, --offset=global rank of its first process, --ip/--port of the rank-0 machine")
    group.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    group.add_argument("--world_size", type=int, default=-1, help="processes on all machines (default nproc)")
    group.add_argument("--ip", default="localhost", help="address of the machine of rank 0")
    group.add_argument("--port", default="5678", help="free TCP port on the machine of rank 0")
    group.add_argument("--offset", type=int, default=0, help="global rank of this machine's first process")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["recommend"]:  # `recbole-mm recommend --model_file=... --user=...`
        from recbole_mm.recommend import main as recommend_main

        return recommend_main(argv[1:])
    args, rest = build_parser().parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        print(f"error: unrecognised arguments {bad}: overrides must look like --key=value", file=sys.stderr)
        return 2
    from recbole_mm.errors import UserError

    try:
        result = _run(args, rest)
    except UserError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.result_file:
        tmp = args.result_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
        os.replace(tmp, args.result_file)
    return 0


def _run(args, rest) -> dict:
    from recbole_mm.errors import UserError
    from recbole_mm.quick_start import run

    if args.result_file:  # checked now, not after hours of training
        folder = os.path.dirname(os.path.abspath(args.result_file))
        if not os.path.isdir(folder):
            raise UserError(f"--result_file={args.result_file}: folder {folder} does not exist; create it first")
        if os.path.isdir(args.result_file):
            raise UserError(f"--result_file={args.result_file} is a folder; name a file (e.g. result.json)")
        if not os.access(folder, os.W_OK):
            raise UserError(f"--result_file={args.result_file}: folder {folder} is not writable")
    config_files = args.config_files.split() if args.config_files else None
    return run(model=args.model, dataset=args.dataset, config_file_list=config_files, argv=rest, resume=args.resume,
               nproc=args.nproc, world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.offset)


if __name__ == "__main__":
    sys.exit(main())
