"""ALMOSTREC: a frozen sequential recommender's item embeddings, projected into an LMM as one token
per history item (beside the item's title), and an all-item softmax head on the last hidden state."""

from __future__ import annotations

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


class ALMOSTREC(SequentialRecommender):
    """ALMOSTREC as a RecBole model; :class:`recbole_mm.trainer.almostrec.ALMOSTRECTrainer` trains it.

    Trainable: the backbone's LoRA, ``w_b`` (d_i -> d_m) and ``w_t`` (d_m -> |I|). The embedding
    model ``base`` (its ``almost_embedding_field`` table is M) stays frozen.
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
        self.backbone = build_backbone(config, store, "cpu", text_only=True)
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

    def forward(self, interaction) -> torch.Tensor:
        """Scores of every item (rows x |I|) from the head on the last hidden state."""
        embeds, mask, _, last = self.build_inputs(self.histories(interaction))
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1][torch.arange(len(last), device=last.device), last]
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
