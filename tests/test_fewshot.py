"""The few-shot experiment on small real slices of Omniglot: train, test, classical, resume."""

import copy
import json
import shutil
import signal
import time
from functools import partial

import numpy as np
import pytest
import torch

from bilevel.app import checkpoints
from bilevel.app.data import Episodes
from bilevel.app.experiments.fewshot import PRESETS, FewshotConfig
from bilevel.app.experiments.fewshot.config import EPISODE_KEYS, TEST_KEYS
from bilevel.app.experiments.fewshot.learners import (
    Learner,
    _episode_features,
    evaluate,
    meta_loss,
    train_heads,
)
from tests.conftest import DATA, bilevel_command, in_process, metrics, needs_omniglot, start_bilevel

TINY = [
    "--preset", "quick",
    "--set", "width=0.125",
    "--set", "train_classes=40",
    "--set", "val_classes=20",
    "--set", "val_episodes=20",
    "--set", "validate_every=10",
    "--set", "log_every=1",
    "--quiet",
    "--data-dir", str(DATA),
]  # fmt: skip
ITERATIONS = 40


def train(out, *extra, command="train"):
    result = in_process("fewshot", command, *TINY, *extra, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of ITERATIONS iterations with a learned inner learning rate."""
    out = tmp_path_factory.mktemp("fewshot") / "run"
    return train(out, "--set", f"iterations={ITERATIONS}", "--set", "learn_inner_lr=true")


@pytest.mark.e2e
@needs_omniglot
def test_train_writes_metrics_checkpoints_summary_and_curve(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["mode"] == "bilevel"
    assert summary["iterations"] == ITERATIONS and summary["stopped"] == "budget"
    assert summary["features"] == 8 * 2 * 2 and summary["inner_lr"] != 0.1  # learned
    lines = metrics(trained)
    train_lines = [x for x in lines if x["kind"] == "train"]
    val_lines = [x for x in lines if x["kind"] == "val"]
    assert [x["iteration"] for x in train_lines] == list(range(1, ITERATIONS + 1))
    assert [x["iteration"] for x in val_lines] == [10, 20, 30, 40]
    assert max(x["accuracy"] for x in val_lines) == summary["best_val_accuracy"]
    assert all(0 <= x["accuracy"] <= 100 and x["ci95"] > 0 for x in val_lines)
    lr = [x["outer_lr"] for x in train_lines]  # inverse-time decay, one step per iteration
    assert lr[9] == pytest.approx(1e-3 / (1 + 1e-5 * 10))
    for name in ("checkpoint.pt", "best.pt"):
        assert (trained / name).is_file()
    assert (trained / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
@needs_omniglot
def test_test_command_reports_accuracy_with_ci_by_inner_steps(trained, tmp_path):
    out = tmp_path / "test"
    # a process of its own: `bilevel fewshot test` as users run it
    result = bilevel_command(
        "fewshot", "test", trained, "--out", out, "--data-dir", DATA, "--quiet",
        "--set", "test_episodes=60", "--set", "test_steps=[1,3,10]", "--set", "test_classes=40",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["episodes"] == 60
    assert [r["steps"] for r in summary["by_steps"]] == [1, 3, 5, 10]  # 5: the trained T
    main = next(r for r in summary["by_steps"] if r["steps"] == 5)
    assert (summary["accuracy"], summary["ci95"]) == (main["accuracy"], main["ci95"])
    for row in summary["by_steps"]:
        assert 0 < row["accuracy"] <= 100 and 0 < row["ci95"] < 15
    assert summary["checkpoint"].endswith("best.pt") and summary["batch_norm"] == "transductive"
    assert (out / "accuracy_vs_steps.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
@needs_omniglot
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_run_made_on_a_gpu_is_tested_here_with_device_cpu(trained, tmp_path):
    run = tmp_path / "gpu-run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("test*"))
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["device"] = "cuda"  # as `--set device=cuda` writes it on a GPU machine
    (run / "config.json").write_text(json.dumps(saved))
    small = ["--data-dir", DATA, "--quiet", "--set", "test_episodes=20", "--set", "test_classes=40"]
    refused = in_process("fewshot", "test", run, *small)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "CUDA is not available on this machine (use --device cpu" in refused.output
    tested = in_process("fewshot", "test", run, *small, "--device", "cpu", "--out", tmp_path / "t")
    assert tested.exit_code == 0, tested.output
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.e2e
@needs_omniglot
def test_compare_plots_the_validation_curves_of_runs(trained, tmp_path):
    from bilevel.app.experiments.fewshot.compare import validation_curve

    curve = validation_curve(trained)
    val_lines = [x for x in metrics(trained) if x["kind"] == "val"]
    assert curve.iterations == [x["iteration"] for x in val_lines] == [10, 20, 30, 40]
    assert curve.accuracy == [x["accuracy"] for x in val_lines]
    assert 0 < curve.minutes[0] < curve.minutes[1] < curve.minutes[2] < curve.minutes[3]
    out = tmp_path / "figures" / "recipes.png"
    result = in_process("fewshot", "compare", trained, trained, "--label", "a", "--label", "b",
                        "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG" and list(out.parent.iterdir()) == [out]


def compare(*args):
    return in_process("fewshot", "compare", *args)


def test_compare_refuses_what_is_not_a_training_run_in_one_line(tmp_path):
    figure = tmp_path / "f.png"
    result = compare(tmp_path, "--out", figure)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not a training run (no config.json)" in result.output
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "fewshot-train"}))
    assert "config.json is not a run's config.json" in compare(tmp_path, "--out", figure).output
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "fewshot-test", "config": {}}))
    assert "holds a fewshot-test run" in compare(tmp_path, "--out", figure).output
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "fewshot-train", "config": {}}))
    for bad in ('{"kind": "train"}', '{"kind": "val", "iteration": 5, "seconds": 1}', "[1]"):
        (tmp_path / "metrics.jsonl").write_text(bad + "\n" + '{"kind": "train"}\n')
        result = compare(tmp_path, "--out", figure)
        assert result.exit_code == 2 and "line 1 is not a metrics line" in result.output
    result = compare(tmp_path, "--label", "a", "--label", "b", "--out", figure)
    assert result.exit_code == 2 and "2 labels for 1 runs" in result.output
    for out, message in ((tmp_path / "f.xyz", "--out: a figure file ending in .png"),
                         (tmp_path / "d.png", "is a directory")):  # fmt: skip
        (tmp_path / "d.png").mkdir(exist_ok=True)
        result = compare(tmp_path, "--out", out)
        assert result.exit_code == 2 and message in result.output
    assert not figure.exists()


@pytest.mark.e2e
@needs_omniglot
def test_compare_leaves_out_a_last_line_cut_short(trained, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("test*"))
    with open(run / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write('{"kind": "val", "iter')  # a process killed mid-line
    result = compare(run, "--out", tmp_path / "f.svg")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.e2e
@needs_omniglot
def test_resume_continues_with_the_same_numbers(trained, tmp_path):
    half = train(tmp_path / "half", "--set", f"iterations={ITERATIONS // 2}", "--set",
                 "learn_inner_lr=true")  # fmt: skip
    assert len(metrics(half)) < len(metrics(trained))
    train(half, "--set", f"iterations={ITERATIONS}", "--set", "learn_inner_lr=true", "--resume")
    assert metrics(half) == metrics(trained)


@pytest.mark.e2e
@needs_omniglot
def test_an_interrupted_run_resumes_with_the_same_numbers(trained, tmp_path):
    out = tmp_path / "interrupted"
    args = [*TINY, "--set", f"iterations={ITERATIONS}", "--set", "learn_inner_lr=true"]
    process = start_bilevel("fewshot", "train", *args, "--out", out)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and process.poll() is None, process.stderr
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    stopped = json.loads((out / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["iterations"] < ITERATIONS
    assert stopped["stopped"] is None
    train(out, "--set", f"iterations={ITERATIONS}", "--set", "learn_inner_lr=true", "--resume")
    assert metrics(out) == metrics(trained)


@pytest.mark.e2e
@needs_omniglot
def test_corrupt_or_foreign_checkpoint_is_one_line_and_leaves_the_run(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    before = (copy / "metrics.jsonl").read_bytes()
    result = in_process("fewshot", "train", *TINY, "--set", "inner_steps=3", "--out", copy,
                        "--resume")  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "another configuration" in result.output and "inner_steps=5 there, 3 here" in result.output
    )
    data = bytearray((copy / "checkpoint.pt").read_bytes())
    data[-10] ^= 0xFF
    (copy / "checkpoint.pt").write_bytes(bytes(data))
    result = in_process("fewshot", "train", *TINY, "--set", "learn_inner_lr=true", "--out", copy,
                        "--resume")  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "corrupt" in result.output and len(result.output.strip().splitlines()) == 1
    assert (copy / "metrics.jsonl").read_bytes() == before  # nothing of the run was overwritten


@pytest.mark.e2e
@needs_omniglot
def test_early_stopping_after_patience_validations_without_improvement(tmp_path):
    # a learning rate too small to change any prediction: the second validation cannot improve
    out = train(tmp_path / "stalled", "--set", "outer_lr=1e-12", "--set", "patience=1",
                "--set", "validate_every=5", "--set", "iterations=40")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "no improvement in 1 validations"
    assert summary["iterations"] == 10 and summary["best_iteration"] == 5


@pytest.mark.e2e
@needs_omniglot
def test_a_run_stopped_before_its_first_validation_reports_no_best_yet(tmp_path):
    out = train(tmp_path / "short", "--set", "iterations=2")  # validates every 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["stopped"] == "budget"
    best = ("best_val_accuracy", "best_val_ci95", "best_iteration")
    assert [summary[k] for k in best] == [None, None, None]  # null, not placeholders
    result = in_process("fewshot", "test", out, "--data-dir", DATA, "--quiet",
                        "--set", "test_episodes=20", "--set", "test_steps=[5]",
                        "--set", "test_classes=20")  # fmt: skip
    assert result.exit_code == 0, result.output
    tested = json.loads((out / "test" / "summary.json").read_text())
    assert tested["best_val_accuracy"] is None and tested["checkpoint"].endswith("checkpoint.pt")


@pytest.mark.e2e
@needs_omniglot
def test_classical_baseline_trains_and_tests(tmp_path):
    out = train(tmp_path / "classical", "--set", "iterations=10", command="classical")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "classical" and summary["best_iteration"] == 10
    lines = metrics(out)
    assert lines[0]["loss"] > 3  # cross-entropy over 40 classes starts near log(40)
    result = in_process(
        "fewshot", "test", out, "--data-dir", DATA, "--quiet",
        "--set", "test_episodes=20", "--set", "test_steps=[5]", "--set", "test_classes=20",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "test" / "summary.json").read_text())["episodes"] == 20
    # the same network on another cell: 10-way 2-shot episodes
    result = in_process(
        "fewshot", "test", out, "--data-dir", DATA, "--quiet", "--out", tmp_path / "10w2s",
        "--set", "test_episodes=20", "--set", "test_steps=[5]", "--set", "test_classes=20",
        "--set", "ways=10", "--set", "shots=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "10w2s" / "summary.json").read_text())
    assert (summary["ways"], summary["shots"]) == (10, 2)
    # pretraining, then bilevel fine-tuning: the fine-tuned network starts from the classical one
    # (another seed than the classical run's: a network of its own unless initialised)
    tuned = train(tmp_path / "tuned", "--seed", "1", "--set", "iterations=2",
                  "--set", f"init_from={out}")  # fmt: skip
    scratch = train(tmp_path / "scratch", "--seed", "1", "--set", "iterations=2")
    nets = [
        {k: v for k, v in checkpoints.load(run / "checkpoint.pt")["learner"].items()
         if k.startswith("net.") and "running" not in k and "batches" not in k}
        for run in (out, tuned, scratch)
    ]  # fmt: skip
    distance = lambda a, b: sum(float((a[k] - b[k]).norm()) for k in a)  # noqa: E731
    assert distance(nets[1], nets[0]) < 0.1 * distance(nets[2], nets[0])
    result = in_process("fewshot", "train", *TINY, "--set", "width=0.25",
                        "--set", f"init_from={out}", "--out", tmp_path / "misfit")  # fmt: skip
    assert result.exit_code == 1 and "its network does not fit this model" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train_classes=3"], "ways=5 exceeds the 3 train classes available"),
        (["--set", "shots=10"], "shots + queries = 25 exceeds the 20 examples per class"),
        (["--set", "split=ravi"], "split 'ravi' is mini-ImageNet's"),
        (["--set", "test_steps=[0,5]"], "test_steps must all be positive"),
        (["--preset", "omniglot-5w1s", "--resume"], "--resume needs --out"),
    ],
)
def test_bad_configuration_is_one_clear_line(args, message, tmp_path):
    result = in_process("fewshot", "train", "--preset", "quick", *args, "--data-dir", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or written


# Every setting `fewshot test --set` accepts, with a value other than the trained run's.
TEST_SETTINGS = [
    ("test_batch_norm", "running"),
    ("test_batch_norm", "separate"),
    ("test_batch_norm", "transductive"),
    ("test_seed", 3),
    ("test_episodes", 21),
    ("test_steps", [2]),
    ("test_classes", 30),
    ("device", "cpu"),
    ("memory_format", "contiguous"),  # the throughput settings (test_fewshot_speed.py)
    ("fused_blocks", False),
    ("episodes_on_device", True),
    ("ways", 3),
    ("shots", 2),
    ("queries", 4),
]
SMALL_TEST = ["--data-dir", DATA, "--quiet", "--set", "test_episodes=20", "--set",
              "test_steps=[5]", "--set", "test_classes=40"]  # fmt: skip


def test_every_test_setting_has_a_case():
    assert {key for key, _ in TEST_SETTINGS} == TEST_KEYS | EPISODE_KEYS


@pytest.mark.e2e
@needs_omniglot
@pytest.mark.parametrize("key,value", TEST_SETTINGS, ids=lambda v: str(v))
def test_every_test_setting_works_on_a_run_trained_with_the_defaults(trained, tmp_path, key, value):
    out = tmp_path / "test"
    result = in_process("fewshot", "test", trained, *SMALL_TEST, "--set",
                        f"{key}={json.dumps(value)}", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"][key] == value
    summary = json.loads((out / "summary.json").read_text())
    reported = {"test_batch_norm": "batch_norm", "test_episodes": "episodes"}
    reported.update(ways="ways", shots="shots")
    if key in reported:
        assert summary[reported[key]] == value
    assert summary["status"] == "completed" and 0 <= summary["accuracy"] <= 100


def resume(run, *extra):
    return in_process("fewshot", "train", *TINY, "--set", f"iterations={ITERATIONS}", "--set",
                      "learn_inner_lr=true", *extra, "--out", run, "--resume")  # fmt: skip


@pytest.mark.e2e
@needs_omniglot
def test_the_validation_mode_binds_a_checkpoint_and_the_test_mode_does_not(trained, tmp_path):
    # validation picks best.pt and stops training early: a resumed run must validate alike
    run = tmp_path / "copy"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("test*"))
    refused = resume(run, "--set", "val_batch_norm=running")
    assert refused.exit_code == 1
    assert "val_batch_norm='transductive' there, 'running' here" in refused.output
    accepted = resume(run, "--set", "test_batch_norm=running")
    assert accepted.exit_code == 0, accepted.output
    assert metrics(run) == metrics(trained)


def as_before_val_batch_norm(run, validation):
    """Make ``run`` as a run whose validation used ``validation`` was written before
    val_batch_norm existed: config.json without it, and checkpoints bound to test_batch_norm."""
    saved = json.loads((run / "config.json").read_text())
    saved["config"].pop("val_batch_norm")
    saved["config"]["test_batch_norm"] = validation
    (run / "config.json").write_text(json.dumps(saved))
    config = FewshotConfig(**{**saved["config"], "val_batch_norm": validation})
    bound = {**config.hashed(), "mode": "bilevel"}
    bound["test_batch_norm"] = bound.pop("val_batch_norm")  # the identity those runs had
    for name in ("best.pt", "checkpoint.pt"):
        checkpoints.save(run / name, checkpoints.load(run / name), bound)


@pytest.mark.e2e
@needs_omniglot
def test_a_run_written_before_val_batch_norm_still_tests_and_resumes(trained, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("test*"))
    as_before_val_batch_norm(run, "running")
    for mode in ("transductive", "separate"):
        result = in_process("fewshot", "test", run, *SMALL_TEST, "--set",
                            f"test_batch_norm={mode}", "--out", tmp_path / mode)  # fmt: skip
        assert result.exit_code == 0, result.output
    assert resume(run, "--set", "val_batch_norm=transductive").exit_code == 1
    result = resume(run, "--set", "val_batch_norm=running")  # it validated with running
    assert result.exit_code == 0, result.output


def test_test_command_refuses_training_settings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "fewshot-train", "config": {}}))
    result = in_process("fewshot", "test", tmp_path, "--set", "inner_steps=3")
    assert result.exit_code == 2 and "--set inner_steps: only device, episodes_on_" in result.output


# --- the learner, in process ----------------------------------------------------------------


def random_episodes(b=3, ways=4, shots=2, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.arange(ways).repeat_interleave(n).expand(b, -1).clone()  # noqa: E731
    return Episodes(
        torch.rand(b, ways * shots, 1, 28, 28, generator=g),
        labels(shots),
        torch.rand(b, ways * queries, 1, 28, 28, generator=g),
        labels(queries),
        torch.zeros(b, ways, dtype=torch.long),
    )


def test_episodes_of_a_meta_batch_stay_independent():
    torch.manual_seed(0)
    learner = Learner(FewshotConfig(width=0.25, learn_inner_lr=True))
    support = torch.randn(3, 8, 16, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2).expand(3, -1)
    together = train_heads(learner, support, labels, 4, 5, "graph")
    for b in range(3):
        alone = train_heads(learner, support[b : b + 1], labels[b : b + 1], 4, 5, "graph")
        torch.testing.assert_close(together["W"][b], alone["W"][0], rtol=1e-5, atol=1e-7)
    # the query loss of episode 0 sends gradient to episode 0's support features only
    together["W"][0].sum().backward()
    assert support.grad[0].abs().sum() > 0 and support.grad[1:].abs().sum() == 0


def double(batch: Episodes) -> Episodes:
    return Episodes(*(t.double() if t.is_floating_point() else t for t in batch))


@pytest.mark.parametrize("feature_norm", [None, 3.0])
def test_meta_gradient_of_the_network_matches_finite_differences(feature_norm):
    torch.manual_seed(0)
    config = FewshotConfig(width=0.25, ways=4, shots=2, queries=3, feature_norm=feature_norm)
    learner, batch = Learner(config).double(), double(random_episodes())
    meta_loss(learner, batch, config)[0].backward()
    parameters = dict(learner.named_parameters())
    last_scale = [n for n in parameters if n.endswith("weight") and parameters[n].dim() == 1][-1]
    for name in (next(iter(parameters)), last_scale):  # the first convolution, the last BN
        weight, entry, eps = parameters[name], (0,) * parameters[name].dim(), 1e-6
        losses = []
        for shift in (eps, -eps):
            with torch.no_grad():
                weight[entry] += shift
                losses.append(float(meta_loss(learner, batch, config)[0]))
                weight[entry] -= shift
        numeric = (losses[0] - losses[1]) / (2 * eps)
        assert float(weight.grad[entry]) == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def test_feature_norm_holds_in_training_and_in_evaluation():
    torch.manual_seed(0)
    learner = Learner(FewshotConfig(width=0.25, feature_norm=3.0))
    batch = random_episodes()
    images = torch.cat([batch.support_x, batch.query_x], 1)
    trained = learner.net(images.flatten(0, 1))  # the training path (one forward pass)
    support, query = _episode_features(learner.net, batch, "transductive")  # functional calls
    for features in (trained, support, query):
        torch.testing.assert_close(features.norm(dim=-1), torch.full(features.shape[:-1], 3.0))
    assert set(learner.state_dict()) == set(Learner(FewshotConfig(width=0.25)).state_dict())


def with_running_statistics(learner):
    """Running statistics far from any batch's: the modes that use them differ visibly."""
    g = torch.Generator().manual_seed(1)
    for module in learner.net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=g))
            module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
    return learner


def replaced(batch, **parts):
    return Episodes(**{**batch._asdict(), **parts})


def test_batch_norm_modes_normalise_what_they_say():
    torch.manual_seed(0)
    learner = with_running_statistics(Learner(FewshotConfig(width=0.25)).double())
    net, batch = learner.net, double(random_episodes(b=2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    other = double(random_episodes(b=2, seed=1))  # other images for support or query
    new_support = replaced(batch, support_x=other.support_x)
    new_query = replaced(batch, query_x=other.query_x)
    features = {
        m: _episode_features(net, batch, m) for m in ("transductive", "separate", "running")
    }

    def alone(images, training):  # nn.BatchNorm2d itself, on exactly these images
        return copy.deepcopy(net).train(training)(images)  # a copy: its statistics may move

    for b in range(batch.support_x.shape[0]):
        support, query = batch.support_x[b], batch.query_x[b]
        n = len(support)
        together = alone(torch.cat([support, query]), True)
        close = partial(torch.testing.assert_close, rtol=1e-10, atol=1e-12)
        close(features["transductive"][0][b], together[:n])  # support+query one batch
        close(features["transductive"][1][b], together[n:])
        close(features["separate"][0][b], alone(support, True))  # each its own batch
        close(features["separate"][1][b], alone(query, True))
        for i in (0, len(query) - 1):  # an image alone, by the running statistics
            close(features["running"][1][b, i], alone(query[i : i + 1], False)[0])
    # what each mode's query features depend on
    differs = lambda a, b: not torch.allclose(a, b, rtol=1e-6, atol=1e-9)  # noqa: E731
    query = {m: f[1] for m, f in features.items()}
    assert differs(_episode_features(net, new_support, "transductive")[1], query["transductive"])
    assert torch.equal(_episode_features(net, new_support, "separate")[1], query["separate"])
    assert torch.equal(_episode_features(net, new_query, "separate")[0], features["separate"][0])
    assert torch.equal(_episode_features(net, new_support, "running")[1], query["running"])
    one_query = replaced(batch, query_x=other.query_x.clone())
    one_query.query_x[:, 1:] = batch.query_x[:, 1:]  # only the first query image changes
    assert differs(
        _episode_features(net, one_query, "separate")[1][:, 1:], query["separate"][:, 1:]
    )
    torch.testing.assert_close(_episode_features(net, one_query, "running")[1][:, 1:],
                               query["running"][:, 1:], rtol=1e-12, atol=1e-12)  # fmt: skip
    for a, b in (
        ("transductive", "separate"),
        ("separate", "running"),
        ("transductive", "running"),
    ):
        assert differs(query[a], query[b]), (a, b)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # left untouched
    with pytest.raises(ValueError, match="batch_norm='inductive': expected one of transductive"):
        _episode_features(net, batch, "inductive")


class Batches:
    def __init__(self, batch):
        self.batch = batch

    def sample(self):
        return self.batch


def test_evaluation_continues_heads_exactly_and_keeps_running_statistics():
    torch.manual_seed(0)
    learner = Learner(FewshotConfig(width=0.25))
    before = {k: v.clone() for k, v in learner.net.state_dict().items()}
    batch = random_episodes()
    stepwise = evaluate(learner, Batches(batch), 3, [2, 7], "transductive")
    direct = evaluate(learner, Batches(batch), 3, [7], "transductive")
    np.testing.assert_array_equal(stepwise[7], direct[7])
    after = learner.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    running = evaluate(learner, Batches(batch), 3, [7], "running")
    assert running[7].shape == (3,) and learner.net.training


def test_evaluation_split_over_ranks_gives_each_episode_once():
    torch.manual_seed(0)
    learner = Learner(FewshotConfig(width=0.25))
    draws = [random_episodes(seed=s) for s in range(3)]

    class Stream:  # three different draws, then again
        def __init__(self):
            self.i = 0

        def sample(self):
            self.i += 1
            return draws[(self.i - 1) % 3]

    whole = evaluate(learner, Stream(), 8, [5], "transductive")[5]  # 3 + 3 + 2 episodes
    shares = [evaluate(learner, Stream(), 8, [5], "transductive", share=(r, 2))[5] for r in (0, 1)]
    mine = [[False] * 3 + [True] * 3 + [False] * 2, [True] * 3 + [False] * 3 + [True] * 2]
    assert [list(np.isnan(s)) for s in shares] == mine
    np.testing.assert_array_equal(np.where(np.isnan(shares[0]), shares[1], shares[0]), whole)


def test_a_setting_added_later_leaves_earlier_checkpoints_loadable():
    # runs checkpointed before init_from existed must still resume and test
    assert "init_from" not in FewshotConfig().hashed()
    assert "feature_norm" not in FewshotConfig().hashed()
    assert FewshotConfig(feature_norm=28).hashed()["feature_norm"] == 28
    assert FewshotConfig(init_from="runs/pretrained").hashed()["init_from"] == "runs/pretrained"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves_and_states_its_cell(preset):
    config = FewshotConfig(**PRESETS[preset])
    if preset != "quick":
        dataset, cell = preset.split("-")[:2]
        assert (config.dataset, f"{config.ways}w{config.shots}s") == (dataset, cell)
    if preset.endswith("resnet"):
        assert config.model == "resnet-paper"
