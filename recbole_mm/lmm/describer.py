"""Item descriptions (VLM4Rec) and captions (MLLM4Rec) written by a vision-language model, cached.

Any image-text-to-text model loads through :func:`recbole_mm.lmm.backbone.load_backbone` (hub id,
local folder, 4-bit on GPU, no LoRA); ``small`` builds the random-weight local Qwen2-VL of
:mod:`recbole_mm.lmm.tiny_models` (gibberish text: for tests and cost measurements only). Each item's
image is shown with a prompt (by default asking for colour, material, style and usage); an item
without an image is described from its text attributes (``missing_image: text``) or skipped
(``skip``). Generation is greedy and batched.

Cache, in the dataset folder (or ``folder``): ``<name>.<tag>.jsonl``, one record per item
``{"item_id": token, <field>: text, "from": "image" | "text"}``, appended and flushed batch by
batch, so an interrupted run keeps every finished batch and the next run describes only the rest;
``<name>.<tag>.meta.json`` records the model and prompts it was made with (a run with other
settings refuses to mix its output into it). When every item is done the JSONL is rewritten once,
atomically, in item order. The default tag ``descriptions`` writes field ``generated_description``;
tag ``captions`` writes field ``caption``, which :class:`~recbole_mm.data.item_store.ItemStore`
merges into the item attributes by default.

Command line (generate or complete a cache, nothing else):
``python -m recbole_mm.lmm.describer --dataset=hm --data_path=dataset/hm --model=llava-hf/llava-v1.6-mistral-7b-hf``
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from recbole_mm.errors import ConfigError, DataFormatError
from recbole_mm.files import write_json, write_jsonl

logger = logging.getLogger(__name__)

CAPTION_PROMPT = "Write a one-sentence caption of this image."  # the describer command's prompt for --tag=captions
TAG_FIELDS = {"descriptions": "generated_description", "captions": "caption"}
MISSING_IMAGE = ("text", "skip")
# free text that is never part of a compact attribute line
FREE_TEXT_FIELDS = ("description", "generated_description", "caption")


def attributes_text(attributes: dict, fields: Sequence[str] | None = None,
                    exclude: Sequence[str] = FREE_TEXT_FIELDS) -> str:
    """``"title. key: value. key: value"``: the title first, then the other attributes (``fields``
    in that order, or every one not in ``exclude``); lists joined by ", ", empty values dropped."""
    def value(v):
        if isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v if x not in (None, ""))
        return "" if v is None else str(v).strip()

    keys = list(fields) if fields is not None else [k for k in attributes if k not in exclude]
    parts = []
    if "title" in keys and value(attributes.get("title")):
        parts.append(value(attributes["title"]))
    parts += [f"{k}: {value(attributes[k])}" for k in keys if k != "title" and value(attributes.get(k))]
    return ". ".join(parts)


class _Fields(dict):
    def __missing__(self, key):
        return ""


def render_prompt(template: str, attributes: dict) -> str:
    """Fill ``{attributes}``, ``{title}`` or any ``{field}`` of the item (missing ones empty)."""
    values = _Fields({k: "" if v is None else str(v) for k, v in attributes.items()})
    values["attributes"] = attributes_text(attributes)
    return template.format_map(values)


#: DescriberSettings field -> config key; the defaults are those of ``properties/model/VLM4Rec.yaml``
CONFIG_KEYS = {
    "model": "describer_model", "prompt": "describer_prompt", "text_prompt": "describer_text_prompt",
    "missing_image": "describer_missing_image", "max_new_tokens": "describer_max_new_tokens",
    "min_new_tokens": "describer_min_new_tokens", "quantization": "describer_quantization",
    "dtype": "describer_dtype", "trust_remote_code": "trust_remote_code", "min_pixels": "image_min_pixels",
    "max_pixels": "image_max_pixels", "batch_size": "describer_batch_size",
}


def yaml_defaults() -> dict:
    """The describer's keys as ``properties/model/VLM4Rec.yaml`` sets them (plus ``description_tag``
    and ``describer_small``): the one place their defaults are written."""
    from importlib import resources

    import yaml

    path = resources.files("recbole_mm.properties") / "model" / "VLM4Rec.yaml"
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    keys = [*CONFIG_KEYS.values(), "description_tag", "describer_small"]
    missing = [k for k in keys if k not in values]
    if missing:
        raise ConfigError(f"{path}: the describer's keys {missing} are missing; restore them (their defaults "
                          f"live in this file only)")
    return {k: values[k] for k in keys}


@dataclass
class DescriberSettings:
    """How descriptions are generated; everything but the batch size, quantization and dtype is part of
    the cache's identity. Build it with :meth:`from_config` (a run's config) or :meth:`defaults` (the
    yaml's values), overriding single fields by keyword."""

    model: str
    prompt: str
    text_prompt: str
    missing_image: str               # text | skip
    max_new_tokens: int
    min_new_tokens: int              # > 0 forces longer outputs (cost measurements with untrained models)
    quantization: str
    dtype: str
    trust_remote_code: bool
    min_pixels: int | None
    max_pixels: int | None
    batch_size: int

    def __post_init__(self):
        if self.missing_image not in MISSING_IMAGE:
            raise ConfigError(f"describer_missing_image must be one of {MISSING_IMAGE}, got {self.missing_image!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("describer_max_new_tokens and describer_batch_size must be >= 1")

    @classmethod
    def from_config(cls, config, **overrides: Any) -> "DescriberSettings":
        """Settings from a RecBole config (or any mapping) holding the keys of :data:`CONFIG_KEYS`;
        keyword arguments (field names) win."""
        unknown = sorted(set(overrides) - set(CONFIG_KEYS))
        if unknown:
            raise TypeError(f"DescriberSettings has no fields {unknown}; fields: {sorted(CONFIG_KEYS)}")
        return cls(**{**{name: config[key] for name, key in CONFIG_KEYS.items()}, **overrides})

    @classmethod
    def defaults(cls, **overrides: Any) -> "DescriberSettings":
        """The yaml's settings (:func:`yaml_defaults`), with ``overrides``."""
        return cls.from_config(yaml_defaults(), **overrides)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("batch_size", "quantization", "dtype")}


class DescriptionCache:
    """The resumable per-item cache described in the module docstring."""

    def __init__(self, folder: str | os.PathLike, name: str, tag: str = "descriptions", field: str | None = None):
        self.folder, self.name, self.tag = Path(folder), name, tag
        self.field = field or TAG_FIELDS.get(tag, tag.rstrip("s"))
        self.path = self.folder / f"{name}.{tag}.jsonl"
        self.meta_path = self.folder / f"{name}.{tag}.meta.json"

    def meta(self) -> dict | None:
        if not self.meta_path.is_file():
            return None
        with open(self.meta_path, encoding="utf-8") as f:
            return json.load(f)

    def load(self) -> dict[str, dict]:
        """Records by item token. A last line cut off by an interruption is dropped (its item is
        described again); any other bad line is an error naming the file and line."""
        records: dict[str, dict] = {}
        if not self.path.is_file():
            return records
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for row, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if row == len(lines):  # no newline after it: the write was interrupted
                    logger.warning(f"{self.path}: dropping the unfinished last line {row}")
                    continue
                raise DataFormatError("not a JSON object", file=self.path, row=row, value=raw[:80],
                                      hint="delete the file to regenerate the descriptions") from None
            if not isinstance(rec, dict) or "item_id" not in rec or self.field not in rec:
                raise DataFormatError(f"record needs 'item_id' and '{self.field}'", file=self.path, row=row,
                                      value=rec, hint="delete the file to regenerate the descriptions")
            records[str(rec["item_id"])] = rec
        return records

    def texts(self) -> dict[str, str]:
        return {t: str(r[self.field]) for t, r in self.load().items()}

    def check_settings(self, identity: dict, has_records: bool) -> None:
        meta = self.meta()
        if meta is not None and has_records and meta.get("settings") != identity:
            raise DataFormatError(
                f"was generated with other describer settings ({json.dumps(meta.get('settings'))[:200]})",
                file=self.path, hint=f"delete {self.path.name} and {self.meta_path.name} to regenerate, or "
                                     f"choose another description_tag / description_dir for the new settings")

    def append(self, records: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                data = f.read()
                if not data.endswith(b"\n"):  # an interrupted write: drop its unfinished line
                    f.truncate(data.rfind(b"\n") + 1)
        with open(self.path, "a", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_meta(self, identity: dict, **info: Any) -> None:
        write_json(self.meta_path, {"tag": self.tag, "field": self.field, "settings": identity, **info})

    def consolidate(self, order: Sequence[str]) -> None:
        """Rewrite the JSONL atomically: one record per item, in ``order``."""
        records = self.load()
        rank = {t: i for i, t in enumerate(order)}
        write_jsonl(self.path, [records[t] for t in sorted(records, key=lambda t: rank.get(t, len(rank)))])


class Describer:
    """Greedy, batched generation of one text per item from a loaded vision-language backbone."""

    def __init__(self, backbone, settings: DescriberSettings, device="cpu"):
        if not backbone.is_vision:
            raise ConfigError(f"describer_model {settings.model!r} is not an image-text-to-text model")
        self.backbone, self.settings, self.device = backbone, settings, device
        self.processor, self.tokenizer = backbone.processor, backbone.tokenizer

    def _text(self, prompt: str, with_image: bool) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def generate(self, items: list[dict]) -> list[str]:
        """``items``: ``{"attributes": dict, "image": PIL | None}``; the image prompt when there is an
        image, else the text prompt. Returns the generated texts (special tokens removed, stripped)."""
        import torch

        s = self.settings
        texts = [self._text(render_prompt(s.prompt if it["image"] is not None else s.text_prompt, it["attributes"]),
                            it["image"] is not None) for it in items]
        images = [it["image"] for it in items if it["image"] is not None]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        try:
            inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = side
        model = self.backbone.model
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens or None,
                                 do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def load_describer(settings: DescriberSettings, device="cpu", small_texts: Callable[[], list[str]] | None = None,
                   small_dir: str | None = None, small_args: dict | None = None) -> Describer:
    """Load the backbone named by ``settings.model`` (``small``: build it from ``small_texts()`` in
    ``small_dir``) frozen, without LoRA."""
    from recbole_mm.lmm.backbone import BackboneLoadError, BackboneSettings, load_backbone

    name = settings.model
    if name == "small":
        from recbole_mm.lmm.tiny_models import build_tiny_vlm
        from recbole_mm.files import fingerprint

        texts = small_texts() if small_texts else []
        args = dict(small_args or {})
        folder = os.path.join(small_dir or "saved", f"small-vlm-{fingerprint(args, texts)}")
        kwargs = {k: v for k, v in (("min_pixels", settings.min_pixels), ("max_pixels", settings.max_pixels)) if v}
        name = build_tiny_vlm(folder, texts, **kwargs, **args)
    try:
        backbone = load_backbone(BackboneSettings(
            name_or_path=name, quantization=settings.quantization, dtype=settings.dtype, lora_r=0,
            trust_remote_code=settings.trust_remote_code, min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels))
    except BackboneLoadError as e:
        cause = str(e).split(". Point")[0]
        raise BackboneLoadError(
            f"describer_model: {cause}. Point describer_model at a local folder of an image-text-to-text "
            f"checkpoint (save_pretrained layout), use describer_model: small (random weights: machinery only), "
            f"or choose a text_source that needs no descriptions (title, title_attributes, an item field)") from e
    if not backbone.quantized:
        backbone.model.to(device)
    backbone.model.eval()
    return Describer(backbone, settings, device)


def generate_descriptions(store, cache: DescriptionCache, settings: DescriberSettings,
                          describer: Describer | Callable[[], Describer], *, item_ids: Sequence[int] | None = None,
                          progress_every: int = 10, show_progress: bool = True) -> dict:
    """Describe every item of ``store`` (or ``item_ids``) the cache lacks; returns counts and speed.

    ``describer`` may be a function that loads it, called only when something is left to do.
    Items are processed in batches; each finished batch is appended to the cache at once.
    """
    ids = list(item_ids) if item_ids is not None else store.item_ids()
    done = cache.load()
    identity = settings.identity()
    cache.check_settings(identity, bool(done))
    pending, skipped = [], 0
    for i in ids:
        if store.token(i) in done:
            continue
        if not store.has_image(i) and settings.missing_image == "skip":
            skipped += 1
            continue
        pending.append(i)
    stats = {"items": len(ids), "reused": len(ids) - len(pending) - skipped, "skipped_without_image": skipped,
             "generated": 0, "from_image": 0, "from_text": 0, "seconds": 0.0, "items_per_s": None,
             "cache": str(cache.path)}
    meta = cache.meta() or {}
    if not pending and meta.get("complete") and meta.get("settings") == identity:
        return stats  # nothing to do: leave the finished cache untouched
    if pending:
        if callable(describer) and not isinstance(describer, Describer):
            describer = describer()
        cache.write_meta(identity, complete=False)
        from tqdm import tqdm

        started = time.perf_counter()
        bs = settings.batch_size
        bar = tqdm(total=len(pending), desc="describer", unit="item", ncols=100, disable=not show_progress)
        for n, start in enumerate(range(0, len(pending), bs), start=1):
            bar.update(min(bs, len(pending) - start))
            part = pending[start:start + bs]
            items = [{"attributes": store.attributes(i), "image": store.image(i)} for i in part]
            if settings.missing_image == "skip":
                keep = [k for k, it in enumerate(items) if it["image"] is not None]  # image that failed to decode
                stats["skipped_without_image"] += len(items) - len(keep)
                part, items = [part[k] for k in keep], [items[k] for k in keep]
                if not items:
                    continue
            texts = describer.generate(items)
            records = [{"item_id": store.token(i), cache.field: text,
                        "from": "image" if it["image"] is not None else "text"}
                       for i, it, text in zip(part, items, texts)]
            cache.append(records)
            stats["generated"] += len(records)
            stats["from_image"] += sum(r["from"] == "image" for r in records)
            stats["from_text"] += sum(r["from"] == "text" for r in records)
            if n % progress_every == 0:
                logger.info(f"describer: {stats['generated']}/{len(pending)} items")
        bar.close()
        stats["seconds"] = time.perf_counter() - started
        stats["items_per_s"] = stats["generated"] / stats["seconds"] if stats["seconds"] > 0 else None
    cache.consolidate([store.token(i) for i in range(len(store))])
    records = cache.load()
    missing = [i for i in store.item_ids() if store.token(i) not in records
               and not (settings.missing_image == "skip" and not store.has_image(i))]
    cache.write_meta(identity, complete=not missing, items=len(records), last_run=stats)
    return stats


def main(argv=None) -> int:
    """Generate (or complete) a description / caption cache for one dataset folder."""
    import argparse

    from recbole_mm.data.item_store import ItemStore

    defaults = yaml_defaults()
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.lmm.describer", description=main.__doc__,
                                     epilog="Defaults are those of properties/model/VLM4Rec.yaml.")
    parser.add_argument("--dataset", required=True, help="dataset name (the folder's <name>.items.jsonl)")
    parser.add_argument("--data_path", required=True, help="the dataset folder")
    parser.add_argument("--model", default=defaults["describer_model"], help="hub id, local folder, or 'small'")
    parser.add_argument("--tag", default=defaults["description_tag"],
                        help="descriptions (VLM4Rec) or captions (MLLM4Rec)")
    parser.add_argument("--prompt", default=None,
                        help="default: describer_prompt (a one-sentence caption prompt with --tag=captions)")
    parser.add_argument("--text_prompt", default=defaults["describer_text_prompt"])
    parser.add_argument("--missing_image", default=defaults["describer_missing_image"], choices=MISSING_IMAGE)
    parser.add_argument("--batch_size", type=int, default=defaults["describer_batch_size"])
    parser.add_argument("--max_new_tokens", type=int, default=defaults["describer_max_new_tokens"])
    parser.add_argument("--min_pixels", type=int, default=defaults["image_min_pixels"])
    parser.add_argument("--max_pixels", type=int, default=defaults["image_max_pixels"])
    parser.add_argument("--limit", type=int, default=None, help="describe only the first N items")
    parser.add_argument("--out_dir", default=None, help="cache folder (default: the dataset folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folder = Path(args.data_path)
    items_file = folder / f"{args.dataset}.items.jsonl"
    if not items_file.is_file():
        print(f"error: {items_file} not found: --data_path must be the dataset's folder (prepare it with "
              f"recbole-mm-data prepare) and --dataset its name", file=sys.stderr)
        return 2
    try:
        with open(items_file, encoding="utf-8") as f:
            tokens = [json.loads(line)["item_id"] for line in f if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"error: {items_file}: every line must be a JSON object with an item_id ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    store = ItemStore(folder, tokens, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    prompt = args.prompt or (CAPTION_PROMPT if args.tag == "captions" else defaults["describer_prompt"])
    settings = DescriberSettings.from_config(
        defaults, model=args.model, prompt=prompt, text_prompt=args.text_prompt, missing_image=args.missing_image,
        max_new_tokens=args.max_new_tokens, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        batch_size=args.batch_size)
    cache = DescriptionCache(args.out_dir or folder, args.dataset, args.tag)
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    texts = lambda: [attributes_text(store.attributes(i)) for i in range(len(store))]  # noqa: E731
    stats = generate_descriptions(
        store, cache, settings, lambda: load_describer(settings, device, texts, small_dir="saved/describer",
                                                       small_args=defaults["describer_small"]),
        item_ids=range(min(len(store), args.limit)) if args.limit else None)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
