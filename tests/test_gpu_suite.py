"""benchmarks/gpu_suite.py: the paper-size configs, the CPU smoke run (same code path as the GPU run),
the time budget and the device scripts."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")

# Parameter counts of the hub checkpoints (safetensors metadata on the model pages), written here
# independently of the suite's own table.
PUBLISHED = {
    "qwen2-vl-2b": 2208985600,     # Qwen/Qwen2-VL-2B-Instruct
    "qwen2.5-vl-3b": 3754622976,   # Qwen/Qwen2.5-VL-3B-Instruct
    "llama-2-7b": 6738415616,      # meta-llama/Llama-2-7b-hf
    "llava-1.5-7b": 7063427072,    # llava-hf/llava-1.5-7b-hf
}


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_suite", None)


_RUNNER = """
import runpy, sys
path = sys.argv[1]
sys.argv = [path] + sys.argv[2:]
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("RECBOLE_MODULES=" + repr(sorted(m for m in sys.modules if m == "recbole" or m.startswith("recbole."))))
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of all four architectures in both precisions (tiny sizes, CPU, short history)."""
    out = tmp_path_factory.mktemp("gpu_suite") / "smoke"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, SUITE, "--smoke", "--reps", "1", "--gen_reps", "1",
                           "--history", "5", "--out", str(out), "--work_dir", str(out.parent / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(f"{out}.json", encoding="utf-8") as f:
        results = json.load(f)
    with open(f"{out}.md", encoding="utf-8") as f:
        markdown = f.read()
    return results, markdown, proc.stdout


def test_full_configs_have_the_published_parameter_counts(suite):
    assert [s.key for s in suite.MODELS] == list(PUBLISHED)
    for spec in suite.MODELS:
        assert suite.count_parameters(spec) == PUBLISHED[spec.key], spec.key


def test_dry_run_configs_keep_the_full_widths(suite):
    for spec in suite.MODELS:
        full, dry = suite.build_config(spec), suite.build_config(spec, layers=1)
        text_full, text_dry = getattr(full, "text_config", full), getattr(dry, "text_config", dry)
        assert (text_dry.hidden_size, text_dry.vocab_size) == (text_full.hidden_size, text_full.vocab_size)
        assert text_full.num_hidden_layers >= 28 and text_dry.num_hidden_layers == 1
        vision = getattr(dry, "vision_config", None)
        if spec.family == "qwen2_5_vl":
            assert vision.depth == 1 and vision.fullatt_block_indexes == [0]
        if spec.family == "llava":  # LLaVA reads the second-to-last CLIP layer: two are kept
            assert vision.num_hidden_layers == 2 and vision.image_size == 336


def test_smoke_run_measures_every_model_in_both_precisions(smoke):
    results, markdown, _ = smoke
    rows = results["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [(m, p) for m in PUBLISHED for p in ("nf4", "bf16")]
    for r in rows:
        assert r["skipped"] == [] and "error" not in r, r
        for key in ("build_s", "load_s", "train_step_s", "eval_batch_s", "verbalizer_s", "letters_s", "titles_s"):
            assert r[key] > 0, (r["model"], key)
        assert r["train_prompts_per_s"] == pytest.approx(1 / r["train_step_s"])
        assert r["eval_prompts_per_s"] == pytest.approx(4 / r["eval_batch_s"])
        assert r["eval_scores_shape"] == [4, 25]
        assert r["lora_layers"] > 0 and 0 < r["trainable_share"] < 1
        # 4-bit NF4 really is 4-bit, bf16 is not
        assert r["quantized"] is (r["precision"] == "nf4")
        assert (r["linear4bit"] > 0) is (r["precision"] == "nf4")
        assert r["load_peak_gib"] is None  # no GPU: no peak memory is claimed
    assert results["smoke"] and not results["stopped"]
    assert "SMOKE RUN" in markdown and markdown.count("| qwen2-vl-2b") == 4


def test_smoke_generation_has_the_answer_lengths(smoke):
    for r in smoke[0]["rows"]:
        # "A, B, ..., Y" + end of turn: 25 letters, 24 separators, one end-of-turn token
        assert r["letters_answer_tokens"] == 50
        assert r["letters_new_tokens"] == r["letters_answer_tokens"]
        assert r["titles_new_tokens"] == r["titles_answer_tokens"] > 25


def test_smoke_prompts_follow_each_model(smoke):
    rows = {(r["model"], r["precision"]): r for r in smoke[0]["rows"]}
    assert rows[("qwen2-vl-2b", "nf4")]["images_per_prompt"] == 5 + 25   # every item's image
    assert rows[("qwen2.5-vl-3b", "bf16")]["images_per_prompt"] == 5 + 25
    assert rows[("llama-2-7b", "nf4")]["images_per_prompt"] == 0         # text only
    assert rows[("llava-1.5-7b", "nf4")]["images_per_prompt"] == 1       # one image per prompt
    assert rows[("llava-1.5-7b", "bf16")]["eval_images"] == 4            # ... in every prompt of the batch
    assert rows[("qwen2-vl-2b", "nf4")]["eval_images"] == 4 * 30
    assert rows[("llama-2-7b", "nf4")]["prompt_tokens"] == rows[("llama-2-7b", "bf16")]["prompt_tokens"] > 300


def test_suite_imports_no_recbole(smoke):
    # the GPU machine has no RecBole: the suite must run without it
    assert "RECBOLE_MODULES=[]" in smoke[2]


def test_budget_stops_cleanly_and_writes_what_it_has(suite, tmp_path):
    args = suite.parse_args(["--smoke", "--budget_s", "0", "--out", str(tmp_path / "r"),
                             "--work_dir", str(tmp_path / "w")])
    results = suite.run(args)
    assert results["stopped"] and all(r["skipped"] == ["build"] for r in results["rows"])
    with open(tmp_path / "r.json", encoding="utf-8") as f:
        assert json.load(f)["stopped"] is True
    assert "stopped by the budget" in (tmp_path / "r.md").read_text(encoding="utf-8")
    assert os.listdir(tmp_path / "w") == []  # scratch checkpoints removed

    now = [0.0]
    budget = suite.Budget(10.0, clock=lambda: now[0])
    assert budget.fits(10.0)
    now[0] = 4.0
    assert budget.fits(6.0) and not budget.fits(6.5)
    assert suite.Budget(None).fits(1e9)


def test_a_failing_model_is_recorded_and_the_run_goes_on(suite, tmp_path, monkeypatch):
    calls = []

    def measure(spec, folder, precision, *args):
        calls.append((spec.key, precision))
        args[-2]["phase"] = "train"  # (..., row, save)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(suite, "measure", measure)
    args = suite.parse_args(["--smoke", "--models", "llama-2-7b", "--out", str(tmp_path / "r"),
                             "--work_dir", str(tmp_path / "w")])
    results = suite.run(args)
    assert calls == [("llama-2-7b", "nf4"), ("llama-2-7b", "bf16")]  # the second precision still ran
    assert [r["error"] for r in results["rows"]] == ["train: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"] * 2
    assert "train: RuntimeError: CUDA out of memory" in (tmp_path / "r.md").read_text(encoding="utf-8")


def test_default_run_is_sized_for_eight_minutes(suite):
    default = suite.parse_args([])
    expected = suite.expected_total(suite.MODELS, default.precisions, default.reps, default.gen_reps)
    script = open(os.path.join(ROOT, "benchmarks", "gpu_suite_device.sh"), encoding="utf-8").read()
    budget = float(re.search(r"BUDGET_S:-(\d+)", script).group(1))
    assert expected <= budget <= 8 * 60
    # a 7B generation phase is costed per new token
    assert suite.expected_cost("titles", 7e9, tokens=150) == pytest.approx(150 * (0.03 + 0.006 * 7))


def test_names_and_bad_arguments(suite, capsys):
    assert suite.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert suite.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(SystemExit):
        suite.parse_args(["--models", "gpt-4"])
    assert "unknown model 'gpt-4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.parse_args(["--precisions", "int8"])
    assert "unknown precision 'int8'" in capsys.readouterr().err
