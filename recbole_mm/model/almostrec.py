"""ALMOSTREC: a frozen sequential recommender's item embeddings, projected into an LMM as one token
per history item (beside the item's title, and its image when the backbone has a vision tower), and
an all-item softmax head on the last hidden state."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from logging import getLogger

import torch
from torch import nn
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_mm.errors import ConfigError, UserError
from recbole_mm.lmm.defaults import LMM_BASE

logger = getLogger(__name__)


def base_model_config(config):
    """The RecBole config of the embedding model (``almost_base_model``: its own yaml, the run's
    shared data and evaluation settings, then ``almost_base_config``)."""
    from recbole_mm.model.prime import shared_keys

    if not hasattr(config, "for_model"):
        raise ConfigError("ALMOSTREC needs recbole_mm's Config (recbole_mm.config.Config), which builds the "
                          "config of its embedding model; RecBole's own Config does not")
    keys = shared_keys() | set(getattr(config, "parameters", {}).get("Dataset", ()))
    shared = {k: v for k, v in config.external_config_dict.items() if k in keys}
    return config.for_model(config["almost_base_model"], {**shared, **(config["almost_base_config"] or {})})


def images_mode(value) -> bool | str:
    """``almost_images`` as ``"auto"``, ``True`` or ``False`` (yaml booleans or the words, any case)."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word == "auto":
        return "auto"
    if word in ("true", "false"):
        return word == "true"
    raise ConfigError(f"almost_images={value!r}: use auto (images when the backbone has a vision tower), true or false")


def image_placeholder(processor) -> str:
    """The text the backbone's chat template writes for one image part (Qwen2-VL:
    ``<|vision_start|><|image_pad|><|vision_end|>``), which the processor expands to that image's
    tokens; the processor's ``image_token`` when the template has no image part."""
    token = getattr(processor, "image_token", None)
    before, after = "\x01A\x01", "\x01B\x01"
    content = [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]
    try:
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        part = text.split(before, 1)[1].split(after, 1)[0]
    except (ValueError, IndexError, TypeError, AttributeError):
        part = None
    if part and (token is None or token in part):
        return part
    if token is None:
        raise ConfigError("almost_images: the backbone's processor names no image token and its chat template "
                          "shows no image part; use almost_images: false with this ranker_model")
    return token


def _add_text(row: dict[str, list[int]], ids: list[int]) -> None:
    """Append text token ids to a row under construction (its other per-token fields: 0, text)."""
    for k, values in row.items():
        values.extend(ids if k == "input_ids" else [0] * len(ids))


class ALMOSTREC(SequentialRecommender):
    """ALMOSTREC as a RecBole model; :class:`recbole_mm.trainer.almostrec.ALMOSTRECTrainer` trains it.

    Trainable: the backbone's LoRA, ``w_b`` (d_i -> d_m) and ``w_t`` (d_m -> |I|). The embedding
    model ``base`` (its ``almost_embedding_field`` table is M) stays frozen. With ``use_images``
    (``almost_images``; a backbone with a vision tower) each history item with an image shows it
    before its title (:meth:`build_image_inputs`).
    """

    input_type = InputType.POINTWISE
    properties_base = LMM_BASE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        from recbole_mm.lmm.backbone import build_backbone
        from recbole_mm.model.registry import get_model

        store = getattr(dataset, "item_store", None)
        if store is None:
            raise UserError(f"ALMOSTREC needs the item side data of dataset {config['dataset']!r}: build the "
                            "dataset with recbole_mm.utils.create_dataset (MultimodalSequentialDataset)")
        self.base_config = base_model_config(config)
        self.base = get_model(config["almost_base_model"])(self.base_config, dataset)
        self.base.requires_grad_(False)
        field = config["almost_embedding_field"]
        table = getattr(self.base, field, None)
        if not isinstance(table, nn.Embedding):
            raise ConfigError(f"almost_embedding_field={field!r}: {config['almost_base_model']} has no nn.Embedding "
                              f"of that name; name its item-embedding table (e.g. item_embedding)")
        self.embedding_field = field
        self.max_history = config["max_history_items"]
        self.title_field = config["almost_title_field"]
        self.title_tokens = config["attr_max_tokens"]
        mode = images_mode(config["almost_images"])
        # 'small' is the tiny text-only causal LM unless images are asked for (then the tiny Qwen2-VL)
        self.backbone = build_backbone(config, store, "cpu", text_only=mode is not True)
        if mode is True and not self.backbone.is_vision:
            raise ConfigError(f"almost_images=true: ranker_model={config['ranker_model']!r} has no vision tower; "
                              "use an image-text-to-text model (a Qwen2-VL hub id or folder, or small), "
                              "or almost_images: auto")
        self.use_images = self.backbone.is_vision and mode is not False
        lm = self.backbone.model
        self.lm = lm  # registered: LoRA weights are parameters of this model
        self.tokenizer = self.backbone.tokenizer
        d_m = lm.get_input_embeddings().embedding_dim
        self.w_b = nn.Linear(table.embedding_dim, d_m)
        self.w_t = nn.Linear(d_m, self.n_items)
        self._item_ids = self._title_ids(store)
        tok = self.tokenizer
        self._prefix = tok(config["almost_instruction"].format(domain=config["prompt_domain"]),
                           add_special_tokens=False)["input_ids"]
        self._suffix = tok(config["almost_answer_prefix"], add_special_tokens=False)["input_ids"]
        if self.use_images:
            self.store = store
            self.processor = self.backbone.processor
            self._image_text = image_placeholder(self.processor)
            self.image_cache_size = int(config["almost_image_cache"] or 0)
            self._image_cache: OrderedDict[int, dict] = OrderedDict()

    # ------------------------------------------------------------------------------ prompt
    def _title_ids(self, store) -> list[list[int]]:
        """Title tokens of every item id (index 0: [PAD], none), truncated to ``attr_max_tokens``."""
        out = [[]]
        for i in range(1, self.n_items):
            title = store.get(i, self.title_field) if i < len(store) else None
            text = str(title) if title not in (None, "") else store.token(i)
            out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.title_tokens])
        return out

    @property
    def item_table(self) -> torch.Tensor:
        """M, the frozen item-embedding table (|I| x d_i)."""
        return getattr(self.base, self.embedding_field).weight

    def histories(self, interaction) -> list[list[int]]:
        """The last ``max_history_items`` items of each row's input sequence, oldest first."""
        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        return [s[max(0, n - self.max_history):n] for s, n in zip(seq.tolist(), lengths.tolist())]

    def build_inputs(self, histories: list[list[int]]):
        """(inputs_embeds, attention_mask, slots, last): the instruction, then per history item its
        title tokens followed by one behaviour token W_B(M[item]), then the answer prefix; rows
        right-padded. ``slots[r]`` lists (position, item) of row r's behaviour tokens; ``last[r]`` is
        the position of row r's last token."""
        rows, slots = [], []
        for hist in histories:
            ids, marks = list(self._prefix), []
            for item in hist:
                ids.extend(self._item_ids[item])
                marks.append((len(ids), item))
                ids.append(self.tokenizer.pad_token_id)  # placeholder, replaced by the behaviour token
            ids.extend(self._suffix)
            rows.append(ids)
            slots.append(marks)
        length = max(len(r) for r in rows)
        device = self.w_b.weight.device
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        ids, mask = ids.to(device), mask.to(device)
        embeds = self.lm.get_input_embeddings()(ids)
        pos = [(r, p, item) for r, marks in enumerate(slots) for p, item in marks]
        if pos:
            r_idx, p_idx, items = (torch.tensor(x, device=device) for x in zip(*pos))
            tokens = self.w_b(self.item_table[items].to(self.w_b.weight.dtype)).to(embeds.dtype)
            embeds = embeds.index_put((r_idx, p_idx), tokens)
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        return embeds, mask, slots, last

    def item_images(self, histories: list[list[int]]) -> list[list]:
        """Each history item's image (``None``: no usable image) from the item store."""
        n = len(self.store)
        return [[self.store.image(i) if i < n else None for i in hist] for hist in histories]

    def image_segment(self, image) -> dict:
        """One image through the backbone's processor: ``{"tokens": {field: ids}, "pixels": {key:
        tensor}}``, the image part's per-token fields (``input_ids``, Qwen2-VL's ``mm_token_type_ids``)
        and its pixel tensors (``pixel_values``, ``image_grid_thw``; one image's rows, which the
        processor concatenates along dim 0 for several images)."""
        out = self.processor(text=[self._image_text], images=[image], return_tensors="pt")
        ids = out["input_ids"]
        tokens = {k: v[0].tolist() for k, v in out.items()
                  if k != "attention_mask" and torch.is_tensor(v) and v.shape == ids.shape}
        return {"tokens": tokens, "pixels": {k: v for k, v in out.items() if k not in tokens and k != "attention_mask"}}

    def _item_segment(self, item: int, image) -> dict:
        """:meth:`image_segment` of a store item's image, kept for the next ``almost_image_cache``
        distinct items (least recently used dropped): the processor's resizing costs more than the
        tiny model's forward pass, and history items repeat across prompts."""
        if self.image_cache_size <= 0:
            return self.image_segment(image)
        hit = self._image_cache.get(item)
        if hit is None:
            hit = self._image_cache[item] = self.image_segment(image)
            while len(self._image_cache) > self.image_cache_size:
                self._image_cache.popitem(last=False)
        else:
            self._image_cache.move_to_end(item)
        return hit

    def build_image_inputs(self, histories: list[list[int]], images: list[list] | None = None):
        """(inputs, slots, last) with images: per history item its image's tokens (the processor's
        expansion of the chat template's image part, with its pixels), then its title tokens, then
        the behaviour token's slot; an item without an image: title and slot only. ``inputs`` are
        the backbone's keyword arguments (``input_ids`` with a placeholder at each slot, the mask,
        the processor's pixel tensors); ``slots`` and ``last`` as in :meth:`build_inputs`.
        ``images`` (default: the store's, through the cache) is one list per history, ``None`` for
        no image."""
        if images is None:
            images = self.item_images(histories)
            segment = self._item_segment
        else:
            segment = lambda item, image: self.image_segment(image)  # noqa: E731  (given images: no cache)
        segments = [segment(item, img) for hist, row in zip(histories, images) for item, img in zip(hist, row)
                    if img is not None]
        per_token = list(segments[0]["tokens"]) if segments else []
        pad = self.tokenizer.pad_token_id
        rows, slots, seen = [], [], iter(s["tokens"] for s in segments)
        for hist, imgs in zip(histories, images):
            row = {"input_ids": [], **{k: [] for k in per_token}}
            _add_text(row, self._prefix)
            marks = []
            for item, img in zip(hist, imgs):
                if img is not None:
                    for k, v in next(seen).items():
                        row[k].extend(v)
                _add_text(row, self._item_ids[item])
                marks.append((len(row["input_ids"]), item))
                _add_text(row, [pad])  # placeholder, replaced by the behaviour token
            _add_text(row, self._suffix)
            rows.append(row)
            slots.append(marks)
        length = max(len(r["input_ids"]) for r in rows)
        device = self.w_b.weight.device
        inputs = {k: torch.full((len(rows), length), pad if k == "input_ids" else 0, dtype=torch.long)
                  for k in rows[0]}
        inputs["attention_mask"] = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row["input_ids"])
            for k, v in row.items():
                inputs[k][r, :n] = torch.tensor(v, dtype=torch.long)
            inputs["attention_mask"][r, :n] = 1
        if segments:
            inputs.update({k: torch.cat([s["pixels"][k] for s in segments]) for k in segments[0]["pixels"]})
        last = torch.tensor([len(r["input_ids"]) - 1 for r in rows], device=device)
        return {k: v.to(device) for k, v in inputs.items()}, slots, last

    def behaviour_tokens(self, slots) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """((rows, positions), W_B(M[item])) of every slot (``None`` tokens when there is none)."""
        device = self.w_b.weight.device
        pos = [(r, p, item) for r, marks in enumerate(slots) for p, item in marks]
        if not pos:
            return (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)), None
        r_idx, p_idx, items = (torch.tensor(x, device=device) for x in zip(*pos))
        return (r_idx, p_idx), self.w_b(self.item_table[items].to(self.w_b.weight.dtype))

    @contextmanager
    def placed_behaviour_tokens(self, slots):
        """While open, the backbone's input embedding puts W_B(M[item]) at each slot.

        A forward hook, because with images the backbone must embed ``input_ids`` itself: it reads
        them for the image placeholders (where the vision tower's output goes) and for its
        position ids (Qwen2-VL's M-RoPE), so ``inputs_embeds`` cannot be handed in instead."""
        where, tokens = self.behaviour_tokens(slots)
        rows = len(slots)

        def put(module, args, output):
            if tokens is None or output.dim() != 3 or output.size(0) != rows:
                return output  # not this prompt batch's embedding (e.g. one token's, looked up alone)
            return output.index_put(where, tokens.to(output.dtype))

        handle = self.lm.get_input_embeddings().register_forward_hook(put)
        try:
            yield
        finally:
            handle.remove()

    def last_hidden(self, histories: list[list[int]]) -> torch.Tensor:
        """The last layer's hidden state at each row's last prompt token (rows x d_m). The LM head's
        vocabulary logits are computed for one position only (``logits_to_keep=1``; unused here,
        the hidden states are unchanged): over every position they would cost prompt length x
        vocabulary per row (SmolLM2: 49,152 columns)."""
        if self.use_images:
            inputs, slots, last = self.build_image_inputs(histories)
            with self.placed_behaviour_tokens(slots):
                out = self.lm(**inputs, output_hidden_states=True, logits_to_keep=1)
        else:
            embeds, mask, _, last = self.build_inputs(histories)
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1][torch.arange(len(last), device=last.device), last]

    def forward(self, interaction) -> torch.Tensor:
        """Scores of every item (rows x |I|) from the head on the last hidden state."""
        hidden = self.last_hidden(self.histories(interaction))
        return self.w_t(hidden.to(self.w_t.weight.dtype)).float()

    def calculate_loss(self, interaction):
        logits = self.forward(interaction)
        logits[:, 0] = -torch.inf  # [PAD] is never an answer
        return nn.functional.cross_entropy(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        scores = self.forward(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].view(-1, 1)).squeeze(1)

    def full_sort_predict(self, interaction):
        return self.forward(interaction)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
