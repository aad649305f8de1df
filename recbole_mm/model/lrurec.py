"""LRURec: linear recurrent units for sequential recommendation (Yue et al., 2024; PRIME Sec. 3.2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_mm.errors import ConfigError
from recbole_mm.model.layers import LRUBlock, pack


class LRURec(SequentialRecommender):
    """LRURec as a RecBole sequential model.

    Item embedding -> dropout -> LayerNorm (no positional embedding), ``n_layers`` LRU blocks,
    and an output layer tied to the item embedding with a per-item bias. With
    ``train_positions: all`` (the default in ``LRURec.yaml``, as in the reference code) the loss is
    a full-softmax cross-entropy at every real position of one sequence per user; with ``last``
    it is RecBole's usual loss at the last position of each prefix sample. Padding costs nothing:
    every layer runs on the packed real positions only (see :func:`recbole_mm.model.layers.linear_scan`).

    ``start_token`` (with ``train_positions: all``) adds the reference code's extra target: a learned
    start token, which carries no state into the sequence, predicts the first item of every
    sequence that begins at the user's first item. In the reference this is its trained padding
    slot just before the sequence (``labels = seq[-L:]`` is one item longer than the inputs).
    """

    input_type = InputType.POINTWISE
    supports_all_positions = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if config["loss_type"] != "CE":
            raise ConfigError(f"LRURec supports loss_type 'CE' only, not {config['loss_type']!r}")
        self.hidden_size = config["hidden_size"]
        self.train_positions = config["train_positions"]
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.emb_dropout = nn.Dropout(config["dropout_prob"])
        self.emb_layer_norm = nn.LayerNorm(self.hidden_size)
        self.blocks = nn.ModuleList(
            LRUBlock(self.hidden_size, config["dropout_prob"], config["attn_dropout_prob"],
                     config["r_min"], config["r_max"])
            for _ in range(config["n_layers"]))
        self.output_bias = nn.Parameter(torch.zeros(self.n_items))
        self.start_embedding = nn.Parameter(torch.zeros(self.hidden_size)) if config["start_token"] else None
        if self.start_embedding is not None and self.train_positions != "all":
            raise ConfigError("start_token needs train_positions: all (it adds a target before the first position)")
        self._truncated_normal_init(config["initializer_range"])

    def _truncated_normal_init(self, std: float):
        """Truncated normal (std, cut at 2 std) on every weight but LayerNorms and the recurrence."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "layer_norm" in name or name.split(".")[-1] in ("nu_log", "theta_log", "gamma_log"):
                    continue
                nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)
            self.item_embedding.weight[0].zero_()

    def optimizer_param_groups(self, weight_decay: float):
        """AdamW groups as in the reference: no weight decay on biases and LayerNorms."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            (no_decay if name.endswith("bias") or "layer_norm" in name else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def forward(self, item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the real positions, packed: ((tokens, hidden), flat index into item_seq)."""
        index, position = pack(item_seq > 0)
        return self.encode(self.item_embedding(item_seq.reshape(-1)[index]), position), index

    def encode(self, embedded: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The blocks over packed input embeddings ``(tokens, hidden)`` at ``position`` in their sequence."""
        x = self.emb_layer_norm(self.emb_dropout(embedded))
        for block in self.blocks:
            x = block(x, position)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.item_embedding.weight.T + self.output_bias

    def calculate_loss(self, interaction):
        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]
        hidden, index = self.forward(seq)
        if self.train_positions == "all":
            labels = torch.cat([seq[:, 1:], torch.zeros_like(seq[:, :1])], dim=1)
            labels[torch.arange(len(seq), device=seq.device), lengths - 1] = target
            labels = labels.reshape(-1)[index]
            if self.start_embedding is not None:
                # rows shorter than the window begin at the user's first item: one length-1 sequence each
                first = seq[lengths < seq.size(1), 0]
                start = self.encode(self.start_embedding.expand(len(first), -1), torch.zeros_like(first))
                hidden, labels = torch.cat([hidden, start]), torch.cat([labels, first])
            return F.cross_entropy(self.logits(hidden), labels)
        return F.cross_entropy(self.logits(hidden[torch.cumsum(lengths, 0) - 1]), target)

    def _last_hidden(self, interaction):
        hidden, _ = self.forward(interaction[self.ITEM_SEQ])
        return hidden[torch.cumsum(interaction[self.ITEM_SEQ_LEN], 0) - 1]

    def predict(self, interaction):
        item = interaction[self.ITEM_ID]
        hidden = self._last_hidden(interaction)
        return (hidden * self.item_embedding(item)).sum(-1) + self.output_bias[item]

    def full_sort_predict(self, interaction):
        return self.logits(self._last_hidden(interaction))
