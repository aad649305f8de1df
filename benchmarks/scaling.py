"""How cost grows (issue 18): LRURec on synthetic data of growing size, PRIME's two-stage evaluation
against the number of candidates; one process, log-log plots with fitted slopes.

    python benchmarks/scaling.py                       # the full run (hours on 2 CPU cores; not run here)
    python benchmarks/scaling.py --sizes 1e4,3e4,1e5 --sweeps items,users --candidates 5,10,20,25
    python benchmarks/scaling.py --smoke --out /tmp/scaling   # seconds: what tests/test_distributed.py runs

LRURec: for every size n of a sweep (``items``: n items, users fixed at the first size; ``users``: n
users, items fixed; ``both``: n of each) a synthetic dataset is written (sequence lengths drawn like
Amazon Beauty's 5-core: geometric with mean 8.9, at least 5, at most 50; item popularity Zipf-like),
and one epoch of LRURec is trained and validated by full ranking in its own process (a clean peak
memory): time per epoch, validation time per evaluated user, peak resident memory. PRIME: its
ranker (``--ranker_model``, ``small`` by default: random weights, real prompt lengths) scores
``--prime_users`` prompts of every ``n_candidates`` in ``--candidates``; the time per user is the
two-stage evaluation's cost beyond the retriever's (at most 26 candidates: the verbalizer letters
them A..Z, so the issue's 50 cannot be asked for). Every curve is fitted by least squares on log-log
axes (the slope is the exponent of the growth). Results: ``<out>/scaling.json``, ``scaling.md``,
``scaling.png`` (``--out`` defaults to benchmarks/results/scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BEAUTY_MEAN_LENGTH = 8.9


def write_dataset(folder: str, name: str, users: int, items: int, seed: int = 0) -> int:
    """A RecBole ``.inter`` file of ``users`` sequences over ``items`` items; returns the interaction count."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.geometric(1 / (BEAUTY_MEAN_LENGTH - 4), users) + 4, 5, 50)
    popularity = 1.0 / (np.arange(items) + 10.0) ** 0.9
    popularity /= popularity.sum()
    total = int(lengths.sum())
    item_ids = rng.choice(items, size=total, p=popularity)
    user_ids = np.repeat(np.arange(users), lengths)
    stamps = np.arange(total, dtype=np.int64)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, name, f"{name}.inter"), "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        f.writelines(f"u{u}\ti{i}\t{t}\n" for u, i, t in zip(user_ids, item_ids, stamps))
    # the catalog: every item, interacted with or not, so that the model's item space (its output
    # layer, the full-ranking score matrix) has ``items`` rows; without it RecBole keeps only the
    # items that occur, far fewer than 10^6 when a 10^4-user sample meets a long tail
    with open(os.path.join(folder, name, f"{name}.item"), "w", encoding="utf-8") as f:
        f.write("item_id:token\n")
        f.writelines(f"i{i}\n" for i in range(items))
    return total


def eval_users_per_batch(items: int, budget_floats: int = 2 ** 26) -> int:
    """Users per full-ranking batch so that the batch's score matrix stays at ``budget_floats``
    (256 MiB of float32; RecBole's default of 4096 users would be 16 GB per copy at 10^6 items)."""
    return int(max(16, min(4096, budget_floats // (items + 1))))


def lrurec_point(users: int, items: int, workdir: str, smoke: bool) -> dict:
    """One epoch of LRURec on a fresh synthetic dataset: time per epoch, per evaluated user, peak memory."""
    from recbole_mm.quick_start import run_recbole_mm

    name = f"synth-u{users}-i{items}"
    data = os.path.join(workdir, "data")
    interactions = write_dataset(data, name, users, items)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        started = time.perf_counter()
        result = run_recbole_mm("LRURec", name, saved=False, config_dict={
            "data_path": data, "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]}, "epochs": 1,
            "eval_step": 1, "show_progress": False, "state": "ERROR", "checkpoint_dir": os.path.join(workdir, "saved"),
            "MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": 128,
            # for a sequential model RecBole's full-ranking eval_batch_size counts USERS (rows), each
            # scored against every item: a batch holds eval_batch_size x |I| floats (a few copies)
            "eval_batch_size": eval_users_per_batch(items),
            **({"hidden_size": 16} if smoke else {})})
    finally:
        os.chdir(cwd)
    epoch = result["epoch_log"][0]
    return {"users": users, "items": items, "interactions": interactions, "time_per_epoch_s": epoch["train_s"],
            "valid_s": epoch["valid_s"], "eval_s_per_user": epoch["valid_s"] / users,
            "peak_rss_mb": result["peak_rss_mb"], "wall_s": time.perf_counter() - started}


def watch_rss(proc: subprocess.Popen, max_rss_gb: float, every_s: float = 0.5,
              max_s: float | None = None) -> float | str | None:
    """Wait for ``proc``; kill it if its resident memory passes ``max_rss_gb`` (returns the GB seen),
    so that a point too large for the machine is a recorded result instead of the OOM killer
    picking a victim among the machine's other processes, or if it runs past ``max_s`` seconds
    (returns a message). None when the process ended by itself."""
    status = f"/proc/{proc.pid}/status"
    deadline = None if max_s is None else time.monotonic() + max_s
    while proc.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return f"ran past the {max_s:g} s limit of a point"
        try:
            with open(status) as f:
                rss_kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, StopIteration):
            rss_kb = 0
        if rss_kb / 2 ** 20 > max_rss_gb:
            proc.kill()
            proc.wait()
            return rss_kb / 2 ** 20
        time.sleep(every_s)
    return None


def run_point(users: int, items: int, workdir: str, smoke: bool, in_process: bool, max_rss_gb: float = 16.0,
              max_point_s: float | None = None) -> dict:
    """One LRURec point (in its own process unless ``in_process``, stopped past ``max_rss_gb``); a
    finished point's ``<workdir>/point.json`` is reused, so an interrupted run resumes."""
    if in_process:
        return lrurec_point(users, items, workdir, smoke)
    done = os.path.join(workdir, "point.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            return json.load(f)
    cmd = [sys.executable, os.path.abspath(__file__), "--point", f"{users},{items}", "--workdir", workdir]
    proc = subprocess.Popen(cmd + (["--smoke"] if smoke else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    peak = watch_rss(proc, max_rss_gb, max_s=max_point_s)
    out, err = proc.communicate()
    if peak is not None:  # stopped by the watchdog: the point does not fit; recorded, not fitted
        point = {"users": users, "items": items, "interactions": None,
                 "stopped": peak if isinstance(peak, str) else
                 f"resident memory passed {max_rss_gb:g} GB ({peak:.1f} GB seen)"}
    elif proc.returncode:
        raise RuntimeError(f"point users={users} items={items} failed:\n{err[-3000:]}")
    else:
        point = json.loads(out.strip().splitlines()[-1])
    from recbole_mm.files import write_json

    write_json(done, point)
    return point


def prime_points(candidates: list[int], users: int, ranker_model: str, workdir: str, smoke: bool) -> list[dict]:
    """Time per user of the ranker's scoring (PRIME's second stage) for each number of candidates."""
    import torch

    from recbole_mm.config import Config
    from recbole_mm.data.fixtures import FixtureSpec, make_fixture
    from recbole_mm.model.prime import PRIME
    from recbole_mm.trainer.prime import PRIMETrainer
    from recbole_mm.utils import create_dataset, data_preparation

    data = os.path.join(workdir, "prime-data")
    make_fixture(data, "scalefix", FixtureSpec(n_users=max(60, users), n_items=60, min_len=5, max_len=30, seed=3))
    small = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400} if smoke else None
    cfg = {"data_path": data, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "show_progress": False,
           "state": "ERROR", "ranker_model": ranker_model, "artifacts_dir": os.path.join(workdir, "artifacts"),
           "n_candidates": max(candidates), "topk": [1], "valid_metric": "NDCG@1", "max_history_items": 25,
           "checkpoint_dir": os.path.join(workdir, "saved"), **({"ranker_small": small} if small else {})}
    if ranker_model == "smollm2":
        cfg["prompt_variant"] = "no_image"
    config = Config("PRIME", "scalefix", config_dict=cfg)
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    trainer = PRIMETrainer(config, PRIME(config, train_data._dataset))
    ranker = trainer.build_ranker(train_data._dataset)
    ranker.model.eval()
    feat = valid_data._dataset.inter_feat[torch.arange(users)]
    histories = trainer.model.histories(feat)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for k in candidates:
        cands = torch.stack([torch.randperm(59, generator=generator)[:k] + 1 for _ in range(users)])
        with torch.no_grad():
            ranker.score_in_batches(histories[:1], cands[:1], 1)  # warm-up (letter ids, caches)
            started = time.perf_counter()
            ranker.score_in_batches(histories, cands, config["ranker_eval_batch_size"])
            elapsed = time.perf_counter() - started
        rows.append({"n_candidates": k, "users": users, "s_per_user": elapsed / users})
    return rows


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): the exponent of the growth."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def _fitted(ax, xs, ys, color) -> None:
    """The least-squares power law through the points, dashed."""
    if len(xs) < 2:
        return
    b, a = np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)
    grid = np.geomspace(min(xs), max(xs), 20)
    ax.loglog(grid, np.exp(a) * grid ** b, "--", color=color)


def report(out: str, results: dict, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("time_per_epoch_s", "LRURec s / epoch"), ("eval_s_per_user", "LRURec eval s / user"),
              ("peak_rss_mb", "peak RSS MiB")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4))
    slopes = {}
    for (key, label), ax in zip(panels, axes):
        for sweep, points in results["lrurec"].items():
            points = [p for p in points if not p.get("stopped")]
            xs = [p["items"] if sweep == "items" else p["users"] for p in points]
            ys = [p[key] for p in points]
            s = slope(xs, ys) if len(xs) > 1 else float("nan")
            slopes[f"{sweep}:{key}"] = s
            line = ax.loglog(xs, ys, "o", label=f"{sweep} (slope {s:.2f})")[0]
            _fitted(ax, xs, ys, line.get_color())
        ax.set_xlabel("size (items or users)")
        ax.set_ylabel(label)
        ax.legend()
    prime = results["prime"]
    xs, ys = [p["n_candidates"] for p in prime], [p["s_per_user"] for p in prime]
    s = slope(xs, ys) if len(xs) > 1 else float("nan")
    slopes["prime:s_per_user"] = s
    line = axes[-1].loglog(xs, ys, "o", label=f"ranker {results['ranker_model']} (slope {s:.2f})")[0]
    _fitted(axes[-1], xs, ys, line.get_color())
    axes[-1].set_xlabel("n_candidates")
    axes[-1].set_ylabel("PRIME two-stage eval s / user")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scaling.png"), dpi=100)
    results["slopes"] = slopes
    with open(os.path.join(out, "scaling.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    lines = [f"# How cost grows\n\n`{command}`  \nload average at start: {results['loadavg']}\n",
             "| sweep | users | items | interactions | s / epoch | eval s / user | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for sweep, points in results["lrurec"].items():
        lines += [f"| {sweep} | {p['users']} | {p['items']} | {p['interactions']} | {p['time_per_epoch_s']:.3g} | "
                  f"{p['eval_s_per_user']:.3g} | {p['peak_rss_mb']:.0f} |" if not p.get("stopped") else
                  f"| {sweep} | {p['users']} | {p['items']} | - | stopped: {p['stopped']} | - | - |" for p in points]
    lines += ["", "| n_candidates | s / user (ranker) |", "|---|---|"]
    lines += [f"| {p['n_candidates']} | {p['s_per_user']:.3g} |" for p in prime]
    lines += ["", "Fitted log-log slopes: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()), "",
              "![scaling](scaling.png)"]
    with open(os.path.join(out, "scaling.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,3e4,1e5,3e5,1e6")
    parser.add_argument("--sweeps", default="items,users", help="comma-separated: items, users, both")
    parser.add_argument("--candidates", default="5,10,20,25")
    parser.add_argument("--prime_users", type=int, default=64)
    parser.add_argument("--ranker_model", default="small", help="small (random weights), smollm2, a hub id or folder")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scaling"))
    parser.add_argument("--workdir", default=None, help="scratch folder (default: <out>/work)")
    parser.add_argument("--max_rss_gb", type=float, default=16.0,
                        help="a point whose resident memory passes this is stopped and recorded as not fitting")
    parser.add_argument("--max_point_s", type=float, default=None,
                        help="a point running longer than this is stopped and recorded (default: no limit)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, in one process: seconds")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # users,items: one LRURec point
    args = parser.parse_args(argv)
    if args.point:
        users, items = (int(v) for v in args.point.split(","))
        print(json.dumps(lrurec_point(users, items, args.workdir, args.smoke)))
        return 0
    if args.smoke:
        args.sizes, args.sweeps, args.candidates, args.prime_users = "120,240", "both", "2,4", 4
    sizes = [int(float(v)) for v in args.sizes.split(",")]
    candidates = [int(v) for v in args.candidates.split(",")]
    if max(candidates) > 26:
        parser.error(f"--candidates {args.candidates}: PRIME's verbalizer letters candidates A..Z (at most 26)")
    os.makedirs(args.out, exist_ok=True)
    workdir = os.path.abspath(args.workdir or os.path.join(args.out, "work"))
    os.makedirs(workdir, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    results = {"loadavg": load, "ranker_model": args.ranker_model, "lrurec": {}, "prime": []}
    for sweep in args.sweeps.split(","):
        points = []
        for n in sizes:
            users, items = {"items": (sizes[0], n), "users": (n, sizes[0]), "both": (n, n)}[sweep]
            points.append(run_point(users, items, os.path.join(workdir, f"{sweep}-{n}"), args.smoke, args.smoke,
                                    args.max_rss_gb, args.max_point_s))
            print(f"[scaling] LRURec {sweep} users={users} items={items}: {points[-1]}", flush=True)
        results["lrurec"][sweep] = points
    results["prime"] = prime_points(candidates, args.prime_users, args.ranker_model, workdir, args.smoke)
    print(f"[scaling] PRIME: {results['prime']}", flush=True)
    report(args.out, results, "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
