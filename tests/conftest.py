"""What the test files share: where the data sets are, the `bilevel` command as users run it (a
process of its own) or in this process, and the marks that skip a test without its data.

Tests marked `e2e` run the command line in processes of their own, train, start torchrun, or
otherwise take more than about 2 s: seconds to minutes each. `python -m pytest -m "not e2e"` is
the quick unit loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bilevel.app import distributed
from bilevel.app.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
# the shared data sets: $BILEVEL_DATA, else ../shared/data beside this checkout
DATA = Path(os.environ.get("BILEVEL_DATA", ROOT.parent / "shared" / "data"))
# the command's processes on one thread, as in_process runs it: the same float sums, so the same
# numbers, and no more threads than a 2-core machine has when several processes run
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def needs(dataset: str, name: str | None = None) -> pytest.MarkDecorator:
    """Skip unless DATA holds the folder `dataset` (`name` is how the reason calls it)."""
    return pytest.mark.skipif(
        not (DATA / dataset).is_dir(),
        reason=f"{name or dataset} not found under {DATA} (set BILEVEL_DATA)",
    )


needs_mnist = needs("mnist", "MNIST")
needs_omniglot = needs("omniglot", "Omniglot")


def bilevel_command(*args, timeout: float = 600):
    """`python -m bilevel ARGS` in a process of its own: its CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "bilevel", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ONE_THREAD,
    )


def start_bilevel(*args, stdout=None) -> subprocess.Popen:
    """`python -m bilevel ARGS` started and left running (to be interrupted or killed); its
    standard error is piped, as text, and its standard output goes to `stdout`."""
    return subprocess.Popen(
        [sys.executable, "-m", "bilevel", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )


def start_torchrun(*args, processes: int = 1, restarts: int = 0) -> subprocess.Popen:
    """`torchrun --nproc_per_node PROCESSES -m bilevel ARGS` on a free port, started and left
    running; `restarts`: how often torchrun restarts failed workers. Output piped, as text."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--max-restarts={restarts}", f"--master_port={distributed.free_port()}"]
    return subprocess.Popen(
        [*command, "-m", "bilevel", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )


def in_process(*args):
    """The CLI in this process (no torch import per call), on one thread as in `bilevel`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def one_line(result, code: int) -> str:
    """The single error line of a refused or failed command run by `in_process`."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.strip().splitlines() if x.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0].removeprefix("Error: ")


def metrics(out):
    """metrics.jsonl without timings: what must repeat bit for bit."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]
