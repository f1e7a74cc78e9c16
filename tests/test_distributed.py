"""Data-parallel meta-training: N processes (gloo over loopback) take the one-process steps."""

import copy
import json
import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bilevel.app import distributed
from bilevel.app.experiments.fewshot import FewshotConfig
from bilevel.app.experiments.fewshot.learners import episode_groups, per_episode_norm
from bilevel.app.experiments.fewshot.train import TrainingError, build
from tests.conftest import DATA, in_process, metrics, needs_omniglot, start_torchrun
from tests.test_fewshot import TINY

CONFIG = dict(width=0.125, train_classes=40, val_classes=20, meta_batch=4, learn_inner_lr=True)


def test_episode_batch_norm_is_batch_norm_of_each_episode():
    torch.manual_seed(0)
    net = per_episode_norm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    alone = [copy.deepcopy(net) for _ in range(3)]
    x = torch.randn(3 * 5, 1, 8, 8)
    with episode_groups(net, 3):
        together = net(x)
    for g, single in enumerate(alone):  # plain BatchNorm2d on one episode's images
        expected = single(x[5 * g : 5 * (g + 1)])
        torch.testing.assert_close(together[5 * g : 5 * (g + 1)], expected, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):  # one update, by the mean of the episodes'
        mean = torch.stack([getattr(s[1], name) for s in alone]).mean(0)
        torch.testing.assert_close(getattr(net[1], name), mean)
    assert int(net[1].num_batches_tracked) == 1
    assert net(x).shape == x.shape[:1] + (4, 6, 6)  # outside the block: plain batch norm


def test_shard_refuses_uneven_splits():
    parts = distributed.shard([torch.arange(6), torch.arange(12).view(6, 2)], 1, 3)
    assert parts[0].tolist() == [2, 3] and parts[1].tolist() == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="meta_batch = 4 does not split evenly over 3"):
        distributed.shard([torch.arange(4)], 0, 3, "meta_batch")


def _one_step(group):
    """The gradients and batch-norm statistics after one training step."""
    torch.set_num_threads(1)
    trainer = build(FewshotConfig(**CONFIG), DATA, "bilevel", logging.getLogger("t"), group)
    loss, accuracy = trainer.train_step()
    learner = trainer.learner
    return {
        "grads": {k: p.grad.clone() for k, p in learner.named_parameters()},
        "buffers": {k: b.clone() for k, b in learner.named_buffers()},
        "loss": loss,
        "accuracy": accuracy,
    }


def _worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = _one_step(distributed.init("cpu"))
        if rank == 0:
            torch.save(result, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
@needs_omniglot
def test_two_processes_give_the_one_process_gradient(tmp_path):
    path = tmp_path / "two.pt"
    mp.start_processes(
        _worker, (distributed.free_port(), str(path)), nprocs=2, start_method="spawn"
    )
    two = torch.load(path)
    threads = torch.get_num_threads()
    try:
        one = _one_step(distributed.Group())
    finally:
        torch.set_num_threads(threads)
    assert set(one["grads"]) == set(two["grads"]) and "log_lr" in one["grads"]
    for name, grad in one["grads"].items():
        assert grad.abs().sum() > 0, name  # every parameter gets a hypergradient
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6)
    for name, buffer in one["buffers"].items():  # running statistics: the same one update
        torch.testing.assert_close(two["buffers"][name], buffer, rtol=1e-5, atol=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["accuracy"] == pytest.approx(one["accuracy"], rel=1e-6)


@pytest.mark.e2e
@needs_omniglot
def test_torchrun_two_processes_follow_the_one_process_run(tmp_path):
    settings = [*TINY, "--set", "iterations=6", "--set", "validate_every=3"]
    process = start_torchrun("fewshot", "train", *settings, "--out", tmp_path / "two", processes=2)
    result = in_process("fewshot", "train", *settings, "--out", tmp_path / "one")
    assert result.exit_code == 0, result.output
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [x["kind"] for x in two] == [x["kind"] for x in one] and len(one) == 8
    for a, b in zip(one, two):
        assert b["iteration"] == a["iteration"]
        assert b["accuracy"] == pytest.approx(a["accuracy"], rel=1e-5)
        if a["kind"] == "train":
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # only rank 0 wrote: the same files as one process, and it says how many processes ran
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir())
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed"


def test_settings_that_do_not_split_over_the_processes_are_refused():
    log, two = logging.getLogger("t"), distributed.Group(rank=0, size=2)
    with pytest.raises(TrainingError, match="meta_batch=3 does not split evenly over 2"):
        build(FewshotConfig(meta_batch=3), DATA, "bilevel", log, two)  # before any data is read
    with pytest.raises(TrainingError, match="train_batch_norm='meta-batch' needs one process"):
        build(FewshotConfig(train_batch_norm="meta-batch"), DATA, "bilevel", log, two)
    with pytest.raises(TrainingError, match="classical_batch=25 does not split evenly over 2"):
        build(FewshotConfig(classical_batch=25), DATA, "classical", log, two)
