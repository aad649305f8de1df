"""Load an LMM backbone: vision-language (image-text-to-text) or text-only causal LM, optionally
4-bit NF4 (QLoRA), with LoRA adapters on the language model's linear layers only.

One code path for hub ids, local checkpoint folders, packaged GGUF files and the small local model
(:mod:`recbole_mm.lmm.tiny_models`); :func:`build_backbone` is what a model's trainer calls. transformers / peft / bitsandbytes are imported inside functions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from recbole_mm.errors import ConfigError, UserError
from recbole_mm.lmm.defaults import lmm_default

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "4bit", "none")
DTYPES = ("auto", "bfloat16", "float16", "float32")

# Path components that belong to the vision / audio side, the projector or the output head:
# never LoRA targets (the language model's linear layers only).
EXCLUDED_COMPONENTS = {
    "visual", "vision_tower", "vision_model", "vision_encoder", "vision_embed_tokens", "image_encoder",
    "multi_modal_projector", "mm_projector", "merger", "connector", "resampler", "vision_resampler",
    "audio_tower", "audio_model", "lm_head", "embed_out", "output_layer", "image_newline",
}

# Model types whose image processor takes min_pixels / max_pixels (Qwen-VL family).
_PIXEL_LIMIT_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni")


class BackboneLoadError(UserError, OSError):
    """The backbone could not be found or read (no network, offline mode, missing directory)."""


def _shipped(key: str):
    """A dataclass default read from properties/model/_lmm.yaml (the one place defaults live)."""
    return field(default_factory=lambda: lmm_default(key))


@dataclass
class BackboneSettings:
    """What :func:`load_backbone` loads: checkpoint, precision/quantization, LoRA and image limits.

    Unset fields take the shipped defaults of ``properties/model/_lmm.yaml``; :meth:`from_config`
    takes them from a run's config (the same keys, maybe overridden).
    """

    name_or_path: str = _shipped("ranker_model")
    quantization: str = _shipped("ranker_quantization")  # auto = 4-bit NF4 only with CUDA; '4bit' | 'none'
    dtype: str = _shipped("ranker_dtype")   # auto = bfloat16 on CUDA (float16 without bf16), float32 on CPU
    lora_r: int = _shipped("lora_r")        # <= 0: no LoRA (frozen backbone)
    lora_alpha: int = _shipped("lora_alpha")
    lora_dropout: float = _shipped("lora_dropout")
    lora_targets: Any = "all-linear"  # 'all-linear' or a list of module-name suffixes (e.g. ['q_proj', 'v_proj'])
    trust_remote_code: bool = _shipped("trust_remote_code")
    gradient_checkpointing: bool = _shipped("gradient_checkpointing")
    min_pixels: int | None = None     # processor image-size limits (Qwen-VL family); None: the processor's
    max_pixels: int | None = None
    cache_dir: str | None = None      # where a .gguf model's dequantized copy is kept (see lmm/gguf.py)

    @classmethod
    def from_config(cls, config, **overrides) -> "BackboneSettings":
        """The settings of a run: ``ranker_model``, ``ranker_quantization``, ``ranker_dtype``, LoRA,
        ``trust_remote_code``, ``gradient_checkpointing``, the image budget and ``artifacts_dir``
        (the cache of a .gguf model's dequantized copy); ``overrides`` replace fields."""
        values = dict(name_or_path=config["ranker_model"], quantization=config["ranker_quantization"],
                      dtype=config["ranker_dtype"], lora_r=config["lora_r"], lora_alpha=config["lora_alpha"],
                      lora_dropout=config["lora_dropout"], trust_remote_code=config["trust_remote_code"],
                      gradient_checkpointing=config["gradient_checkpointing"],
                      min_pixels=config["image_min_pixels"], max_pixels=config["image_max_pixels"],
                      cache_dir=config["artifacts_dir"])
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.lora_targets, str) and self.lora_targets != "all-linear":
            self.lora_targets = [self.lora_targets]


@dataclass
class Backbone:
    """A loaded backbone: the (LoRA-wrapped) model with its processor/tokenizer and how it was loaded."""

    model: Any
    processor: Any            # None for text-only models
    tokenizer: Any
    is_vision: bool
    trainable_share: float
    settings: BackboneSettings | None = None
    lora_targets: list[str] = field(default_factory=list)
    quantized: bool = False


# ----------------------------------------------------------------------------------------------
# resolution helpers


def _load_error(name: str, cause: BaseException | None, local: bool) -> BackboneLoadError:
    what = (f"local checkpoint directory {name!r} was not found or is incomplete" if local else
            f"could not load the model {name!r} from the Hugging Face hub "
            f"(no network, HF_HUB_OFFLINE set, or not in the local cache)")
    hint = ("Point `ranker_model` (BackboneSettings.name_or_path) to a local checkpoint directory "
            "(a folder with config.json and the weights, e.g. /path/to/Qwen2-VL-2B-Instruct, downloaded "
            "beforehand with `huggingface-cli download`), or use the small local model with "
            "`ranker_model: small` (built from the dataset, no download).")
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return BackboneLoadError(f"{what}{detail}. {hint}")


def resolve_dtype(dtype: str, cuda: bool | None = None):
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if dtype == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def resolve_quantization(quantization: str, cuda: bool | None = None) -> bool:
    """True when the model is loaded in 4-bit."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    return quantization == "4bit" or (quantization == "auto" and cuda)


def is_vision_config(config) -> bool:
    """Whether a config describes an image-text-to-text model (vs a text-only causal LM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    auto_map = getattr(config, "auto_map", None) or {}
    if any(k in auto_map for k in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")):
        return True
    if "AutoModelForCausalLM" in auto_map:
        return getattr(config, "vision_config", None) is not None
    model_type = getattr(config, "model_type", "")
    if getattr(config, "vision_config", None) is not None:
        return True
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# ----------------------------------------------------------------------------------------------
# LoRA targets


def _excluded(name: str) -> bool:
    for comp in name.split("."):
        if comp in EXCLUDED_COMPONENTS or comp.startswith(("vision", "visual")) or "projector" in comp:
            return True
    return False


def language_linear_names(model) -> list[str]:
    """Full names of the linear layers (nn.Linear, bitsandbytes Linear4bit/8bit, Conv1D) of the
    language model: the vision tower, the multimodal projector / merger and lm_head excluded."""
    import torch.nn as nn

    linear_types: tuple = (nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # bitsandbytes missing or broken: plain layers only
        pass
    names = []
    for name, module in model.named_modules():
        if not name or _excluded(name):
            continue
        if isinstance(module, linear_types) or type(module).__name__ == "Conv1D":
            names.append(name)
    return names


def lora_target_modules(model, targets="all-linear") -> list[str]:
    """Full module names for LoRA: every language-model linear layer, or those whose name ends with
    one of the given suffixes."""
    names = language_linear_names(model)
    if targets != "all-linear":
        suffixes = [targets] if isinstance(targets, str) else list(targets)
        names = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        raise ConfigError(f"no LoRA target modules found in the language model for lora_targets={targets!r}")
    return names


def trainable_share(model) -> tuple[int, int, float]:
    """(trainable, total, share); 4-bit weights are counted by their logical size (as peft does)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = total = 0
        for p in model.parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":
                n *= 2
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total, (trainable / total if total else 0.0)


# ----------------------------------------------------------------------------------------------
# processor


def _apply_pixel_limits(image_processor, min_pixels, max_pixels):
    if min_pixels is None and max_pixels is None:
        return
    size = getattr(image_processor, "size", None)
    if size is not None and ("shortest_edge" in size or "longest_edge" in size):
        new = dict(size)
        if min_pixels is not None:
            new["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            new["longest_edge"] = int(max_pixels)
        image_processor.size = type(size)(**new) if not isinstance(size, dict) else new
    for attr, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and hasattr(image_processor, attr):
            setattr(image_processor, attr, int(value))


def _read_chat_template(path: str, tokenizer) -> str | None:
    if os.path.isdir(path):
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        js = os.path.join(path, "chat_template.json")
        if os.path.isfile(js):
            with open(js, encoding="utf-8") as f:
                return json.load(f).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _processor_without_video(path: str, config, hub_kwargs: dict):
    """The model's processor built from its image processor and tokenizer, with no video processor.

    transformers' Qwen2-VL-style processors insist on a video processor, which needs torchvision;
    ranking uses images only, so without torchvision we build the processor with video_processor=None.
    """
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    cls = PROCESSOR_MAPPING[type(config)]
    image_processor = AutoImageProcessor.from_pretrained(path, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    sub = type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                      "__module__": cls.__module__})
    parts = {name: None for name in cls.get_attributes()}
    parts.update(image_processor=image_processor, tokenizer=tokenizer)
    return sub(**parts, chat_template=_read_chat_template(path, tokenizer))


def load_processor(path: str, config, settings: BackboneSettings, hub_kwargs: dict):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, **hub_kwargs)
    except (ImportError, AttributeError) as e:
        if "torchvision" not in str(e).lower() and "video" not in str(e).lower():
            raise
        logger.warning("torchvision is not installed: building %s's processor without a video processor",
                       path)
        processor = _processor_without_video(path, config, hub_kwargs)
    if getattr(config, "model_type", "") in _PIXEL_LIMIT_TYPES:
        _apply_pixel_limits(processor.image_processor, settings.min_pixels, settings.max_pixels)
    elif settings.min_pixels is not None or settings.max_pixels is not None:
        logger.info("min_pixels/max_pixels ignored for model type %s", getattr(config, "model_type", "?"))
    return processor


# ----------------------------------------------------------------------------------------------
# loading


def _cpu_4bit_skip_modules(auto_cls, config, blocksize: int = 64) -> list[str] | None:
    """Modules to keep unquantized when loading in 4-bit on CPU.

    bitsandbytes' CPU 4-bit kernel needs in_features to be a multiple of the quantization block size
    (64); real checkpoints always satisfy this, tiny test models may not (e.g. a 32-wide vision
    tower). Those layers stay in full precision; transformers' default skips (lm_head, ...) are kept.
    Returns None (= transformers' defaults) when there is nothing extra to skip.
    """
    import torch
    import torch.nn as nn

    try:
        with torch.device("meta"):
            skeleton = auto_cls.from_config(config)
    except Exception:  # remote code or exotic config: fall back to the defaults
        return None
    extra = [name for name, m in skeleton.named_modules()
             if isinstance(m, nn.Linear) and m.in_features % blocksize]
    if not extra:
        return None
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # transformers < 5
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert
    defaults = list(get_keys_to_not_convert(skeleton))
    logger.info(f"4-bit on CPU: {len(extra)} linear layers with in_features not a multiple of {blocksize} "
                f"stay unquantized")
    return sorted(set(defaults) | set(extra))


def load_backbone(settings: BackboneSettings) -> Backbone:
    """Load model (+ processor / tokenizer), quantize if asked, add LoRA to the language model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    name = str(settings.name_or_path)
    if name == "small":
        raise BackboneLoadError("'small' names the small local model, which must be built first: "
                                "recbole_mm.lmm.tiny_models.build_tiny_vlm(out_dir, texts) returns the folder to load")
    from recbole_mm.lmm.gguf import dequantized_folder, is_gguf_name
    from recbole_mm.lmm.hub import locate

    if is_gguf_name(name):  # 'smollm2' or a .gguf file: load its dequantized copy (made on first use)
        name = dequantized_folder(name, settings.cache_dir)
    path, hub_kwargs, local, missing = locate(name, settings.trust_remote_code)
    if missing:
        raise _load_error(name, None, local=True)
    try:
        config = AutoConfig.from_pretrained(path, **hub_kwargs)
    except OSError as e:
        raise _load_error(name, e, local=local) from e

    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(settings.dtype, cuda)
    quantized = resolve_quantization(settings.quantization, cuda)
    vision = is_vision_config(config)
    model_kwargs = dict(hub_kwargs, config=config)
    model_kwargs[_dtype_kwarg()] = dtype
    if quantized:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if (dtype == torch.float32 or dtype == torch.bfloat16) else dtype
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        model_kwargs["device_map"] = {"": torch.cuda.current_device() if cuda else "cpu"}

    auto_cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    if quantized and not cuda:
        skip = _cpu_4bit_skip_modules(auto_cls, config)
        if skip is not None:
            model_kwargs["quantization_config"].llm_int8_skip_modules = skip
    try:
        model = auto_cls.from_pretrained(path, **model_kwargs)
        if vision:
            processor = load_processor(path, config, settings, hub_kwargs)
            tokenizer = processor.tokenizer
        else:
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    except OSError as e:
        raise _load_error(name, e, local=local) from e

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    model.config.use_cache = False

    targets: list[str] = []
    if settings.lora_r and settings.lora_r > 0:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        gc_kwargs = {"use_reentrant": False}
        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=gc_kwargs)
        elif settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
        targets = lora_target_modules(model, settings.lora_targets)
        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    trainable, total, share = trainable_share(model)
    logger.info(f"backbone {name}: {'vision-language' if vision else 'text-only'}, "
                f"{'4-bit NF4' if quantized else str(dtype).replace('torch.', '')}, LoRA r={settings.lora_r} on "
                f"{len(targets)} language-model linear layers: trainable {trainable:,} / {total:,} "
                f"parameters ({100 * share:.3f}%)")
    return Backbone(model=model, processor=processor, tokenizer=tokenizer, is_vision=vision,
                    trainable_share=share, settings=settings, lora_targets=targets, quantized=quantized)


# ----------------------------------------------------------------------------------------------
# one way to build a run's backbone


def small_model_folder(config, texts: list[str], kind: str = "vlm") -> str:
    """Where ``ranker_model: small`` is built: ``<artifacts_dir>/small-<kind>-<fingerprint of size and texts>``
    (``kind``: ``vlm``, or ``lm`` for the text-only model)."""
    from recbole_mm.files import fingerprint

    return os.path.join(config["artifacts_dir"], f"small-{kind}-{fingerprint(config['ranker_small'], texts)}")


def resolve_backbone_name(config, store, text_only: bool = False) -> str:
    """``ranker_model`` as something :func:`load_backbone` reads: a hub id, a local folder, ``smollm2``
    or a .gguf file pass through (the gguf ones are dequantized by ``load_backbone``); ``small`` is the
    tiny Qwen2-VL-architecture model built (once, then reused) from the store's item texts, or with
    ``text_only`` the tiny Qwen2 causal LM (a model that never shows images, e.g. ALMOSTREC)."""
    name = str(config["ranker_model"])
    if name != "small":
        return name
    from recbole_mm.lmm.tiny_models import build_tiny_causal_lm, build_tiny_vlm

    texts = [json.dumps(store.attributes(i), ensure_ascii=False) for i in range(1, len(store))]
    if text_only:
        return build_tiny_causal_lm(small_model_folder(config, texts, "lm"), texts, seed=config["seed"],
                                    **config["ranker_small"])
    return build_tiny_vlm(small_model_folder(config, texts), texts, seed=config["seed"],
                          min_pixels=config["image_min_pixels"], max_pixels=config["image_max_pixels"],
                          **config["ranker_small"])


def place(backbone: Backbone, device) -> Backbone:
    """The one device rule: a 4-bit model stays where bitsandbytes put it (its ``device_map``);
    any other model moves to ``device``."""
    if not backbone.quantized:
        backbone.model.to(device)
    return backbone


def build_backbone(config, store, device="cpu", text_only: bool = False, **overrides) -> Backbone:
    """A run's backbone with LoRA, on ``device``: ``ranker_model`` resolved
    (:func:`resolve_backbone_name`), loaded with :meth:`BackboneSettings.from_config`, placed by
    :func:`place`. ``text_only``: ``small`` is the tiny text-only causal LM.

    The seed is set again (``seed``, ``reproducibility``) right before loading, so that LoRA's
    initial weights (and the training after them) depend on the stage's settings only, not on
    whether an earlier stage trained or the small model was built in this process. ``overrides``
    replace :class:`BackboneSettings` fields (e.g. MLLM4Rec's ``lora_targets``).
    """
    from recbole.utils import init_seed

    name = resolve_backbone_name(config, store, text_only)
    init_seed(config["seed"], config["reproducibility"])
    return place(load_backbone(BackboneSettings.from_config(config, **{"name_or_path": name, **overrides})), device)
