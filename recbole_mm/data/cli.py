"""Command line for datasets: ``recbole-mm-data`` / ``python -m recbole_mm.data``.

Subcommands: ``prepare``, ``convert-amazon``, ``download-images``, ``stats``. Bad input prints one
line ``error: ...`` naming the file/field/value and what to do, and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from recbole_mm.errors import UserError

DATASETS = ("beauty", "ml-100k-posters", "ml-1m-llamarec", "hm")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recbole-mm-data", description="Multimodal datasets for recbole-mm.")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("prepare", help="build an atomic dataset from shared/data (or, for beauty, the public raw files)",
                       epilog="beauty without the shared copy: download reviews_Beauty_5.json.gz and "
                              "meta_Beauty.json.gz from https://jmcauley.ucsd.edu/data/amazon/ into a folder "
                              "and pass --raw FOLDER.")
    a.add_argument("dataset", choices=DATASETS)
    a.add_argument("--shared", default="../shared/data", help="the shared/data folder (default ../shared/data)")
    a.add_argument("--raw", default=None, help="beauty only: folder with the public Amazon 2014 files "
                                               "(reviews_Beauty_5.json.gz, meta_Beauty.json.gz)")
    a.add_argument("--out", default="dataset", help="output folder (default dataset/)")

    c = sub.add_parser("convert-amazon", help="convert Amazon 2014 reviews/ratings + metadata files")
    c.add_argument("--reviews", required=True, help="reviews_<Category>_5.json.gz or ratings_<Category>.csv")
    c.add_argument("--meta", required=True, help="meta_<Category>.json.gz")
    c.add_argument("--name", required=True, help="dataset name (folder and file prefix)")
    c.add_argument("--out", default="dataset")
    c.add_argument("--user-k", type=int, default=5, help="k-core for users (default 5)")
    c.add_argument("--item-k", type=int, default=5, help="k-core for items (default 5)")

    d = sub.add_parser("download-images", help="download the imUrl images of a dataset into its images/")
    d.add_argument("--dataset", required=True, help="dataset folder, e.g. dataset/beauty")
    d.add_argument("--workers", type=int, default=8)
    d.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per attempt, in total (connect, headers and body)")
    d.add_argument("--retries", type=int, default=3)
    d.add_argument("--backoff", type=float, default=1.0, help="first back-off in seconds (doubles)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("stats", help="print #users, #items, #images, #inter, density")
    s.add_argument("datasets", nargs="+", metavar="DIR_OR_NAME")
    s.add_argument("--data-path", default="dataset", help="where names are looked up (default dataset/)")
    s.add_argument("--verify-images", action="store_true", help="decode every image (slower)")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "prepare":
        from recbole_mm.data.prepare import prepare
        from recbole_mm.data.stats import dataset_stats, format_stats

        folder = prepare(args.dataset, args.shared, args.out, raw=args.raw)
        print(f"wrote {folder}")
        print(format_stats([dataset_stats(folder)]))
    elif args.cmd == "convert-amazon":
        from recbole_mm.data.amazon import convert_amazon
        from recbole_mm.data.stats import dataset_stats, format_stats

        folder = convert_amazon(args.reviews, args.meta, args.name, args.out, args.user_k, args.item_k)
        print(f"wrote {folder}")
        dropped = json.loads((folder / f"{args.name}.meta.json").read_text(encoding="utf-8"))["duplicates_dropped"]
        if dropped:
            print(f"dropped {dropped:,} exact duplicate rows (same user, item, rating and time)")
        print(format_stats([dataset_stats(folder)]))
    elif args.cmd == "download-images":
        from recbole_mm.data.images import download_images

        report = download_images(args.dataset, workers=args.workers, timeout=args.timeout,
                                 retries=args.retries, backoff=args.backoff, show_progress=not args.no_progress)
        print(report.summary())
        for f in report.failures[:10]:
            print(f"  failed {f.item_id}: {f.error} ({f.url})")
        if len(report.failures) > 10:
            print(f"  ... see {args.dataset}/*.images_report.json")
    elif args.cmd == "stats":
        from recbole_mm.data.stats import dataset_stats, format_stats

        print(format_stats([dataset_stats(d, args.data_path, args.verify_images) for d in args.datasets]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:  # DataFormatError and every other user error: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: keep the traceback
            raise
        print(f"error: {e.filename}: {e.strerror}; check the path", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
