"""PRIME's interleaved image + text ranking prompt.

One user turn: an instruction, the user's last ``max_history`` items (oldest first), then the
candidates, each prefixed by an index letter ``(A) ``, ``(B) ``, ... Every item is one line holding
a JSON-like object (PRIME Appendix A)::

    {"image": <image>, "title": "...", "price": 12.5, "brand": "...", "categories": "..."}

- keys in the order of :attr:`PromptSettings.fields`; missing / empty values are dropped; an item
  without an image has no ``"image"`` key;
- each value is truncated to ``attr_max_tokens`` tokens of the ranker's tokenizer (cut at a token
  boundary of the raw text) and then written with ``json.dumps`` (quotes, backslashes, newlines and
  control characters escaped), so a value can neither close the object nor start a new line: a
  title containing ``(B)`` stays inside its JSON string, and candidate markers only ever occur at
  the start of a line;
- a value that contains one of the tokenizer's special-token strings (e.g. ``<|im_end|>``,
  ``<|image_pad|>``) gets a zero-width space inserted after the first character of that string, so
  that item text can never turn into a control token or an image slot;
- ``<image>`` marks where the item's image goes: in :attr:`Prompt.messages` (Hugging Face chat
  format) it is a ``{"type": "image"}`` content part, and :attr:`Prompt.images` lists the images in
  the order of those parts.

The model answers with the candidate's letter alone (``A``, ``B``, ...); scoring the letters is the
verbalizer's job (:mod:`recbole_mm.lmm.verbalizer`). This module does not import ``transformers``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from logging import getLogger
from typing import Any, Protocol, Sequence, runtime_checkable

from recbole_mm.errors import ConfigError
from recbole_mm.lmm.defaults import lmm_default

logger = getLogger(__name__)

VARIANTS = ("full", "title_only", "no_image", "no_title")
IMAGE_PLACEHOLDER = "<image>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ZWSP = "\u200b"

DEFAULT_INSTRUCTION = (
    "You are a recommender system. Below is the history of {domain}s a user interacted with, in "
    "chronological order (oldest first), followed by candidate {domain}s, each marked with an index "
    "letter. Each {domain} is described by a JSON object with its image and attributes. Based on the "
    "user's history, predict which candidate the user will interact with next. Answer with the index "
    "letter of that candidate only."
)

# The reference code's instruction and section headers (PRIME code, config.py:106-108), without an
# answer hint: ``prompt_text: reference``.
REFERENCE_TEXT = {
    "instruction": "Based on the user's browsing history and a collection of candidate items (both provided in "
                   "JSON format), recommend the most suitable item by specifying its index letter.",
    "history_header": "Browsing history:",
    "candidates_header": "Candidate items:",
    "answer_hint": "",
}
PROMPT_TEXTS = ("ours", "reference")


def prompt_text_settings(name: str) -> dict:
    """PromptSettings fields of a ``prompt_text`` choice: ``ours`` (the defaults) or ``reference``."""
    if name not in PROMPT_TEXTS:
        raise ConfigError(f"prompt_text={name!r}: choose one of {PROMPT_TEXTS}")
    return dict(REFERENCE_TEXT) if name == "reference" else {}


def index_letters(k: int) -> list[str]:
    """The first ``k`` index letters of the candidates: ``["A", "B", ...]``; 1 <= k <= 26."""
    if not 0 < k <= len(LETTERS):
        raise ValueError(f"candidates are indexed with the letters A..Z: 1 to {len(LETTERS)} of them, got k={k}")
    return list(LETTERS[:k])


@dataclass
class PromptSettings:
    """How prompts are built.

    Args:
        max_history: history items shown (the last ones, oldest first).
        attr_max_tokens: tokens kept of each attribute value (``None`` or 0: no truncation).
        fields: attribute names shown, in this order (``None``: every attribute of the item, in
            its own order).
        variant: ``full`` (image + fields), ``title_only`` (title, no image), ``no_image`` (fields,
            no image), ``no_title`` (image + fields except the title) -- PRIME Table 4.
        domain: word for the items in the instruction ("beauty product", "movie", ...).
        instruction: the instruction; ``{domain}`` in it is replaced by :attr:`domain`.
        history_header, candidates_header, answer_hint: the lines around the two item lists
            (``answer_hint`` closes the prompt; empty string: none).
    """

    max_history: int = field(default_factory=lambda: lmm_default("max_history_items"))
    attr_max_tokens: int | None = field(default_factory=lambda: lmm_default("attr_max_tokens"))
    fields: Sequence[str] | None = ("title", "price", "brand", "categories")
    variant: str = field(default_factory=lambda: lmm_default("prompt_variant"))
    domain: str = field(default_factory=lambda: lmm_default("prompt_domain"))
    instruction: str = DEFAULT_INSTRUCTION
    history_header: str = "User history:"
    candidates_header: str = "Candidates:"
    answer_hint: str = "Answer with one index letter."

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"prompt variant must be one of {VARIANTS}, not {self.variant!r}")
        if int(self.max_history) < 0:
            raise ConfigError(f"max_history must be >= 0, got {self.max_history}")
        if self.fields is not None:
            self.fields = tuple(self.fields)

    @classmethod
    def from_config(cls, config, **overrides) -> "PromptSettings":
        """The settings of a run (``max_history_items``, ``attr_max_tokens``, ``prompt_variant``,
        ``prompt_domain``); unset fields keep the shipped defaults; ``overrides`` replace fields."""
        values = dict(max_history=config["max_history_items"], attr_max_tokens=config["attr_max_tokens"],
                      variant=config["prompt_variant"], domain=config["prompt_domain"])
        values.update(overrides)
        return cls(**values)

    @property
    def use_images(self) -> bool:
        return self.variant in ("full", "no_title")

    def shown_fields(self, attributes: dict) -> list[str]:
        """The attribute names shown for an item, in order, before dropping empty values."""
        names = list(attributes) if self.fields is None else list(self.fields)
        if self.variant == "title_only":
            return [n for n in names if n == "title"] or ["title"]
        if self.variant == "no_title":
            return [n for n in names if n != "title"]
        return names

    def instruction_text(self) -> str:
        return self.instruction.replace("{domain}", self.domain)


@dataclass
class Prompt:
    """A built prompt.

    Attributes:
        messages: ``[{"role": "user", "content": [{"type": "text", "text": ...}, {"type": "image"},
            ...]}]`` -- one image part per image, in place.
        images: the images of the image parts, in order.
        letters: the index letters of the candidates, in candidate order.
    """

    messages: list[dict]
    images: list[Any]
    letters: list[str]
    parts: list[Any] = field(default_factory=list, repr=False)  # str | _IMAGE, in order

    def text_only(self, image_token: str = IMAGE_PLACEHOLDER) -> str:
        """The user turn as plain text, each image shown as ``image_token`` (debugging, logs,
        text-only backbones)."""
        return "".join(image_token if p is _IMAGE else p for p in self.parts)

    def __str__(self) -> str:
        return self.text_only()


class _ImageSlot:
    def __repr__(self):
        return "<image>"


_IMAGE = _ImageSlot()


def _special_strings(tokenizer) -> tuple[str, ...]:
    if tokenizer is None:
        return ()
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        content = getattr(tok, "content", tok)
        if isinstance(content, str) and getattr(tok, "special", True):
            found.add(content)
    return tuple(sorted((s for s in found if isinstance(s, str) and len(s) > 1), key=len, reverse=True))


def _defuse(text: str, specials: Sequence[str]) -> str:
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + _ZWSP + s[1:])
    return text


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1 << 16)
def _truncate_cached(tokenizer, text: str, n: int) -> str:
    return _truncate(tokenizer, text, n)


def _truncate(tokenizer, text: str, n: int) -> str:
    """The longest token-aligned prefix of ``text`` that has at most ``n`` tokens."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc.get("offset_mapping")
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        enc, offsets = tokenizer(text, add_special_tokens=False), None
    ids = enc["input_ids"]
    if len(ids) <= n:
        return text
    if offsets:
        out = ""
        for m in range(n, 0, -1):  # re-tokenizing a cut word can rarely give more tokens: step back
            out = text[:offsets[m - 1][1]]
            if _n_tokens(tokenizer, out) <= n:
                break
        else:
            out = ""
    else:
        out = tokenizer.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        out = out.rstrip("\ufffd")
        while out and _n_tokens(tokenizer, out) > n:
            out = out[:-1]
    return out.rstrip()


def truncate_tokens(tokenizer, text: str, n: int | None) -> str:
    """``text`` cut to at most ``n`` tokens of ``tokenizer`` (no cut when either is ``None``)."""
    if tokenizer is None or not n or n <= 0 or not text:
        return text
    try:
        return _truncate_cached(tokenizer, text, int(n))
    except TypeError:  # unhashable tokenizer
        return _truncate(tokenizer, text, int(n))


def _value_text(value: Any) -> str | float | int | None:
    """The raw value as shown: numbers stay numbers, sequences are joined, empties are ``None``."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        try:
            return _value_text(value.item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        parts = [str(_value_text(v)) for v in value if _value_text(v) not in (None, "")]
        value = ", ".join(parts)
    elif isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False)
    value = str(value).strip()
    return value or None


def _item_parts(item: dict, settings: PromptSettings, tokenizer, specials) -> list[Any]:
    """One item as ``["{", _IMAGE, ", \\"title\\": ...}"]``-style parts (no newline)."""
    attributes = item.get("attributes") or {}
    entries = []
    for name in settings.shown_fields(attributes):
        value = _value_text(attributes.get(name))
        if value is None:
            continue
        if isinstance(value, str):
            value = _defuse(truncate_tokens(tokenizer, value, settings.attr_max_tokens), specials)
            if not value:
                continue
        entries.append(f"{json.dumps(_defuse(str(name), specials), ensure_ascii=False)}: "
                       f"{json.dumps(value, ensure_ascii=False)}")
    parts: list[Any] = ["{"]
    image = item.get("image") if settings.use_images else None
    if image is not None:
        parts += ['"image": ', _IMAGE]
        if entries:
            parts.append(", ")
    parts += [", ".join(entries), "}"]
    return parts


def build_prompt(history: Sequence[dict], candidates: Sequence[dict], settings: PromptSettings | None = None,
                 tokenizer: Any = None) -> Prompt:
    """Build the ranking prompt.

    Args:
        history: the user's items, oldest first; each ``{"attributes": {...}, "image": PIL | None}``.
            Only the last ``settings.max_history`` are shown.
        candidates: the candidate items (same form), lettered ``A``, ``B``, ... in this order.
        settings: :class:`PromptSettings` (defaults when ``None``).
        tokenizer: the ranker's tokenizer (for truncation and special-token defusing); ``None``
            disables both.
    """
    settings = settings or PromptSettings()
    specials = _special_strings(tokenizer)
    letters = index_letters(len(candidates))
    shown = list(history)[-settings.max_history:] if settings.max_history else []
    parts: list[Any] = []
    images: list[Any] = []

    def add_item(item, prefix=""):
        item_parts = _item_parts(item, settings, tokenizer, specials)
        parts.append(prefix)
        parts.extend(item_parts)
        parts.append("\n")
        if _IMAGE in item_parts:
            images.append(item["image"])

    parts.append(settings.instruction_text() + "\n")
    if shown:  # no history section at all when there is nothing to show
        parts.append("\n" + settings.history_header + "\n")
        for item in shown:
            add_item(item)
    parts.append("\n" + settings.candidates_header + "\n")
    for letter, item in zip(letters, candidates):
        add_item(item, f"({letter}) ")
    if settings.answer_hint:
        parts.append("\n" + settings.answer_hint)
    parts = _merge(parts)
    content = [{"type": "image"} if p is _IMAGE else {"type": "text", "text": p} for p in parts]
    return Prompt(messages=[{"role": "user", "content": content}], images=images, letters=letters, parts=parts)


def _merge(parts: list[Any]) -> list[Any]:
    """Join adjacent text parts, drop empty ones."""
    out: list[Any] = []
    for p in parts:
        if p is _IMAGE:
            out.append(p)
        elif p:
            if out and out[-1] is not _IMAGE:
                out[-1] += p
            else:
                out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# prompt templates: what LMMRanker renders, and what the answer looks like


@runtime_checkable
class PromptTemplate(Protocol):
    """How an LMM recommender talks about items: a template renders a history and its candidates
    into a :class:`Prompt`, names the candidates' labels (what the verbalizer scores, one token
    each) and writes the training response for the answer's label.

    Items reach a template as ``{"attributes": {...}, "image": PIL | None}``. A new prompt (e.g. a
    role-play ``title : caption`` list) is a new class with these members;
    :class:`~recbole_mm.lmm.candidate_ranker.LMMRanker` takes any of them.
    """

    settings: PromptSettings

    @property
    def use_images(self) -> bool:
        """Whether items' images go into the prompt (the ranker loads them only then)."""

    def labels(self, k: int) -> list[str]:
        """The labels of ``k`` candidates, in candidate order."""

    def render(self, history: Sequence[dict], candidates: Sequence[dict], tokenizer: Any = None) -> Prompt:
        """The prompt for one user: ``history`` oldest first, then ``candidates`` labelled in order."""

    def response(self, label: str, tokenizer) -> str:
        """The text the model is trained to answer with for the candidate labelled ``label``."""

    def response_tokens(self, prompt_text: str, full_text: str, tokenizer) -> int:
        """How many tokens at the end of ``full_text`` (prompt + response) the loss covers."""


class LetteredJSONTemplate:
    """PRIME's template: the instruction, the history and the candidates as JSON-like lines,
    candidates lettered ``(A)``, ``(B)``, ... (:func:`build_prompt`); the answer is the letter and
    the end-of-turn token.

    ``prompt_text`` (``ours`` | ``reference``) picks the instruction and headers; ``loss_newline``
    (``ranker_loss_tokens: letter_end_newline``, the reference code) also puts the newline after the
    end-of-turn token into the response.
    """

    def __init__(self, settings: PromptSettings | None = None, loss_newline: bool = False):
        self.settings = settings if settings is not None else PromptSettings()
        self.loss_newline = loss_newline

    @classmethod
    def from_config(cls, config) -> "LetteredJSONTemplate":
        """PRIME's template of a run: :meth:`PromptSettings.from_config` with ``prompt_text``'s
        texts, and ``ranker_loss_tokens``."""
        settings = PromptSettings.from_config(config, **prompt_text_settings(config["prompt_text"]))
        return cls(settings, loss_newline=loss_newline(config["ranker_loss_tokens"]))

    @property
    def use_images(self) -> bool:
        return self.settings.use_images

    def labels(self, k: int) -> list[str]:
        return index_letters(k)

    def render(self, history, candidates, tokenizer=None) -> Prompt:
        return build_prompt(history, candidates, self.settings, tokenizer)

    def response(self, label: str, tokenizer) -> str:
        from recbole_mm.lmm.verbalizer import response_text

        return response_text(tokenizer, label) + ("\n" if self.loss_newline else "")

    def response_tokens(self, prompt_text: str, full_text: str, tokenizer) -> int:
        """2 (letter, end-of-turn), or with ``loss_newline`` those of the whole response as the
        tokenizer splits it (letter, end-of-turn, newline)."""
        if not self.loss_newline:
            return 2
        ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        return len(ids(full_text)) - len(ids(prompt_text))


LOSS_TOKENS = ("letter_end", "letter_end_newline")


def loss_newline(name: str) -> bool:
    """``ranker_loss_tokens``: ``letter_end`` (ours) or ``letter_end_newline`` (the reference code's
    loss also covers the newline after the end-of-turn token, ``trainer/lmm.py:69-70``)."""
    if name not in LOSS_TOKENS:
        raise ConfigError(f"ranker_loss_tokens={name!r}: choose letter_end or letter_end_newline")
    return name == "letter_end_newline"


# ----------------------------------------------------------------------------------------------
# MLLM4Rec's role-play prompt (MLLM4Rec Fig. 2 / Sec. 3.5)

DEFAULT_ROLE = "You are a helpful recommendation assistant."
# the paper's Fig. 3 instruction, split into the format explanation and the request
ROLE_PLAY_FORMAT = ("I will provide you with the {domain}s you have previously browsed in chronological order, a "
                    "candidate pool, and a vision description of each {domain}, in the format \"title : caption\" "
                    "(the title alone when there is no caption).")
ROLE_PLAY_INSTRUCTION = "Recommend one {domain} from the candidate pool with its index letter. Answer with the letter only."
CAPTION_SOURCES = ("generated", "none")  # or the name of an item field (e.g. H&M 'description')


def role_line(role_play, dataset: str | None) -> str:
    """The opening role line of a dataset: ``role_play`` is a string (every dataset), a dict
    ``{dataset name: line, "default": line}`` or ``None`` (the neutral :data:`DEFAULT_ROLE`)."""
    if role_play is None:
        return DEFAULT_ROLE
    if isinstance(role_play, str):
        return role_play
    if isinstance(role_play, dict):
        return str(role_play.get(dataset) or role_play.get("default") or DEFAULT_ROLE)
    raise ConfigError(f"role_play={role_play!r}: give a string or a dict {{dataset name: role line, default: line}}")


def _one_line(text: str) -> str:
    """Newlines and control characters become spaces: an item never starts a new prompt line."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


class RolePlayTemplate:
    """MLLM4Rec's text-only template: a role line, the format explanation, the history as
    ``title : caption`` lines (oldest first, the last ``max_history``), the candidates lettered
    ``(A)``, ``(B)``, ... and the instruction; the answer is the letter and the end-of-turn token.

    ``caption_field``: the item attribute that holds the caption (``caption``: the describer's
    ``--tag=captions`` cache merged by the item store; ``description``: H&M's own text; ``None``:
    titles only). Title and caption are each cut to ``attr_max_tokens`` tokens, newlines and control
    characters become spaces, and special-token strings are defused (as in :func:`build_prompt`).
    """

    def __init__(self, settings: PromptSettings | None = None, role: str = DEFAULT_ROLE,
                 caption_field: str | None = "caption"):
        self.settings = settings if settings is not None else PromptSettings()
        self.role, self.caption_field = role, caption_field

    @classmethod
    def from_config(cls, config) -> "RolePlayTemplate":
        """The template of a run: ``caption_source`` (generated | <item field> | none), ``role_play``
        for ``dataset``, the prompt limits of :meth:`PromptSettings.from_config`."""
        source = config["caption_source"]
        if not source or not isinstance(source, str):
            raise ConfigError(f"caption_source={source!r}: choose generated, none or an item field name")
        field_name = {"generated": "caption", "none": None}.get(source, source)
        return cls(PromptSettings.from_config(config, variant="title_only"), role_line(config["role_play"],
                                                                                        config["dataset"]), field_name)

    @property
    def use_images(self) -> bool:
        return False

    def labels(self, k: int) -> list[str]:
        return index_letters(k)

    def item_text(self, item: dict, tokenizer=None, specials: Sequence[str] = ()) -> str:
        """``title : caption`` of one item (the title alone without a caption)."""
        attributes = item.get("attributes") or {}

        def shown(name):
            value = _value_text(attributes.get(name)) if name else None
            if value is None:
                return ""
            return _defuse(_one_line(truncate_tokens(tokenizer, _one_line(str(value)), self.settings.attr_max_tokens)),
                           specials)

        title, caption = shown("title") or "(untitled)", shown(self.caption_field)
        return f"{title} : {caption}" if caption else title

    def render(self, history, candidates, tokenizer=None) -> Prompt:
        specials = _special_strings(tokenizer)
        letters = index_letters(len(candidates))
        n = self.settings.max_history
        shown = list(history)[-n:] if n else []
        domain = self.settings.domain
        lines = [self.role, ROLE_PLAY_FORMAT.replace("{domain}", domain), ""]
        if shown:
            lines += ["Previously browsed:", *(self.item_text(i, tokenizer, specials) for i in shown), ""]
        lines += ["Candidate pool:", *(f"({a}) {self.item_text(i, tokenizer, specials)}" for a, i in zip(letters, candidates)),
                  "", ROLE_PLAY_INSTRUCTION.replace("{domain}", domain)]
        text = "\n".join(lines)
        return Prompt(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}], images=[],
                      letters=letters, parts=[text])

    def response(self, label: str, tokenizer) -> str:
        from recbole_mm.lmm.verbalizer import response_text

        return response_text(tokenizer, label)

    def response_tokens(self, prompt_text: str, full_text: str, tokenizer) -> int:
        return 2  # the letter and the end-of-turn token, as PRIME's letter_end


TITLE_LIST_HISTORY = "The user has watched the following {domain}s:"
TITLE_LIST_CANDIDATES = "Please write a {domain} that the user may watch. Below are the candidate {domain}s:"


class TitleListTemplate:
    """HaNoRec's text prompt (paper Appendix C, Fig. 6 b, without the posters): the history's titles
    in quotes, oldest first (the last ``max_history``), then the candidates' titles; the answer is
    the chosen candidate's title itself (scored by its log-likelihood, not by a label logit).

    Titles are cut to ``attr_max_tokens`` tokens, newlines and control characters become spaces,
    special-token strings are defused. ``labels(k)`` are the letters (the protocol asks for them;
    candidates carry no labels in this prompt), ``response(title)`` is the title.
    """

    def __init__(self, settings: PromptSettings | None = None, title_field: str = "title"):
        self.settings = settings if settings is not None else PromptSettings(variant="title_only")
        self.title_field = title_field

    @classmethod
    def from_config(cls, config) -> "TitleListTemplate":
        return cls(PromptSettings.from_config(config, variant="title_only"))

    @property
    def use_images(self) -> bool:
        return False

    def labels(self, k: int) -> list[str]:
        return index_letters(k)

    def title(self, item: dict, tokenizer=None, specials: Sequence[str] = ()) -> str:
        """The item's title as shown and answered (``(untitled)`` when it has none)."""
        value = _value_text((item.get("attributes") or {}).get(self.title_field))
        if value is None:
            return "(untitled)"
        text = truncate_tokens(tokenizer, _one_line(str(value)), self.settings.attr_max_tokens)
        return _defuse(_one_line(text), specials) or "(untitled)"

    def render(self, history, candidates, tokenizer=None) -> Prompt:
        specials = _special_strings(tokenizer)
        n = self.settings.max_history
        shown = list(history)[-n:] if n else []
        domain = self.settings.domain
        quoted = lambda item: f'"{self.title(item, tokenizer, specials)}"'  # noqa: E731
        lines = [TITLE_LIST_HISTORY.replace("{domain}", domain), *(quoted(i) for i in shown), "",
                 TITLE_LIST_CANDIDATES.replace("{domain}", domain), *(quoted(i) for i in candidates)]
        text = "\n".join(lines)
        return Prompt(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}], images=[],
                      letters=self.labels(len(candidates)), parts=[text])

    def response(self, label: str, tokenizer) -> str:
        return label

    def response_tokens(self, prompt_text: str, full_text: str, tokenizer) -> int:
        ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        return len(ids(full_text)) - len(ids(prompt_text))
