"""distributed: batch sharding, device choice, JSONL helpers, and DDP with 2 CPU processes (gloo)."""
import dataclasses
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from course_lib import checkpoints, distributed, presets, train, train_cli, utils


def test_shards_partition_each_step_batch():
    batch = train.batch_indices(3, 20, 4, seed=1)
    shards = [distributed.shard(batch, r, 2) for r in range(2)]
    assert shards == [batch[0::2], batch[1::2]]
    assert sorted(shards[0] + shards[1]) == sorted(batch)
    assert distributed.shard(batch, 0, 1) == batch
    with pytest.raises(ValueError, match="does not split evenly over 3"):
        distributed.shard(batch, 0, 3)
    with pytest.raises(ValueError, match="rank=2"):
        distributed.shard(batch, 2, 2)


def test_sampler_shards_are_the_single_process_batches():
    whole = list(train.StepBatchSampler(10, 4, seed=5, start=2, stop=6))
    parts = [list(train.StepBatchSampler(10, 4, seed=5, start=2, stop=6, rank=r, world_size=2)) for r in range(2)]
    assert whole == [train.batch_indices(s, 10, 4, 5) for s in range(2, 6)]
    assert [a + b for a, b in zip(*parts)] != [] and all(
        sorted(a + b) == sorted(w) for a, b, w in zip(*parts, whole))


def test_device_choice_and_errors():
    assert utils.device("cpu", verbose=False) == torch.device("cpu")
    assert utils.device("auto", verbose=False).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        utils.device("tpu", verbose=False)
    if not torch.cuda.is_available():
        with pytest.raises(utils.DeviceError, match="no CUDA GPU is visible"):
            utils.device("cuda", verbose=False)


def test_single_process_helpers_are_identities(tmp_path):
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    values = torch.tensor([1.0, 2.0])
    assert distributed.mean_across_ranks(values) is values
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.any_across_ranks(True, torch.device("cpu"))


def test_jsonl_skips_a_line_cut_short(tmp_path):
    path = tmp_path / "m.jsonl"
    distributed.append_jsonl(path, {"step": 1, "loss": 0.5})
    distributed.append_jsonl(path, {"step": 2, "loss": 0.25})
    with open(path, "a") as handle:
        handle.write('{"step": 3, "lo')  # a run killed mid-write
    assert distributed.read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, params_dir: str) -> None:
    """One torchrun-like process: the environment variables torchrun sets, then the CLI's run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run = presets.quick_run()
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=2, eval_every=0, checkpoint_every=1))
    if rank == 1:  # the slower rank: it must not find rank 0's new files and take them for an old run
        make_datasets = train_cli.make_datasets
        train_cli.make_datasets = lambda run: (time.sleep(2.0), make_datasets(run))[1]
    try:
        net, _ = train_cli.run_training(run, out, progress=False)
        params = {name: p.detach() for name, p in net.named_parameters()}
        torch.save(params, os.path.join(params_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def test_ddp_two_cpu_processes_stay_in_sync_and_only_rank0_writes(tmp_path):
    out, params_dir = tmp_path / "ddp", tmp_path / "params"
    params_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), str(params_dir)), nprocs=2, join=True)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl", "run.json", "summary.json"]
    rank0, rank1 = (torch.load(params_dir / f"rank{r}.pt") for r in range(2))
    saved = checkpoints.read_checkpoint(out / "last.pt")
    assert saved["step"] == 2 and len(saved["rng_per_rank"]) == 2
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name     # DDP kept the weights identical ...
        assert torch.equal(value, saved["model"][name]), name  # ... and rank 0 saved them
    # (BatchNorm's running statistics stay per replica; DDP broadcasts rank 0's at each forward.)
    steps = [r["step"] for r in distributed.read_jsonl(out / "metrics.jsonl")]
    assert steps == [1, 2]                                # one line per step, not one per rank
