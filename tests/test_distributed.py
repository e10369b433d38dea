# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The end of a distributed run: ``monai_proto.apps.shutdown_distributed`` and the bundles' ``finalize``."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from conftest import BUNDLES, bundle_configs, free_port
from monai.bundle import ConfigParser
from torch.nn.parallel import DistributedDataParallel

from monai_proto.apps import shutdown_distributed


def test_shutdown_releases_the_reducer_then_destroys_the_group(tmp_path):
    """A trained DDP network (gloo, one process): its reducer is released, the group destroyed, and the wrapped
    module still computes what it computed before."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        network = DistributedDataParallel(torch.nn.Conv3d(1, 2, 3), device_ids=None)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        x = torch.randn(1, 1, 6, 6, 6)
        network(x).square().mean().backward()
        optimizer.step()
        with torch.no_grad():
            before = network.module(x)
        assert hasattr(network, "reducer")
        assert shutdown_distributed(network) is True
        assert not dist.is_initialized()
        assert not hasattr(network, "reducer") and not hasattr(network, "logger")  # the logger holds the reducer
        with torch.no_grad():
            torch.testing.assert_close(network.module(x), before)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_shutdown_outside_a_distributed_run_changes_nothing():
    network = torch.nn.Conv2d(1, 1, 1)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    assert shutdown_distributed(network) is False
    assert shutdown_distributed(None) is False
    for k, v in network.state_dict().items():
        torch.testing.assert_close(v, state[k])


@pytest.mark.parametrize("bundle", BUNDLES)
def test_multi_gpu_finalize_releases_the_network_before_the_group(bundle):
    """Every bundle's multi-GPU run ends through ``shutdown_distributed`` on its DDP network, not a bare
    ``destroy_process_group`` (which left the reducer to interpreter shutdown: SIGABRT on gloo, see its docstring)."""
    with open(bundle_configs(bundle, "multi_gpu_train")[0]) as f:
        config = json.load(f)
    assert config["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert config["finalize"] == ["$monai_proto.apps.shutdown_distributed(@network)"]


#: a run of each bundle not covered by tests/test_iapl_bundle.py's torchrun test, two iterations on each rank:
#: MPCL runs ``iterations_per_epoch`` on every rank (its trainer's ``epoch_length``), IPLSL splits its episodes
FAST_DDP = {
    "iplsl_fewshot_segmentation": ["--epochs", "1", "--iterations_per_epoch", "4", "--val_interval", "1",
                                   "--patch_size", "[32, 32, 32]"],
    "mpcl_semisupervised_segmentation": ["--epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "1",
                                         "--prototype_init_iteration", "1", "--num_samples", "1",
                                         "--patch_size", "[32, 32, 32]"],
}  # fmt: skip


@pytest.mark.slow  # torchrun, two processes
@pytest.mark.parametrize("bundle", sorted(FAST_DDP))
def test_multi_gpu_training_runs_under_torchrun_with_gloo(bundle, tmp_path, run_bundle):
    """``torchrun --nproc_per_node=2`` on ``train.json`` + ``multi_gpu_train.json`` (gloo on CPU): both ranks train
    two iterations (the second is where DDP fails when a parameter got no gradient in the first: MPCL's prototype
    head before its bank is initialised) and validate, rank 0 alone saves the checkpoints and writes TensorBoard
    events, and both exit cleanly."""
    config = bundle_configs(bundle, "train") + bundle_configs(bundle, "multi_gpu_train")
    root = tmp_path / "bundle"
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "monai.bundle", "run", "training", "--config_file", str(config), "--bundle_root", str(root),
            *FAST_DDP[bundle]]  # fmt: skip
    result = run_bundle(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.describe()
    assert "terminate called" not in result.output, result.describe()
    assert "Epoch: 1/1, Iter: 2/2 " in result.output, result.describe()  # rank 0's StatsHandler, per iteration
    assert result.output.count("Train completed, saved final checkpoint") == 1, result.describe()
    assert {"model.pt", "model_final.pt", "latest_checkpoint_epoch=1.pt"} <= {
        p.name for p in (root / "models").glob("*.pt")
    }
    # TensorBoard writers only on rank 0: one event file for training, one for validation
    assert len(list((root / "logs").glob("events.out.tfevents.*"))) == 2


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_shuffled_sampler_is_reshuffled_each_epoch(bundle):
    """A ``DistributedSampler`` shuffles by its epoch: every shuffling sampler of a multi-GPU config (MPCL also has
    one for its unlabelled loader, which MONAI's trainer does not reach) gets ``set_epoch`` at each epoch's start,
    in both the ``training`` and the ``run`` lists."""
    with open(bundle_configs(bundle, "multi_gpu_train")[0]) as f:
        config = json.load(f)
    samplers = [
        key
        for key, value in config.items()
        if isinstance(value, dict) and value.get("_target_") == "DistributedSampler" and value.get("shuffle")
    ]
    assert "train#sampler" in samplers
    for key in samplers:
        for run_id in ("training", "run"):
            expressions = config[run_id]
            while isinstance(expressions, str) and expressions.startswith("@"):  # e.g. "training": "@run"
                expressions = config[expressions[1:]]
            assert any(f"@{key}.set_epoch(engine.state.epoch)" in e for e in expressions), (key, run_id)


def _first_batch_on_rank(rank: int, bundle: str, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        parser = ConfigParser()
        parser.read_config(bundle_configs(bundle, "train") + bundle_configs(bundle, "multi_gpu_train"))
        parser.update({"keep_freed_memory": False, "num_samples": 1, "patch_size": [32, 32, 32]})
        parser.get_parsed_content("initialize")  # the process group exists: only the seeding etc. run
        batch = next(iter(parser.get_parsed_content("train#dataloader")))
        torch.save(batch["image"].as_tensor(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each caching scan A
@pytest.mark.parametrize("bundle", ["iapl_segmentation", "mpcl_semisupervised_segmentation"])
def test_each_rank_draws_its_own_augmentation(bundle, tmp_path):
    """The demo data has one training scan, so both ranks load the same volume: with the same seed on every rank
    their random crops were the same and a second rank added nothing. Each rank seeds with ``seed + rank``."""
    torch.multiprocessing.spawn(
        _first_batch_on_rank, args=(bundle, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert first.shape == second.shape
    assert not torch.equal(first, second)


def _episode_transform_draws_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bundle = "iplsl_fewshot_segmentation"
        parser = ConfigParser()
        parser.read_config(bundle_configs(bundle, "train") + bundle_configs(bundle, "multi_gpu_train"))
        parser.update({"keep_freed_memory": False, "patch_size": [32, 32, 32]})
        parser.get_parsed_content("initialize")
        dataset = parser.get_parsed_content("train#dataset")
        draws = [int(t.R.randint(2**31)) for t in (dataset.patch_transform, dataset.query_transform)]
        torch.save(torch.tensor(draws), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each caching scan A
def test_each_rank_seeds_its_own_episode_augmentation(tmp_path):
    """IPLSL's episode dataset seeds its patch and query transforms itself (MONAI's DataLoader reseeds the dataset's
    own random state only), from its ``seed``: ``multi_gpu_train.json`` gives it ``seed + rank``, so the ranks do not
    draw the same intensity augmentation for their different episodes (a single process keeps its draws)."""
    torch.multiprocessing.spawn(
        _episode_transform_draws_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert first[0] != first[1]  # the two streams of one rank
    assert first[0] != second[0] and first[1] != second[1]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_resumed_checkpoints_load_onto_each_ranks_device(bundle):
    """A resumed run loads its checkpoint onto the run's ``device`` (``cuda:<LOCAL_RANK>`` under
    ``multi_gpu_train.json``), not where rank 0 saved it (``cuda:0``), so that no rank allocates on GPU 0."""
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, "train"))
    handlers = [h for h in parser["train"]["handlers"] if h.get("_target_") == "ResumableCheckpoint"]
    assert len(handlers) == 1 and handlers[0]["map_location"] == "@device"
    with open(bundle_configs(bundle, "multi_gpu_train")[0]) as f:
        assert "LOCAL_RANK" in json.load(f)["device"]
