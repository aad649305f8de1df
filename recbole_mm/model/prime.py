"""PRIME: a retriever proposes candidates, an LMM ranks them in one forward pass (Wang et al., 2025)."""

from __future__ import annotations

from logging import getLogger

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_mm.lmm.defaults import LMM_BASE, overall_yaml

logger = getLogger(__name__)

def shared_keys() -> frozenset[str]:
    """The settings a retriever shares with the PRIME run that hosts it, by rule: RecBole's general,
    dataset and evaluation settings (``recbole.utils.argument_list``: data, split, protocol, device,
    logging) and recbole-mm's protocol keys (``overall.yaml``, e.g. ``mask_history``); never a
    training setting or a model hyperparameter (those come from the retriever's own yaml and
    PRIME's ``retriever_config``)."""
    from recbole.utils import argument_list

    return frozenset(argument_list.general_arguments + argument_list.dataset_arguments
                     + argument_list.evaluation_arguments) | frozenset(overall_yaml())


def retriever_config(config):
    """The RecBole config of PRIME's retriever (its own model yaml + shared data settings)."""
    from recbole_mm.errors import ConfigError

    if not hasattr(config, "for_model"):
        raise ConfigError("PRIME needs recbole_mm's Config (recbole_mm.config.Config), which builds its "
                          "retriever's config; RecBole's own Config does not")
    keys = shared_keys() | set(getattr(config, "parameters", {}).get("Dataset", ()))  # + the dataset yaml's keys
    shared = {k: v for k, v in config.external_config_dict.items() if k in keys}
    shared.update(retriever_selection(config))
    return config.for_model(config["retriever"], {**shared, **(config["retriever_config"] or {})})


def retriever_selection(config) -> dict:
    """``valid_metric``, ``topk`` and ``metrics`` of the retriever stage: its checkpoint is chosen on
    ``retriever_valid_metric`` (default ``Recall@<n_candidates>``, what the ranker depends on: the
    reference code selects on Recall@25), with its k added to ``topk`` and its name to ``metrics``.
    ``retriever_config`` (applied after) still overrides all three."""
    metric = config["retriever_valid_metric"] or f"Recall@{config['n_candidates']}"
    name, _, k = str(metric).partition("@")
    topk = config["topk"] if isinstance(config["topk"], list) else [config["topk"]]
    metrics = list(config["metrics"])
    if k:
        if not k.isdigit():
            from recbole_mm.errors import ConfigError

            raise ConfigError(f"retriever_valid_metric={metric!r}: the part after '@' must be an integer k "
                              f"(e.g. Recall@25)")
        topk = sorted(set(topk) | {int(k)})
    if name.lower() not in [str(m).lower() for m in metrics]:
        metrics.append(name)
    return {"valid_metric": metric, "topk": topk, "metrics": metrics}


class PRIME(SequentialRecommender):
    """Two-stage PRIME as a RecBole model; :class:`recbole_mm.trainer.prime.PRIMETrainer` trains it.

    ``retriever`` is any RecBole sequential model (LRURec by default). ``full_sort_predict`` ranks
    all items: the retriever's top ``n_candidates`` in the LMM ranker's order first, then every
    other item in the retriever's order. Until a ranker is attached it ranks like the retriever.
    """

    input_type = InputType.POINTWISE
    properties_base = LMM_BASE  # Config layers properties/model/_lmm.yaml under PRIME.yaml

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        from recbole_mm.model.registry import get_model

        self.retriever_config = retriever_config(config)
        self.retriever = get_model(config["retriever"])(self.retriever_config, dataset)
        self.n_candidates = config["n_candidates"]
        self.max_history = config["max_history_items"]
        self.ranker = None  # an LMMRanker, attached by the trainer

    def calculate_loss(self, interaction):
        raise NotImplementedError("PRIME trains in stages: use PRIMETrainer (run_recbole_mm does)")

    def predict(self, interaction):
        raise NotImplementedError("PRIME scores candidates as a set: use full_sort_predict")

    def retriever_scores(self, interaction, history_index=None) -> torch.Tensor:
        scores = self.retriever.full_sort_predict(interaction).view(len(interaction), -1).float()
        scores[:, 0] = -torch.inf
        if history_index is not None:
            scores[history_index] = -torch.inf
        return scores

    def histories(self, interaction, rows=None) -> list[list[int]]:
        """The last ``max_history_items`` items of each row's input sequence, oldest first."""
        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if rows is not None:
            seq, lengths = seq[rows], lengths[rows]
        return [s[max(0, n - self.max_history):n] for s, n in zip(seq.tolist(), lengths.tolist())]

    @staticmethod
    def compose(scores: torch.Tensor, candidates: torch.Tensor, rows: torch.Tensor,
                ranker_scores: torch.Tensor) -> torch.Tensor:
        """Full ranking: ranked candidates of ``rows`` above every other item, the rest in retriever order.

        Every retriever score is shifted below zero, the ranked candidates are placed at
        ``1 + ranker score - min``: the order inside each group is kept and the groups never mix.
        """
        finite = torch.isfinite(scores)
        top = torch.where(finite, scores, torch.full_like(scores, -torch.inf)).amax(1, keepdim=True)
        out = torch.where(finite, scores - top - 1, scores)
        if len(rows):
            placed = 1 + ranker_scores - ranker_scores.amin(1, keepdim=True)
            out[rows.unsqueeze(1), candidates[rows]] = placed.to(out.dtype)
        return out

    def two_stage_scores(self, interaction, history_index=None, answers=None, batch_size: int | None = None):
        """The one two-stage composition: ``(scores over all items, rows ranked)``.

        The retriever scores every item (``history_index``: items masked out); without a ranker that
        is the result. Otherwise each row's top ``n_candidates`` are scored by the ranker
        (``batch_size`` prompts per forward pass; ``None``: all at once) and placed first in the
        ranker's order (:meth:`compose`). ``answers`` (each row's answer item): only rows whose answer
        is a candidate are ranked -- the others score 0 at every cutoff <= ``n_candidates`` whatever
        the ranker does, so this is exact for those cutoffs.
        """
        scores = self.retriever_scores(interaction, history_index)
        if self.ranker is None:
            return scores, 0
        candidates = torch.topk(scores, self.n_candidates, dim=1).indices
        if answers is None:
            rows = torch.arange(len(scores), device=scores.device)
        else:
            hit = (candidates.cpu() == torch.as_tensor(answers).cpu().unsqueeze(1)).any(1)
            rows = torch.nonzero(hit).squeeze(1).to(scores.device)
        ranked = self.ranker.score_in_batches(self.histories(interaction, rows), candidates[rows].cpu(), batch_size)
        return self.compose(scores, candidates, rows, ranked.to(scores.device)), len(rows)

    def full_sort_predict(self, interaction):
        return self.two_stage_scores(interaction)[0]
