"""Samplers for rankers and candidate sets (RecBole AbstractSampler subclasses)."""
