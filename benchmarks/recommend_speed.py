"""Speed of `recommend`: reload a run from its manifest, then top-10 for every user, batched vs one by one.

Usage: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/recommend_speed.py [--out results/recommend_speed.json]
Trains LRURec for one epoch on RecBole's bundled ml-100k (mask_history: True) in the current folder.
"""

import argparse
import json
import statistics
import time

from recbole_mm.quick_start import run_recbole_mm
from recbole_mm.recommend import Recommender


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run_recbole_mm("LRURec", "ml-100k", config_dict={"epochs": 1, "show_progress": False, "state": "ERROR",
                                                              "mask_history": True})
    started = time.perf_counter()
    rec = Recommender.from_file(result["manifest_file"])
    load = time.perf_counter() - started
    users = list(rec.user_ids)[1:]
    rec.recommend(users=users[:10], k=10)  # warm-up
    batched = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        rec.recommend(users=users, k=10, batch_size=256)
        batched.append(time.perf_counter() - started)
    single = []
    for user in users[:50]:
        started = time.perf_counter()
        rec.recommend(users=[user], k=10)
        single.append(time.perf_counter() - started)
    out = {"model": "LRURec", "dataset": "ml-100k", "users": len(users), "manifest_load_s": load,
           "batched_s_median": statistics.median(batched),
           "batched_ms_per_user": 1000 * statistics.median(batched) / len(users),
           "one_by_one_ms_per_user_median": 1000 * statistics.median(single),
           "loadavg": open("/proc/loadavg").read().strip()}
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
