"""Trainers: RecBole's, with weights-only checkpoints, resumable runs and per-epoch timings."""

from recbole_mm.trainer.mixin import RecBoleMMTrainerMixin, with_recbole_mm_features

__all__ = ["RecBoleMMTrainerMixin", "with_recbole_mm_features"]
