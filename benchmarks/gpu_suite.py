"""GPU measurement suite: the paper-size LMM backbones' memory and speed, in one short run.

    python benchmarks/gpu_suite.py                      # on a GPU: the four backbones, NF4 and bf16
    python benchmarks/gpu_suite.py --budget_s 420       # stop cleanly after 7 minutes, keep what was measured
    python benchmarks/gpu_suite.py --smoke              # CPU: tiny versions, the same code path (seconds)
    python benchmarks/gpu_suite.py --check_params       # CPU: parameter counts of the full configs vs published

Each backbone is built with the exact architecture of the paper's checkpoint from its configuration
(no hub, no download) and random (seeded) weights, saved with ``save_pretrained`` to a scratch folder
(``/dev/shm`` when it has room) and loaded through the project's own loader,
:func:`recbole_mm.lmm.backbone.load_backbone` (4-bit NF4 with double quantization, or bf16; LoRA r=8 on
every language-model linear layer), and ranked with :class:`recbole_mm.lmm.candidate_ranker.LMMRanker` on PRIME
prompts built by :func:`recbole_mm.lmm.prompts.build_prompt` from the small synthetic fixture
(:mod:`recbole_mm.data.fixtures`, 168x168 images: 36 Qwen-VL vision tokens each, the ``image_max_pixels``
of PRIME.yaml). The tokenizer is a byte-level BPE trained on those prompts (Qwen2's pre-tokenizer, ChatML
turns), so a prompt's token count is close to a real English tokenizer's; it is reported per model.

Measured for each backbone and precision (CUDA synchronised around every clock reading; peak =
``torch.cuda.max_memory_allocated`` since the phase began):
- load: ``load_backbone`` + moving to the GPU, time and peak memory;
- train step: one ranker training step at batch 1 without gradient accumulation (forward on
  prompt + answer letter + end of turn, response-only loss, backward, gradient clipping, AdamW step),
  bf16 autocast as in the ranker trainer; median of ``--reps`` after one warm-up; prompts/s = 1 / time;
- eval batch: ``LMMRanker.score`` on ``--eval_batch`` prompts (PRIME.yaml's ranker_eval_batch_size),
  the ranker's part of two-stage evaluation; prompts/s = batch / time;
- verbalizer vs generation, one prompt at a time, same encoded inputs, 25 candidates: one forward pass
  (letter logits) against greedy generation (KV cache on) of the ranked letters ``A, B, ..., Y`` and of
  the 25 titles, forced to exactly the answer's length (random weights do not stop by themselves).

Models (the method that uses each): Qwen2-VL-2B-Instruct (PRIME), Qwen2.5-VL-3B-Instruct (HaNoRec),
Llama-2-7B (MLLM4Rec, text only: captions are text), LLaVA-1.5-7B (ALMOSTREC; one image per prompt, the
most recent history item's, 576 tokens, as the model was trained; every item as text).

``--budget_s``: before each phase its expected cost (rough per-billion-parameter figures, below) is
compared with the time left; a phase that would not fit is recorded as skipped and the results file
(markdown + JSON, rewritten after every phase) keeps what was measured. This module imports no RecBole
(the GPU machine has none); see benchmarks/gpu_suite_device.sh for the prepared device run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Parameter counts of the hub checkpoints (safetensors metadata, the model pages' "Model size").
PUBLISHED_PARAMS = {
    "qwen2-vl-2b": 2_208_985_600,
    "qwen2.5-vl-3b": 3_754_622_976,
    "llama-2-7b": 6_738_415_616,
    "llava-1.5-7b": 7_063_427_072,
}
PRECISIONS = ("nf4", "bf16")
N_CANDIDATES = 25
MAX_HISTORY = 25
EVAL_BATCH = 4            # PRIME.yaml ranker_eval_batch_size
ANCHOR_ITEM = 0           # the most recent history item of every prompt
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 3136, 28224   # PRIME.yaml: 56x56 .. 168x168
# Expected cost of each phase on one H100/H200, seconds = fixed + per_b * (billions of parameters),
# per repetition (generation: per new token). Rough figures from the costs: bf16 weights written and
# read at a few GB/s; a training step at ~3k tokens ~6 * params * tokens FLOPs at a fraction of peak;
# Hugging Face eager decoding ~30 ms per token of kernel-launch overhead plus the weights' memory
# traffic. Used only to skip a phase that would not fit in --budget_s; with the defaults the four
# models in both precisions are expected to take ~6 minutes.
EXPECTED_S = {"build": (3.0, 3.0), "load": (3.0, 2.5), "train": (0.3, 0.15), "eval": (0.3, 0.2),
              "verbalizer": (0.1, 0.05), "letters": (0.03, 0.006), "titles": (0.03, 0.006)}


@dataclass
class ModelSpec:
    """One backbone: its hub checkpoint, the method that uses it and how its config is built."""

    key: str
    checkpoint: str
    method: str
    family: str            # qwen2_vl | qwen2_5_vl | llama | llava
    one_image: bool = False

    @property
    def vision(self) -> bool:
        return self.family != "llama"


MODELS = [
    ModelSpec("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "PRIME", "qwen2_vl"),
    ModelSpec("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "HaNoRec", "qwen2_5_vl"),
    ModelSpec("llama-2-7b", "meta-llama/Llama-2-7b-hf", "MLLM4Rec", "llama"),
    ModelSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "ALMOSTREC", "llava", one_image=True),
]
MODEL_KEYS = [m.key for m in MODELS]


# ----------------------------------------------------------------------------------------------
# configurations


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    hw = (half - half // 4) // 2
    return [half - 2 * hw, hw, hw]


def build_config(spec: ModelSpec, smoke: bool = False, ids: dict | None = None, vocab: int | None = None,
                 layers: int | None = None):
    """The transformers config of ``spec``: the published architecture (``smoke=False``; vocabulary
    size as published) or a tiny one of the same classes (``smoke=True``; ``vocab`` rows).
    ``ids`` maps special-token strings to the tokenizer's ids (ids of the real vocabulary if None).
    ``layers``: keep only that many transformer layers / vision blocks (a CPU dry run of the full widths)."""
    config = _build_config(spec, smoke, ids or {}, vocab)
    if layers:
        text = getattr(config, "text_config", config)
        text.num_hidden_layers = layers
        if hasattr(text, "max_window_layers"):
            text.max_window_layers = layers
        if hasattr(text, "layer_types"):
            text.layer_types = list(text.layer_types)[:layers]
        vision = getattr(config, "vision_config", None)
        if vision is not None and hasattr(vision, "depth"):
            vision.depth = layers
            if hasattr(vision, "fullatt_block_indexes"):
                vision.fullatt_block_indexes = [i for i in vision.fullatt_block_indexes if i < layers] or [layers - 1]
        elif vision is not None:
            vision.num_hidden_layers = max(layers, 2)  # LLaVA reads the second-to-last layer
    return config


def _build_config(spec: ModelSpec, smoke: bool, ids: dict, vocab: int | None):
    from transformers import LlamaConfig, LlavaConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        q = {k: ids.get(k, d) for k, d in [("<|endoftext|>", 151643), ("<|im_end|>", 151645),
                                           ("<|vision_start|>", 151652), ("<|vision_end|>", 151653),
                                           ("<|vision_pad|>", 151654), ("<|image_pad|>", 151655),
                                           ("<|video_pad|>", 151656)]}
        if spec.family == "qwen2_vl":
            text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        max_window_layers=28)
            vision = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536)
            if smoke:
                text.update(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_window_layers=2)
                vision.update(depth=1, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64)
            cls, extra = Qwen2VLConfig, {}
        else:
            text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                        max_window_layers=70)
            vision = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                          out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                          tokens_per_second=2)
            if smoke:
                text.update(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_window_layers=2)
                vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                              fullatt_block_indexes=[1])
            cls, extra = Qwen2_5_VLConfig, {}
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        text.update(rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": _mrope(head_dim)},
                    bos_token_id=q["<|endoftext|>"], eos_token_id=q["<|im_end|>"], pad_token_id=q["<|endoftext|>"])
        vision.update(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config = cls(text_config=text, vision_config=vision, image_token_id=q["<|image_pad|>"],
                     video_token_id=q["<|video_pad|>"], vision_start_token_id=q["<|vision_start|>"],
                     vision_end_token_id=q["<|vision_end|>"], tie_word_embeddings=True, **extra)
        config.bos_token_id, config.eos_token_id = q["<|endoftext|>"], q["<|im_end|>"]
        config.pad_token_id, config.vision_token_id = q["<|endoftext|>"], q["<|vision_pad|>"]
        return config
    llama = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=ids.get("<s>", 1), eos_token_id=ids.get("</s>", 2),
                 pad_token_id=ids.get("<pad>", 0))
    if smoke:
        llama.update(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
    if spec.family == "llama":
        return LlamaConfig(**llama)
    if spec.family != "llava":
        raise ValueError(f"unknown model family {spec.family!r}")
    if not smoke:
        llama["vocab_size"] = 32064
    clip = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                layer_norm_eps=1e-5)
    if smoke:
        clip.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                    projection_dim=32)
    config = LlavaConfig(vision_config=clip, text_config=dict(model_type="llama", **llama),
                         image_token_index=ids.get("<image>", 32000), projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    config.pad_token_id = llama["pad_token_id"]
    return config


def model_class(spec: ModelSpec):
    from transformers import (LlamaForCausalLM, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

    return {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "llama": LlamaForCausalLM, "llava": LlavaForConditionalGeneration}[spec.family]


def auto_class(spec: ModelSpec):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if spec.vision else AutoModelForCausalLM


def count_parameters(spec: ModelSpec, smoke: bool = False, vocab: int = 1000) -> int:
    """Parameters of the model built from ``build_config`` (on the meta device: no memory, no init)."""
    import torch

    with torch.device("meta"):
        model = model_class(spec)(build_config(spec, smoke=smoke, vocab=vocab))
    return model.num_parameters()


# ----------------------------------------------------------------------------------------------
# prompts, tokenizer, checkpoint folder


def make_items(work_dir: str, smoke: bool):
    """The fixture dataset (60 items with drawn images) and its ItemStore."""
    from recbole_mm.data.fixtures import FixtureSpec, make_fixture
    from recbole_mm.data.item_store import ItemStore

    folder = make_fixture(work_dir, "gpusuite", FixtureSpec(n_users=4, n_items=60, image_size=32 if smoke else 168))
    with open(folder / "gpusuite.items.jsonl", encoding="utf-8") as f:
        tokens = [json.loads(line)["item_id"] for line in f if line.strip()]
    return ItemStore(folder, tokens, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS)


def make_requests(n_items: int, n: int, seed: int = 0):
    """``n`` (history, candidates, answer position) triples: 25 history items and 25 other candidates.
    Every history ends with item 0 (the most recent item: the one LLaVA-1.5 sees as an image)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        perm = (torch.randperm(n_items - 1, generator=g) + 1).tolist()
        history = perm[:MAX_HISTORY - 1] + [ANCHOR_ITEM]
        cands = torch.tensor(perm[MAX_HISTORY - 1:MAX_HISTORY - 1 + N_CANDIDATES])
        out.append((history, cands, int(torch.randint(N_CANDIDATES, (1,), generator=g))))
    return out


def tokenizer_texts(store) -> list[str]:
    from recbole_mm.lmm import prompts
    from recbole_mm.lmm.prompts import PromptSettings, build_prompt

    settings = PromptSettings(max_history=MAX_HISTORY, attr_max_tokens=None)
    texts = []
    for history, cands, _ in make_requests(len(store), 8, seed=1):
        items = [{"attributes": store.attributes(i), "image": None} for i in history + cands.tolist()]
        texts.append(build_prompt(items[:MAX_HISTORY], items[MAX_HISTORY:], settings).text_only())
    # the answers of the generation baselines, so that ", B" is two tokens as in real vocabularies
    answers = [", ".join(prompts.LETTERS[:N_CANDIDATES])] * 8
    return texts + answers + [str(store.attributes(i).get("title", "")) for i in store.item_ids()]


def write_checkpoint(spec: ModelSpec, out_dir: str, texts: list[str], smoke: bool, device: str,
                     layers: int | None = None) -> int:
    """Write config, random weights, tokenizer and processor of ``spec`` to ``out_dir``; returns the
    parameter count (checked against the published one for full-size models)."""
    import torch

    from recbole_mm.lmm.tiny_models import QWEN2_VL_CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

    tokenizer = train_tokenizer(texts, 1000 if smoke else 8000)
    template = QWEN2_VL_CHAT_TEMPLATE
    if spec.family == "llava":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        template = template.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
    tokenizer.chat_template = template
    names = SPECIAL_TOKENS + (["<image>"] if spec.family == "llava" else [])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
    if len(set(ids.values())) != len(ids) or max(ids.values()) >= len(tokenizer):
        raise RuntimeError(f"special tokens did not get distinct ids: {ids}")
    ids.update({"<s>": ids["<|endoftext|>"], "</s>": ids["<|im_end|>"], "<pad>": ids["<|endoftext|>"]})
    config = build_config(spec, smoke=smoke, ids=ids, vocab=max(1000, len(tokenizer)), layers=layers)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = auto_class(spec).from_config(config, dtype=dtype)
    n_params = model.num_parameters()
    if not smoke and not layers and n_params != PUBLISHED_PARAMS[spec.key]:
        raise RuntimeError(f"{spec.key}: built {n_params:,} parameters, the published checkpoint has "
                           f"{PUBLISHED_PARAMS[spec.key]:,}: fix build_config in benchmarks/gpu_suite.py")
    model.save_pretrained(out_dir)
    del model
    tokenizer.save_pretrained(out_dir)
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        # the processor's parts as Qwen2VLProcessor lays them out (its save_pretrained needs torchvision)
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        except ImportError:  # transformers without the split PIL image processors
            from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

        Qwen2VLImageProcessorPil(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, patch_size=14,
                                 temporal_patch_size=2, merge_size=2).save_pretrained(out_dir)
        name = "Qwen2VLProcessor" if spec.family == "qwen2_vl" else "Qwen2_5_VLProcessor"
        with open(os.path.join(out_dir, "processor_config.json"), "w", encoding="utf-8") as f:
            json.dump({"processor_class": name}, f)
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    elif spec.family == "llava":
        from transformers import LlavaProcessor
        try:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        except ImportError:  # transformers without the split PIL image processors
            from transformers import CLIPImageProcessor as CLIPImageProcessorPil

        size = config.vision_config.image_size
        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1,
                       vision_feature_select_strategy="default", chat_template=template).save_pretrained(out_dir)
    return n_params


class OneImageStore:
    """An ItemStore view that shows one item's image only (LLaVA-1.5 takes one image per prompt)."""

    def __init__(self, store, item_id: int):
        self.store, self.item_id = store, item_id

    def attributes(self, item_id):
        return self.store.attributes(item_id)

    def image(self, item_id):
        return self.store.image(item_id) if item_id == self.item_id else None


# ----------------------------------------------------------------------------------------------
# timing and budget


class Budget:
    """Time left of ``budget_s`` (None: unlimited); ``fits(cost)`` says whether a phase of the
    expected cost still fits. ``clock`` is injectable for tests."""

    def __init__(self, budget_s: float | None, clock=time.monotonic):
        self.clock, self.start, self.budget_s = clock, clock(), budget_s

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (self.clock() - self.start)

    def fits(self, expected_s: float) -> bool:
        return expected_s <= self.left()


def expected_cost(phase: str, n_params: int, reps: int = 1, tokens: int = 1) -> float:
    """Expected seconds of ``reps`` repetitions of a phase (``tokens`` new tokens for generation)."""
    fixed, per_b = EXPECTED_S[phase]
    return (fixed + per_b * n_params / 1e9) * reps * tokens


def expected_total(specs, precisions, reps: int, gen_reps: int, answer_tokens=(50, 150)) -> float:
    """Expected seconds of a whole run (the cost model above): what --budget_s is sized from."""
    total = 0.0
    for spec in specs:
        n = PUBLISHED_PARAMS[spec.key]
        total += expected_cost("build", n)
        for _ in precisions:
            total += expected_cost("load", n) + expected_cost("train", n, reps + 1)
            total += expected_cost("eval", n, reps + 1) + expected_cost("verbalizer", n, reps + 1)
            total += sum(expected_cost(k, n, gen_reps, tokens=t + 2) for k, t in zip(("letters", "titles"), answer_tokens))
    return total


class Meter:
    """Wall clock with CUDA synchronised before each reading, and the peak GPU memory of a phase."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None

    def median_time(self, fn, reps: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = self.now()
            fn()
            times.append(self.now() - start)
        return statistics.median(times)


def autocast(device: str):
    """bf16 autocast on CUDA, nothing on the CPU (as the ranker trainer does)."""
    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------
# one backbone in one precision


def measure(spec: ModelSpec, folder: str, precision: str, store, requests, args, device: str, budget: Budget,
            n_params: int, row: dict, save) -> None:
    """Fill ``row`` with the measurements of ``spec`` in ``precision``; ``save()`` after each phase."""
    import torch

    from recbole_mm.lmm.backbone import BackboneSettings, load_backbone
    from recbole_mm.lmm.prompts import PromptSettings
    from recbole_mm.lmm.candidate_ranker import LMMRanker
    from recbole_mm.lmm.prompts import index_letters
    from recbole_mm.lmm.verbalizer import end_of_turn_token, score_candidates

    meter = Meter(device)
    skipped = row.setdefault("skipped", [])

    def phase(name, cost) -> bool:
        row["phase"] = name
        if budget.fits(cost):
            return True
        skipped.append(name)
        save()
        return False

    if not phase("load", expected_cost("load", n_params)):
        return
    meter.reset_peak()
    start = meter.now()
    backbone = load_backbone(BackboneSettings(
        name_or_path=folder, quantization="4bit" if precision == "nf4" else "none", dtype="bfloat16",
        lora_r=8, lora_alpha=16, lora_dropout=0.05, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS))
    if not backbone.quantized:
        backbone.model.to(device)
    row.update(load_s=meter.now() - start, load_peak_gib=meter.peak_gib(), quantized=backbone.quantized,
               lora_layers=len(backbone.lora_targets), trainable_share=backbone.trainable_share,
               linear4bit=sum(type(m).__name__ == "Linear4bit" for m in backbone.model.modules()))
    save()
    history0 = requests[0][0]
    view = OneImageStore(store, ANCHOR_ITEM) if spec.one_image else store
    settings = PromptSettings(max_history=args.history, attr_max_tokens=32, variant="full")
    ranker = LMMRanker(backbone, view, settings, device=device)
    model = ranker.model
    text, images = ranker.render(history0, requests[0][1].tolist())
    encoded = ranker.encode([text], [images])
    row.update(prompt_tokens=int(encoded["input_ids"].shape[1]), images_per_prompt=len(images))
    try:
        if phase("train", expected_cost("train", n_params, args.reps + 1)):
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
            model.train()
            history, cands, pos = requests[0]

            def step():
                with autocast(device):
                    loss = ranker.loss([history], cands.unsqueeze(0), torch.tensor([pos]))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{spec.key} {precision}: training loss is {loss.item()}")

            meter.reset_peak()
            row["train_step_s"] = meter.median_time(step, args.reps)
            row["train_peak_gib"] = meter.peak_gib()
            row["train_prompts_per_s"] = 1.0 / row["train_step_s"]
            del opt, params
            save()
        model.eval()
        if phase("eval", expected_cost("eval", n_params, args.reps + 1)):
            batch = requests[:args.eval_batch]
            hists, cand_rows = [r[0] for r in batch], torch.stack([r[1] for r in batch])
            scores = []

            def evaluate():
                with torch.no_grad(), autocast(device):
                    scores.append(ranker.score(hists, cand_rows))

            meter.reset_peak()
            row["eval_batch_s"] = meter.median_time(evaluate, args.reps)
            row["eval_peak_gib"] = meter.peak_gib()
            row["eval_prompts_per_s"] = len(batch) / row["eval_batch_s"]
            row["eval_scores_shape"] = list(scores[-1].shape)
            row["eval_images"] = sum(len(ranker.render(h, c.tolist())[1]) for h, c in zip(hists, cand_rows))
            save()
        # verbalizer vs generation on the same encoded prompt
        letters = index_letters(N_CANDIDATES)
        letter_ids = ranker.letter_ids(text, N_CANDIDATES)
        eot = end_of_turn_token(ranker.tokenizer)
        titles = "\n".join(str(store.attributes(i).get("title", "")) for i in requests[0][1].tolist())
        answers = {"letters": ", ".join(letters) + eot, "titles": titles + eot}
        if phase("verbalizer", expected_cost("verbalizer", n_params, args.reps + 1)):
            def verbalize():
                with torch.no_grad(), autocast(device):
                    out = score_candidates(model, encoded, letter_ids)
                if out.shape != (1, N_CANDIDATES):
                    raise RuntimeError(f"verbalizer scores have shape {tuple(out.shape)}")

            meter.reset_peak()
            row["verbalizer_s"] = meter.median_time(verbalize, args.reps)
            row["verbalizer_peak_gib"] = meter.peak_gib()
            save()
        for kind, answer in answers.items():
            n = len(ranker.tokenizer(answer, add_special_tokens=False)["input_ids"])
            if not phase(kind, expected_cost(kind, n_params, args.gen_reps, tokens=n + 2)):  # + warm-up
                continue
            new = []

            def generate(n_new=n):
                with torch.no_grad(), autocast(device):
                    out = model.generate(**encoded, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                         use_cache=True, pad_token_id=ranker.tokenizer.pad_token_id)
                new.append(int(out.shape[1] - encoded["input_ids"].shape[1]))

            generate(2)  # warm-up (kernels, cache allocation)
            new.clear()
            meter.reset_peak()
            row[f"{kind}_s"] = meter.median_time(generate, args.gen_reps, warmup=0)
            row[f"{kind}_peak_gib"] = meter.peak_gib()
            row[f"{kind}_new_tokens"] = statistics.median(new)
            row[f"{kind}_answer_tokens"] = n
            save()
    finally:
        del model, ranker, backbone
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# results


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the results file is named after the GPU)."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "unknown"


def _f(value, fmt="{:.3f}"):
    return "-" if value is None else fmt.format(value)


def render_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# GPU measurement suite: {env['device']}", "",
             f"Command: `{results['command']}`", "",
             f"{'SMOKE RUN (tiny models on the CPU: tests the machinery, not the numbers). ' if results['smoke'] else ''}"
             f"{'DRY RUN (full widths, %s layers: tests the shapes, not the numbers). ' % results['dry_layers'] if results.get('dry_layers') else ''}"
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, bitsandbytes "
             f"{env['bitsandbytes']}; load average {env['loadavg']}; budget {results['budget_s']} s, "
             f"elapsed {results['elapsed_s']:.0f} s{' (stopped by the budget)' if results['stopped'] else ''}"
             f"{'' if results.get('expected_s') is None else ' (cost model: %.0f s)' % results['expected_s']}. "
             f"Random weights, architecture of the hub checkpoint; LoRA r=8 on every language-model linear layer; "
             f"{N_CANDIDATES} candidates, last {results['history']} history items; times are medians of {results['reps']} "
             f"(generation {results['gen_reps']}), CUDA synchronised; peaks are torch.cuda.max_memory_allocated "
             f"in the phase.", "",
             "| model (method) | parameters | precision | prompt tokens (images) | load s / peak GiB | "
             "train step s / peak GiB | train prompts/s | eval batch s / peak GiB | eval prompts/s | skipped / error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} ({r['method']}) | {r['parameters']:,} | {r['precision']} | "
            f"{r.get('prompt_tokens', '-')} ({r.get('images_per_prompt', '-')}) | "
            f"{_f(r.get('load_s'), '{:.1f}')} / {_f(r.get('load_peak_gib'), '{:.2f}')} | "
            f"{_f(r.get('train_step_s'))} / {_f(r.get('train_peak_gib'), '{:.2f}')} | "
            f"{_f(r.get('train_prompts_per_s'), '{:.2f}')} | "
            f"{_f(r.get('eval_batch_s'))} / {_f(r.get('eval_peak_gib'), '{:.2f}')} | "
            f"{_f(r.get('eval_prompts_per_s'), '{:.2f}')} | "
            f"{'; '.join(r.get('skipped', []) + ([r['error']] if r.get('error') else [])) or '-'} |")
    lines += ["", "Verbalizer (one forward pass) vs greedy generation of the ranked letters and of the titles, "
                  "same encoded prompt, batch 1:", "",
              "| model | precision | verbalizer s | letters s (new tokens) | letters / verbalizer | "
              "titles s (new tokens) | titles / verbalizer |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        v = r.get("verbalizer_s")
        cells = []
        for kind in ("letters", "titles"):
            t = r.get(f"{kind}_s")
            cells.append(f"{_f(t, '{:.3f}')} ({r.get(f'{kind}_new_tokens', '-')})")
            cells.append(f"{t / v:.1f}x" if t is not None and v else "-")
        lines.append(f"| {r['model']} | {r['precision']} | {_f(v, '{:.4f}')} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (issue 21): " + "; ".join(goal_lines(results["rows"]))]
    return "\n".join(lines) + "\n"


def goal_lines(rows: list[dict]) -> list[str]:
    """The two goals on Qwen2-VL-2B: verbalizer >= 10x faster than letter generation, NF4 peak < bf16 / 2."""
    by = {(r["model"], r["precision"]): r for r in rows}
    out = []
    for precision in PRECISIONS:
        r = by.get(("qwen2-vl-2b", precision), {})
        if r.get("verbalizer_s") and r.get("letters_s"):
            ratio = r["letters_s"] / r["verbalizer_s"]
            out.append(f"Qwen2-VL-2B {precision} verbalizer {ratio:.1f}x faster than letter generation "
                       f"({'met' if ratio >= 10 else 'NOT met'}, goal >= 10x)")
    q, b = by.get(("qwen2-vl-2b", "nf4"), {}), by.get(("qwen2-vl-2b", "bf16"), {})
    if q.get("train_peak_gib") and b.get("train_peak_gib"):
        ratio = q["train_peak_gib"] / b["train_peak_gib"]
        out.append(f"Qwen2-VL-2B training peak NF4 / bf16 = {ratio:.2f} ({'met' if ratio < 0.5 else 'NOT met'}, "
                   f"goal < 0.5)")
    return out or ["not measured"]


def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = "n/a"
    name = (torch.cuda.get_device_name() if device.startswith("cuda")
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": name, "torch": torch.__version__, "transformers": version("transformers"),
            "peft": version("peft"), "bitsandbytes": version("bitsandbytes"), "python": platform.python_version(),
            "loadavg": load}


def _error(phase: str, e: BaseException) -> str:
    import traceback

    traceback.print_exception(e)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{phase}: {type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def _write(path: str, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def scratch_dir(requested: str | None, need_bytes: int) -> str:
    """``requested``, else /dev/shm when it has room for the largest checkpoint, else the temp dir."""
    if requested:
        os.makedirs(requested, exist_ok=True)
        return tempfile.mkdtemp(prefix="gpu_suite-", dir=requested)
    base = tempfile.gettempdir()
    if os.path.isdir("/dev/shm"):
        try:
            if shutil.disk_usage("/dev/shm").free > need_bytes:
                base = "/dev/shm"
        except OSError:
            pass
    return tempfile.mkdtemp(prefix="gpu_suite-", dir=base)


# ----------------------------------------------------------------------------------------------
# main


def check_params() -> list[tuple[str, int, int]]:
    """(model, built, published) for the four full-size configs."""
    return [(s.key, count_parameters(s), PUBLISHED_PARAMS[s.key]) for s in MODELS]


def run(args) -> dict:
    import torch

    if args.smoke or (args.dry_layers and not torch.cuda.is_available()):
        device = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device found; run with --smoke on a CPU (tiny models), "
                         "or on a GPU machine (see benchmarks/gpu_suite_device.sh)")
    else:
        device = "cuda"
    budget = Budget(args.budget_s)
    specs = [s for s in MODELS if s.key in args.models]
    env = environment(device)
    kind = "smoke" if args.smoke else f"dry{args.dry_layers}_{gpu_slug(env['device'])}" if args.dry_layers else gpu_slug(env["device"])
    out = args.out or os.path.join(args.out_dir, f"gpu_suite_{kind}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = {"command": "python benchmarks/gpu_suite.py " + " ".join(args.argv), "smoke": args.smoke,
               "dry_layers": args.dry_layers,
               "environment": env, "budget_s": args.budget_s, "history": args.history, "reps": args.reps, "gen_reps": args.gen_reps,
               "elapsed_s": 0.0, "stopped": False,
               "expected_s": None if args.smoke else expected_total(specs, args.precisions, args.reps, args.gen_reps), "rows": [], "published_params": PUBLISHED_PARAMS}

    def save():
        results["elapsed_s"] = budget.clock() - budget.start
        results["stopped"] = any(r.get("skipped") for r in results["rows"])
        _write(out + ".json", json.dumps(results, indent=2) + "\n")
        _write(out + ".md", render_markdown(results))

    need = 0 if args.smoke or args.dry_layers else 2 * max(PUBLISHED_PARAMS[s.key] for s in specs) + (1 << 30)
    work = scratch_dir(args.work_dir, need)
    try:
        store = make_items(os.path.join(work, "data"), args.smoke)
        texts = tokenizer_texts(store)
        requests = make_requests(len(store), max(args.eval_batch, 1))
        for spec in specs:
            n_params = 0 if args.smoke else PUBLISHED_PARAMS[spec.key]  # smoke: the floor cost
            rows = [{"model": spec.key, "checkpoint": spec.checkpoint, "method": spec.method, "precision": p,
                     "parameters": n_params} for p in args.precisions]
            results["rows"] += rows
            if not budget.fits(expected_cost("build", n_params)):
                for r in rows:
                    r["skipped"] = ["build"]
                save()
                continue
            folder = os.path.join(work, spec.key)
            try:
                start = time.perf_counter()
                try:
                    built = write_checkpoint(spec, folder, texts, args.smoke, device, args.dry_layers)
                except Exception as e:  # one broken model must not cost the others' measurements
                    for r in rows:
                        r["error"] = _error("build", e)
                    save()
                    continue
                finally:
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                for r in rows:
                    r.update(parameters=built, build_s=time.perf_counter() - start)
                save()
                for r in rows:
                    try:
                        measure(spec, folder, r["precision"], store, requests, args, device, budget, built, r, save)
                    except Exception as e:  # e.g. out of memory: record it, go on with the next
                        r["error"] = _error(r.get("phase", "?"), e)
                        save()
                        gc.collect()
                        if device == "cuda":
                            torch.cuda.empty_cache()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render_markdown(results))
    print(f"wrote {out}.md and {out}.json")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (tests the machinery)")
    parser.add_argument("--check_params", action="store_true",
                        help="print the full configs' parameter counts against the published ones and exit")
    parser.add_argument("--budget_s", type=float, default=None, help="stop cleanly when this time is spent")
    parser.add_argument("--models", default=",".join(MODEL_KEYS), help=f"comma-separated subset of {MODEL_KEYS}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="nf4,bf16 or one of them")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    parser.add_argument("--gen_reps", type=int, default=1,
                        help="timed repetitions of each generation (each one averages 50 or ~150 decoding steps)")
    parser.add_argument("--eval_batch", type=int, default=EVAL_BATCH)
    parser.add_argument("--dry_layers", type=int, default=None,
                        help="full widths but only this many layers (a CPU dry run of the real shapes: "
                             "vocabularies, image sizes, vision towers); no parameter check")
    parser.add_argument("--history", type=int, default=MAX_HISTORY,
                        help=f"history items shown in a prompt (PRIME: {MAX_HISTORY}; fewer only to shorten a smoke run)")
    parser.add_argument("--out_dir", default=os.path.join("benchmarks", "results"),
                        help="folder of the results, named gpu_suite_<gpu>.md/.json (gpu_suite_smoke with --smoke)")
    parser.add_argument("--out", default=None, help="results path without extension (overrides --out_dir)")
    parser.add_argument("--work_dir", default=None, help="scratch folder for the checkpoints (default /dev/shm "
                                                         "when it has room, else the temp dir)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for m in args.models:
        if m not in MODEL_KEYS:
            parser.error(f"--models: unknown model {m!r}; choose from {MODEL_KEYS}")
    for p in args.precisions:
        if p not in PRECISIONS:
            parser.error(f"--precisions: unknown precision {p!r}; choose from {list(PRECISIONS)}")
    if args.reps < 1 or args.gen_reps < 1 or args.eval_batch < 1:
        parser.error("--reps, --gen_reps and --eval_batch must be at least 1")
    if not 0 <= args.history <= MAX_HISTORY:
        parser.error(f"--history must be between 0 and {MAX_HISTORY}, got {args.history}")
    if args.dry_layers is not None and args.dry_layers < 1:
        parser.error(f"--dry_layers must be at least 1, got {args.dry_layers}")
    if args.smoke and args.dry_layers:
        parser.error("--smoke and --dry_layers exclude each other")
    if args.budget_s is not None and args.budget_s < 0:
        parser.error(f"--budget_s must be >= 0, got {args.budget_s}")
    return args


def main(argv=None) -> int:
    import signal

    args = parse_args(argv)
    # a run stopped from outside (kill, a timeout) still removes its scratch checkpoints
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.check_params:
        bad = 0
        for key, built, published in check_params():
            bad += built != published
            print(f"{key:15s} built {built:>14,}  published {published:>14,}  {'ok' if built == published else 'MISMATCH'}")
        specs = [s for s in MODELS if s.key in args.models]
        print(f"expected GPU run time with these options: "
              f"{expected_total(specs, args.precisions, args.reps, args.gen_reps):.0f} s")
        return 1 if bad else 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
