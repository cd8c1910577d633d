"""Data-parallel training over several processes (DDP): set-up, rank-0 helpers, batch sharding.

``torchrun --nproc_per_node=N -m course_lib.train ...`` starts N copies of the same program and
tells each who it is through environment variables: ``RANK`` (0..N-1 over all machines),
``LOCAL_RANK`` (which GPU on this machine), ``WORLD_SIZE`` (N) and ``MASTER_ADDR``/``MASTER_PORT``
(where rank 0 listens). Each copy joins one process group (NCCL between GPUs, gloo on CPUs), keeps
a full replica of the model, and ``DistributedDataParallel`` averages the gradients of all
replicas during ``backward``, so every replica takes the same optimizer step and the parameters
stay identical (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

The data order stays the one of a single-process run: each step's global batch is
``train.batch_indices(step, ...)`` and rank r takes its shard ``indices[r::N]``; the gradient
averaged over the N equal shards equals the single-process gradient of the whole batch (up to
BatchNorm, whose statistics stay per replica). Only rank 0 writes files and shows progress.

Public names: ``setup``, ``cleanup``, ``rank``, ``world_size``, ``is_main``,
``shard``, ``barrier``, ``mean_across_ranks``, ``any_across_ranks``, ``gather_objects``,
``append_jsonl``, ``read_jsonl``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes training together (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one process that prints, logs metrics and writes checkpoints."""
    return rank() == 0


def setup(device: torch.device) -> int:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1); returns the world size.

    NCCL for GPUs, gloo for CPUs (the same code then runs, slowly, on a laptop and in CI).
    """
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world_size()


def cleanup() -> None:
    """Leave the process group (call once at the end of a distributed run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of one step's batch: ``indices[rank::world_size]``.

    A pure function: the shards of all ranks partition the batch, and together they are the
    batch a single process would train on. The batch size must divide evenly, so every replica
    sees as many images and the gradient average weights them all equally.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside 0..{world_size - 1}")
    if len(indices) % world_size:
        raise ValueError(f"batch of {len(indices)} images does not split evenly over {world_size} processes")
    return list(indices[rank::world_size])


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (any shape, float) over all ranks; the identity without DDP."""
    if not dist.is_initialized():
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()


def any_across_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank, so all ranks can stop together (a rank that
    raised alone would leave the others waiting forever in the next gradient all-reduce)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable) as a list indexed by rank; ``[obj]`` without DDP."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (rank 0 only; other ranks do nothing).

    JSON Lines (one object per line) can be tailed while a run writes it, and a run killed
    mid-write loses at most its last line.
    """
    if not is_main():
        return
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file, skipping a last line cut short by a crash."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
