"""Samplers for rankers and candidate sets, exported here as RecBole exports its own samplers."""

from recbole_mm.sampler.candidate_sets import CandidateSetSampler
from recbole_mm.sampler.ranker_negatives import RankerNegativeSampler

__all__ = ["CandidateSetSampler", "RankerNegativeSampler"]
