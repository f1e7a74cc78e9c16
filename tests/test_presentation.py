"""What a person at the console sees: log lines that leave progress bars whole, one outcome
line, rounded numbers, the few-shot bar's accuracy in percent, and counts in good English."""

import io
import json
import logging
import re
import sys

import pytest
import torch

from bilevel.app import checkpoints, runs
from bilevel.app.experiments import hparams, stages
from bilevel.app.experiments.fewshot import FewshotConfig
from bilevel.app.experiments.fewshot.train import build
from bilevel.app.experiments.hyperclean import HypercleanConfig
from tests.test_cli_runs import TINY, hyperclean, needs_mnist
from tests.test_distributed import CONFIG
from tests.test_fewshot import DATA, in_process, needs_omniglot


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that progress bars draw."""

    def isatty(self):
        return True


def test_a_log_line_does_not_break_into_a_progress_bar(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run = runs.Run(tmp_path, {"experiment": "console"})
    bar = run.progress(total=10, desc="training")
    bar.update()
    run.log.info("validation accuracy 51.20")
    bar.update()
    bar.close()
    run.finish("completed")
    shown = terminal.getvalue()
    # the line starts a line of its own: the bar was lifted off it first
    assert re.search(r"(^|[\r\n])(\x1b\[A)?\d\d:\d\d:\d\d validation accuracy 51\.20\n", shown), (
        shown
    )


@needs_mnist
def test_the_console_gets_one_completed_line(tmp_path):
    result = in_process("hyperclean", *[a for a in TINY if a != "--quiet"], "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.count("completed") == 1, result.output
    assert "start: hyperclean" in result.output  # the log did reach the console
    assert "completed: results in" in (tmp_path / "run.log").read_text()


def untimed(out) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@needs_mnist
def test_a_resumed_run_with_one_stage_finished_says_1_stage(tmp_path):
    out = tmp_path / "run"
    assert hyperclean("--out", out).exit_code == 0
    whole = untimed(out)
    state = checkpoints.load(out / "checkpoint.pt")
    assert list(state["finished"]) == ["baselines", "R=100"]
    del state["finished"]["R=100"]  # as if killed after the first stage
    config = HypercleanConfig.model_validate(
        json.loads((out / "config.json").read_text())["config"]
    )
    checkpoints.save(out / "checkpoint.pt", state, stages.identity("hyperclean", config))
    result = hyperclean("--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed: 1 stage finished\n" in (out / "run.log").read_text()
    assert untimed(out) == whole  # the stage computed again: the same numbers


def test_hparams_logs_its_rows_with_rounded_numbers(tmp_path):
    run = runs.Run(tmp_path, {"experiment": "hparams"}, quiet=True)
    judged = {"val_loss": 0.30416759848594666, "test_accuracy": 0.9131999611854553}
    row = {
        "mode": "restart", "lr": 0.0213456789, "momentum": 0.51234567, "weight_decay": 1.2e-4,
        **judged, "seconds": 12.345678, "cpu_seconds": 20.11111,
        "random": {"val_loss": None, "test_accuracy": None}, "random_trials": 3,
        "random_equal_cpu": judged, "random_trials_equal_cpu": 5,
    }  # fmt: skip
    hparams.log_row(run, row)
    run.finish("completed")
    log = [line.split(" ", 1)[1] for line in (tmp_path / "run.log").read_text().splitlines()]
    assert log[1:4] == [
        "restart: lr 0.0213, momentum 0.512, wd 0.00012 -> val 0.3042, test acc 0.9132 "
        "(12.3 s, 20.1 s CPU)",
        "  random search in the same wall time (3 trials): val -, test acc -",
        "  random search in the same CPU time (5 trials): val 0.3042, test acc 0.9132",
    ]


@needs_omniglot
def test_the_fewshot_bar_shows_the_query_accuracy_in_percent():
    torch.set_num_threads(1)
    trainer = build(FewshotConfig(**CONFIG), DATA, "bilevel", logging.getLogger("t"))
    trainer.step()
    first = trainer.progress["window"][-1][1]  # the step's query accuracy, in [0, 1]
    assert trainer.bar()["query_acc"] == pytest.approx(100 * first)  # percent, bias-corrected
    trainer.step()
    second = trainer.progress["window"][-1][1]
    expected = 100 * (0.98 * 0.02 * first + 0.02 * second) / (1 - 0.98**2)
    assert trainer.bar()["query_acc"] == pytest.approx(expected)
