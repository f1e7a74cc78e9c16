"""What a person at the console sees: log lines that leave progress bars whole, and one
outcome line."""

import io
import re
import sys

from bilevel.app import runs
from tests.test_cli_runs import TINY, needs_mnist
from tests.test_fewshot import in_process


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
