"""Tiny local models built from a config (no hub, no download).

:func:`build_tiny_vlm` writes a randomly initialised (seeded) Qwen2-VL-architecture model with a
byte-level BPE tokenizer trained on the dataset's item text, Qwen2-VL's special tokens and chat
template, and a ``Qwen2VLProcessor``; :func:`build_tiny_causal_lm` does the same for a text-only
Qwen2 causal LM; :func:`build_tiny_clip` a CLIP vision tower with projection (VLM4Rec's image
encoder) and :func:`build_tiny_text_encoder` a BERT sentence encoder. All save with ``save_pretrained`` into a folder that loads through
:func:`recbole_mm.lmm.backbone.load_backbone` exactly like a real checkpoint. A folder that already
holds a complete build with the same arguments and texts is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterable

from recbole_mm.errors import ConfigError
from recbole_mm.files import build_atomically

logger = logging.getLogger(__name__)

MARKER = "recbole_mm_small.json"
BUILD_VERSION = 1

# Qwen2 / Qwen2-VL special tokens, in the order of the real vocabulary (151643 .. 151656).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2's pre-tokenizer split pattern (tokenizer.json of the Qwen2 family).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The chat template of Qwen2-VL-*-Instruct (it also accepts plain string content).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def texts_fingerprint(texts: Iterable[str]) -> str:
    """sha256 of the texts (order matters) and their count."""
    h = hashlib.sha256()
    n = 0
    for t in texts:
        h.update(str(t).encode("utf-8"))
        h.update(b"\x00")
        n += 1
    h.update(str(n).encode())
    return h.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int, *, model_max_length: int = 32768):
    """A byte-level BPE tokenizer trained on ``texts`` with Qwen2's pre-tokenizer, special tokens
    (ids after the BPE vocabulary, in Qwen2's order) and the Qwen2-VL chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe_size = max(vocab_size - len(SPECIAL_TOKENS), 256 + 1)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([str(t) for t in texts], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        unk_token=None, model_max_length=model_max_length, padding_side="right",
        clean_up_tokenization_spaces=False, split_special_tokens=False)
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return fast


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if len(set(ids.values())) != len(ids) or any(i is None for i in ids.values()):
        raise RuntimeError(f"special tokens did not get distinct ids: {ids}")
    return ids


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL splits half the head dim into (temporal, height, width) rotary sections, 1:1.5:1.5."""
    half = head_dim // 2
    hw = (half - half // 4) // 2
    return [half - 2 * hw, hw, hw]






def _seed_everything(seed: int):
    import torch

    torch.manual_seed(seed)


def build_tiny_vlm(out_dir, texts, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    vocab_size: int = 1000, vision_depth: int = 1, vision_embed_dim: int = 32, seed: int = 0,
                    min_pixels: int = 56 * 56, max_pixels: int = 168 * 168) -> str:
    """Build (or reuse) a small Qwen2-VL-architecture model in ``out_dir``; returns its path.

    Random (seeded) weights; tokenizer trained on ``texts`` (the item text). ``out_dir`` then loads
    with ``load_backbone(BackboneSettings(name_or_path=out_dir))`` like a real checkpoint.
    """
    texts = [str(t) for t in texts]
    args = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, vocab_size=vocab_size,
                vision_depth=vision_depth, vision_embed_dim=vision_embed_dim, seed=seed,
                min_pixels=min_pixels, max_pixels=max_pixels)
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ConfigError(f"hidden_size {hidden_size} must split into {num_heads} heads of a multiple of 4")
    meta = {"kind": "qwen2_vl", "version": BUILD_VERSION, "arguments": args,
            "texts_fingerprint": texts_fingerprint(texts), "n_texts": len(texts)}

    def write(tmp: str):
        import torch
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = train_tokenizer(texts, vocab_size)
        ids = _special_ids(tokenizer)
        vocab = max(vocab_size, len(tokenizer))
        head_dim = hidden_size // num_heads
        vision_heads = max(1, vision_embed_dim // 16)
        config = Qwen2VLConfig(
            text_config=dict(
                vocab_size=vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, use_sliding_window=False,
                max_window_layers=num_layers, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": _mrope_section(head_dim)},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"]),
            vision_config=dict(
                depth=vision_depth, embed_dim=vision_embed_dim, hidden_size=hidden_size,
                num_heads=vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        # also on the top level, as in the real checkpoints' config.json
        config.bos_token_id, config.eos_token_id = ids["<|endoftext|>"], ids["<|im_end|>"]
        config.pad_token_id = ids["<|endoftext|>"]
        config.vision_token_id = ids["<|vision_pad|>"]
        _seed_everything(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
        image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                                   patch_size=14, temporal_patch_size=2, merge_size=2)
        model.save_pretrained(tmp)
        # The processor's parts, as Qwen2VLProcessor.save_pretrained lays them out (that call itself
        # needs a video processor, hence torchvision, which ranking does not use).
        image_processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "processor_config.json"), "w", encoding="utf-8") as f:
            json.dump({"processor_class": "Qwen2VLProcessor"}, f, indent=2)
        with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(QWEN2_VL_CHAT_TEMPLATE)

    return build_atomically(out_dir, meta, write)


def build_tiny_causal_lm(out_dir, texts, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                          vocab_size: int = 1000, seed: int = 0) -> str:
    """Build (or reuse) a small text-only Qwen2 causal LM in ``out_dir``; returns its path."""
    texts = [str(t) for t in texts]
    args = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, vocab_size=vocab_size,
                seed=seed)
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} must split into {num_heads} heads")
    meta = {"kind": "qwen2", "version": BUILD_VERSION, "arguments": args,
            "texts_fingerprint": texts_fingerprint(texts), "n_texts": len(texts)}

    def write(tmp: str):
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tokenizer = train_tokenizer(texts, vocab_size)
        ids = _special_ids(tokenizer)
        config = Qwen2Config(
            vocab_size=max(vocab_size, len(tokenizer)), hidden_size=hidden_size,
            intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
            use_sliding_window=False, max_window_layers=num_layers, tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        _seed_everything(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32).eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_atomically(out_dir, meta, write)


def build_tiny_clip(out_dir, *, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                     num_layers: int = 1, num_heads: int = 2, projection_dim: int = 32, seed: int = 0) -> str:
    """Build (or reuse) a random-weight CLIP vision model with projection + its image processor."""
    from recbole_mm.files import build_atomically

    args = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
                num_heads=num_heads, projection_dim=projection_dim, seed=seed)
    meta = {"kind": "clip_vision", "version": 1, "arguments": args, "texts_fingerprint": None}

    def write(tmp: str):
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        from transformers.models.clip import CLIPImageProcessorPil

        config = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 4,
                                  num_hidden_layers=num_layers, num_attention_heads=num_heads, image_size=image_size,
                                  patch_size=patch_size, projection_dim=projection_dim)
        torch.manual_seed(seed)
        CLIPVisionModelWithProjection(config).eval().save_pretrained(tmp)
        CLIPImageProcessorPil(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size}).save_pretrained(tmp)

    return build_atomically(out_dir, meta, write)


def wordpiece_vocab(texts, normalizer, pre_tokenizer, vocab_size: int, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary for the tiny text encoder, the same in every process: the special
    tokens, every character alone and as a ``##`` continuation (so no word is unknown), then the most
    frequent words (ties by the word itself) up to ``vocab_size``.

    Hand-made because tokenizers' ``WordPieceTrainer`` (and ``BpeTrainer`` with a continuation
    prefix) break ties between equally frequent merges differently in each process, so the "same"
    tiny encoder gave other embeddings, and other VLM4Rec results, on every run.
    """
    from collections import Counter

    words = Counter(w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    tokens = list(dict.fromkeys([*specials, *chars, *(f"##{c}" for c in chars)]))
    room = max(0, vocab_size - len(tokens))
    tokens += [w for w, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1][:room]
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_text_encoder(out_dir, texts, *, hidden_size: int = 32, num_layers: int = 1, num_heads: int = 2,
                             vocab_size: int = 500, seed: int = 0) -> str:
    """Build (or reuse) a tiny random BERT with a WordPiece tokenizer trained on ``texts``.

    Saved with ``save_pretrained``; loads through :class:`SentenceEncoder` like a real checkpoint.
    """
    from recbole_mm.files import build_atomically


    texts = [str(t) for t in texts]
    args = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, vocab_size=vocab_size,
                seed=seed)
    meta = {"kind": "bert", "version": 2, "arguments": args, "texts_fingerprint": texts_fingerprint(texts),
            "n_texts": len(texts)}

    def write(tmp: str):
        import torch
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        vocab = wordpiece_vocab(texts or ["empty"], normalizer, pre_tokenizer, vocab_size, specials)
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        tok.decoder = decoders.WordPiece()
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
        config = BertConfig(vocab_size=max(vocab_size, tok.get_vocab_size()), hidden_size=hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            intermediate_size=hidden_size * 2, max_position_embeddings=512,
                            pad_token_id=tok.token_to_id("[PAD]"))
        torch.manual_seed(seed)
        BertModel(config).eval().save_pretrained(tmp)
        fast.save_pretrained(tmp)

    return build_atomically(out_dir, meta, write)
