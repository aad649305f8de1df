"""What a trainer needs to run in a ``torch.distributed`` process group (issue 18), on top of RecBole's
own data sharding and DDP: the process's rank, a barrier, one value shared from rank 0, and the
evaluation rows of every rank gathered back into one process's order.

Nothing here starts processes or reduces gradients (RecBole's trainer, DDP and transformers'
Trainer do); it only moves finished values between processes with ``torch.distributed``'s own
collectives.
"""

from __future__ import annotations

from contextlib import contextmanager
from logging import getLogger

import torch
import torch.distributed as dist

logger = getLogger(__name__)

#: the rows of RecBole's evaluation struct that come one per evaluated sample (user or sequence);
#: the other entries (item counts, ...) are the same on every process
ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every process (a no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


@contextmanager
def rank0_first(active: bool = True):
    """Rank 0 runs the block first (e.g. writes a file), the other processes after it (and read it)."""
    active = active and is_distributed()
    if active and rank() != 0:
        barrier()
    yield
    if active and rank() == 0:
        barrier()


def from_rank0(value):
    """``value`` as rank 0 has it, on every process (a picklable object; itself outside a process group)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(value: float) -> float:
    """``value`` summed over every process (itself outside a process group)."""
    if not is_distributed():
        return value
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)  # objects: works on gloo and nccl groups alike
    return sum(values)


def shard_rows(eval_data) -> torch.Tensor | None:
    """The sample indices this process evaluates, in its order, when ``eval_data`` is a full-ranking
    loader sharded by a ``DistributedSampler`` (RecBole's, ``shuffle=False``: rank r gets r, r+W, ...,
    padded by repeating the first ones); ``None`` otherwise."""
    from recbole.data.dataloader import FullSortEvalDataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not is_distributed() or not isinstance(eval_data, FullSortEvalDataLoader):
        return None
    if not isinstance(getattr(eval_data, "sampler", None), DistributedSampler):
        return None
    return torch.as_tensor(list(iter(eval_data.sampler)), dtype=torch.long)


def gather_rows(struct, rows: torch.Tensor):
    """RecBole's evaluation ``struct`` of every process merged into the one a single process would
    have collected: per-sample rows ordered by sample index, the sampler's padding duplicates dropped.

    The metrics computed from it are then exactly those of one process (RecBole's own ``_map_reduce``
    averages per-process metrics weighted by batch counts, which is not the mean over users).
    """
    keys = [k for k in ROW_KEYS if k in struct]
    local = {k: struct[k].cpu() for k in keys}
    for k in keys:
        if len(local[k]) != len(rows):
            raise RuntimeError(f"evaluation struct {k!r} has {len(local[k])} rows for {len(rows)} sampled rows; "
                               "the distributed gather needs one row per evaluated sample")
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (rows, local))
    index = torch.cat([p[0] for p in parts])
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones(len(sorted_index), dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]  # padding repeats samples of rank 0 / 1 / ...
    keep = order[first]
    if not torch.equal(index[keep], torch.arange(len(keep))):
        raise RuntimeError("the processes' evaluation rows do not cover the samples 0..n-1 once each")
    for k in keys:
        struct.set(k, torch.cat([p[1][k] for p in parts])[keep])
    return struct
