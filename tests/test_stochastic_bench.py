"""The stochastic benchmark: its learning problems (hypergradients against finite differences in
float64), the libsvm loader (a local HTTP server, malformed files), and `bilevel stochastic` at
a tiny size (its table, plot and json; one-line refusals)."""

from __future__ import annotations

import bz2
import dataclasses
import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from bilevel import stochastic
from bilevel.app.data import libsvm, load_libsvm, stand_in
from bilevel.app.data.store import DataError, sha256_file
from bilevel.stochastic.learning import corrupt_labels

# -- the problems ---------------------------------------------------------------------------


def planted(n: int, d: int, classes: int, seed: int):
    """Features N(0, 1) and labels of a planted linear model (+-1 when classes == 2)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    scores = a @ torch.randn(d, classes, generator=g, dtype=torch.float64)
    labels = (scores + torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(1)
    return a, (2 * labels - 1 if classes == 2 else labels)


def split(a, y, n_train):
    return a[:n_train], y[:n_train], a[n_train:], y[n_train:]


def central_differences(problem, x, coordinates, step=1e-5):
    """d h / d x_k by central differences of the value function (inner problem solved)."""
    basis = torch.eye(len(x), dtype=x.dtype)
    return torch.tensor(
        [
            (problem.value(x + step * basis[k]) - problem.value(x - step * basis[k])) / (2 * step)
            for k in coordinates
        ],
        dtype=torch.float64,
    )


def make_logistic():
    a, y = planted(150, 6, 2, seed=0)
    return stochastic.LogisticRegularisation(*split(a, y, 90), log_weights=-1.0)


def make_softmax():
    a, y = planted(150, 5, 3, seed=1)
    return stochastic.SoftmaxRegularisation(*split(a, y, 90), log_weights=-1.0)


def make_cleaning():
    a, y = planted(120, 4, 3, seed=2)
    return stochastic.DataCleaning(*split(a, y, 80), corruption=0.5, regularisation=0.1, seed=3)


@pytest.mark.parametrize("make", [make_logistic, make_softmax, make_cleaning])
def test_the_hypergradient_at_the_solved_inner_problem_is_the_finite_difference(make):
    problem = make()
    g = torch.Generator().manual_seed(4)
    x = problem.x0 + torch.randn(problem.x0.shape, generator=g, dtype=torch.float64)
    z = problem.inner_solution(x)
    everything = problem.everything(problem.n_inner)
    assert problem.inner_gradient(x, z, everything).abs().max() < 1e-13  # solved
    coordinates = range(len(x)) if len(x) < 10 else [0, 17, 41, 79]
    numeric = central_differences(problem, x, coordinates)
    exact = problem.hypergradient(x)[list(coordinates)]
    torch.testing.assert_close(exact, numeric, rtol=1e-6, atol=1e-9)


def test_evaluations_report_the_value_function_and_the_test_accuracy():
    a, y = planted(200, 6, 2, seed=5)
    problem = stochastic.LogisticRegularisation(
        *split(a[:150], y[:150], 90), test=(a[150:], y[150:])
    )
    solver = stochastic.make(
        "soba", problem, inner_step=0.5, outer_step=0.5, inner_batch=10, outer_batch=10
    )
    solver.run(200)
    metrics = solver.evaluate()
    z_star = problem.inner_solution(solver._x)
    assert metrics["value"] == pytest.approx(problem.value(solver._x), rel=1e-12)
    distance = torch.linalg.vector_norm(solver.z["w"] - z_star)
    assert metrics["inner_error"] == pytest.approx(float(distance), rel=1e-6)
    predicted = torch.where(a[150:] @ solver.z["w"] >= 0, 1, -1)
    assert metrics["test_accuracy"] == float((predicted == y[150:]).double().mean())
    assert 0.6 < metrics["test_accuracy"] <= 1.0  # the planted model is learnt


def test_corruption_replaces_the_stated_fraction_by_wrong_labels_reproducibly():
    labels = torch.arange(100) % 7
    corrupted, mask = corrupt_labels(labels, 0.7, 7, seed=11)
    assert int(mask.sum()) == 70
    assert bool((corrupted[mask] != labels[mask]).all())
    assert torch.equal(corrupted[~mask], labels[~mask])
    again, mask_again = corrupt_labels(labels, 0.7, 7, seed=11)
    assert torch.equal(again, corrupted) and torch.equal(mask, mask_again)
    other, _ = corrupt_labels(labels, 0.7, 7, seed=12)
    assert not torch.equal(other, corrupted)
    # the weights of corrupted and clean examples are reported apart
    problem = make_cleaning()
    x = problem.x0.clone()
    x[problem.corrupted] = -3.0
    metrics = problem.reference_metrics(
        problem.x_layout.unflatten(x), problem.z_layout.unflatten(problem.z0), None
    )
    assert metrics["corrupted_weight"] == pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))
    assert metrics["clean_weight"] == 0.5 and "value" not in metrics


def one_line(caught) -> str:
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_data_is_one_clear_line():
    a, y = planted(40, 3, 3, seed=6)
    with pytest.raises(ValueError) as caught:
        stochastic.LogisticRegularisation(a, y, a, y)
    assert one_line(caught) == "labels must be -1 or +1 (binary classification)"
    with pytest.raises(ValueError) as caught:
        stochastic.SoftmaxRegularisation(a, y, a[:, :2], y)
    assert one_line(caught) == "val_features has 2 features, the training features 3"
    with pytest.raises(ValueError) as caught:
        stochastic.SoftmaxRegularisation(a, y[:-1], a, y)
    assert one_line(caught) == "labels must be a tensor of shape (40,), got (39,)"
    with pytest.raises(ValueError) as caught:
        stochastic.DataCleaning(a, y, a, y, corruption=1.0)
    assert one_line(caught) == "corruption must be a number in [0, 1), got 1.0"
    with pytest.raises(ValueError) as caught:
        stochastic.SoftmaxRegularisation(a, y, a, y, classes=2)
    assert one_line(caught) == "classes=2 but a label is 2"
    with pytest.raises(TypeError) as caught:
        stochastic.SoftmaxRegularisation(a.float(), y, a, y)
    assert "val_features is torch.float64" in one_line(caught)


# -- the libsvm loader ----------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on 127.0.0.1: (directory, base URL)."""
    directory = tmp_path / "site"
    (directory / "binary").mkdir(parents=True)
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    ).start()
    yield directory, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def libsvm_text(features: np.ndarray, labels) -> str:
    """Rows in the LIBSVM format, zeros left out as the site's files do."""
    lines = []
    for row, label in zip(features, labels):
        pairs = " ".join(f"{k + 1}:{v:.6g}" for k, v in enumerate(row) if v != 0)
        lines.append(f"{label:g} {pairs}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def small_ijcnn1(monkeypatch, tmp_path):
    """ijcnn1 made small (7 and 5 rows), its cache in tmp_path; the rows written."""
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BILEVEL_OFFLINE", raising=False)
    monkeypatch.delenv("BILEVEL_DATA", raising=False)
    files = {
        split: dataclasses.replace(file, rows=rows)
        for (split, file), rows in zip(libsvm.DATASETS["ijcnn1"].files.items(), (7, 5))
    }
    small = dataclasses.replace(libsvm.DATASETS["ijcnn1"], files=files)
    monkeypatch.setitem(libsvm.DATASETS, "ijcnn1", small)
    rng = np.random.default_rng(0)
    rows = {}
    for split, file in files.items():
        x = np.round(rng.uniform(-1, 1, (file.rows, 22)), 4) * (rng.random((file.rows, 22)) < 0.6)
        rows[split] = (x.astype(np.float32), rng.choice([-1, 1], file.rows))
    return files, rows


def test_the_loader_downloads_records_the_digest_and_decodes(served, small_ijcnn1, tmp_path):
    site, url = served
    files, rows = small_ijcnn1
    for split, file in files.items():
        (site / "binary" / file.name).write_bytes(bz2.compress(libsvm_text(*rows[split]).encode()))
    data_dir = tmp_path / "data"
    data_dir.mkdir()  # a chosen data root must exist; its libsvm/ is made
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(libsvm, "SITE", url)
        data = load_libsvm("ijcnn1", data_dir)
    for split in files:
        torch.testing.assert_close(data[split].features, torch.from_numpy(rows[split][0]))
        assert data[split].labels.tolist() == rows[split][1].tolist()
        assert data[split].labels.dtype == torch.int64
    record = json.loads((tmp_path / "cache" / "libsvm" / "sha256.json").read_text())
    for file in files.values():
        assert record[file.name] == sha256_file(tmp_path / "data" / "libsvm" / file.name)
    # offline now: the files are there, checked against the recorded digests
    again = load_libsvm("ijcnn1", tmp_path / "data", download=False)
    assert torch.equal(again["test"].features, data["test"].features)
    changed = tmp_path / "data" / "libsvm" / files["test"].name
    changed.write_bytes(bz2.compress(libsvm_text(*rows["test"]).replace("1:", "2:", 1).encode()))
    with pytest.raises(DataError) as caught:
        load_libsvm("ijcnn1", tmp_path / "data", download=False)
    assert f"{changed} is not the file first used" in one_line(caught)


def test_missing_files_name_themselves_and_the_site(small_ijcnn1, tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        load_libsvm("ijcnn1", tmp_path)
    message = one_line(caught)
    assert "LIBSVM ijcnn1: ijcnn1.bz2 is missing" in message and "ijcnn1.t.bz2" in message
    assert libsvm.SITE in message and str(tmp_path / "libsvm") in message


@pytest.mark.parametrize(
    "text, words",
    [
        ("1 3:0.5\n-1 2:abc\n", "ijcnn1.t.bz2: line 2: expected 'label index:value ...'"),
        ("1 3:0.5\n-1 23:1\n", "ijcnn1.t.bz2: line 2: feature index 23 outside 1..22"),
        ("1 3:0.5\n-1 0:1\n", "ijcnn1.t.bz2: line 2: feature index 0 outside 1..22"),
        ("1 3:0.5 4\n", "ijcnn1.t.bz2: line 1: expected 'label index:value ...', got '1 3:0.5 4'"),
        (
            "1 3:0.5\n2 1:1\n" + "1 1:1\n" * 3,
            "ijcnn1.t.bz2: label 2 on row 2; ijcnn1's labels are -1, 1",
        ),
        ("1 3:0.5\n", "has 1 rows; the LIBSVM site's ijcnn1.t.bz2 has 5"),
        (None, "unreadable bzip2 stream"),
    ],
)
def test_a_malformed_file_is_one_clear_error(small_ijcnn1, tmp_path, text, words):
    files, rows = small_ijcnn1
    directory = tmp_path / "libsvm"
    directory.mkdir()
    train = files["train"].name
    (directory / train).write_bytes(bz2.compress(libsvm_text(*rows["train"]).encode()))
    test = directory / files["test"].name
    test.write_bytes(b"not bzip2 at all" if text is None else bz2.compress(text.encode()))
    with pytest.raises(DataError) as caught:
        load_libsvm("ijcnn1", tmp_path, download=False)
    assert words in one_line(caught)


def test_a_stand_in_has_the_shape_of_the_data_set_and_says_what_it_is():
    made = stand_in("covtype", {"all": 300}, seed=3)
    features, labels = made.splits["all"]
    assert features.shape == (300, 54) and 0 <= float(features.min()) <= float(features.max()) <= 1
    assert set(labels.tolist()) <= set(range(7)) and len(set(labels.tolist())) > 3
    assert made.label == "generated stand-in for covtype"
    binary = stand_in("ijcnn1", {"train": 50, "test": 20}, seed=3).splits
    assert binary["train"].features.shape == (50, 22) and set(binary["test"].labels.tolist()) <= {
        -1,
        1,
    }
    assert torch.equal(stand_in("covtype", {"all": 300}, seed=3).splits["all"].labels, labels)
    with pytest.raises(ValueError) as caught:
        stand_in("mnist", {"all": 3})
    assert one_line(caught) == "unknown LIBSVM data set 'mnist'; choose one of ijcnn1, covtype"


# -- the benchmark command ------------------------------------------------------------------


class SobaTwin(stochastic.SOBA):
    """A solver registered after the benchmark was written: it must appear without changes."""

    name = "soba-twin"


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """The quick mode made tiny: small budgets and data, references cached in tmp_path."""
    from bilevel.app.bench.stochastic import problems, settings

    monkeypatch.setenv("BILEVEL_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(settings.BUDGET, "quick", {k: 400 for k in settings.BUDGET["quick"]})
    monkeypatch.setitem(settings.EVALUATIONS, "quick", 4)
    monkeypatch.setitem(problems.SIZES["quick"], "ijcnn1", (60, 40, 0))
    monkeypatch.setattr(problems, "REFERENCE_ITERATIONS", 5)
    monkeypatch.setitem(stochastic.SOLVERS, SobaTwin.name, SobaTwin)
    return tmp_path / "out"


def invoke(*args):
    from click.testing import CliRunner

    from bilevel.app.cli import main

    return CliRunner().invoke(main, ["stochastic", *args], catch_exceptions=False)


def test_the_command_runs_every_registered_solver_and_writes_table_plot_and_json(tiny):
    result = invoke("--problems", "quadratic,ijcnn1", "--seeds", "2", "--out", str(tiny))
    assert result.exit_code == 0, result.output
    record = json.loads((tiny / "quick.json").read_text())
    assert list(record["problems"]) == ["quadratic", "ijcnn1"]
    quadratic, ijcnn1 = record["problems"]["quadratic"], record["problems"]["ijcnn1"]
    assert list(quadratic["solvers"]) == list(stochastic.SOLVERS)  # the twin included
    assert quadratic["solvers"]["soba-twin"]["tuned"] is False
    assert all(entry["seeds"] == 2 for entry in quadratic["solvers"].values())
    assert quadratic["reference"]["how"] == "closed form" and quadratic["target"] > 0
    # the generated stand-in says what it is in the json, the table and the plot's file name
    assert ijcnn1["data"] == "generated stand-in for ijcnn1"
    table = (tiny / "quick.md").read_text()
    assert "### ijcnn1 — generated stand-in for ijcnn1" in table
    assert "| soba-twin |" in table and "untuned: inner_step=" in table
    for name in ("quadratic", "ijcnn1"):
        assert (tiny / f"{name}_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every run's curve: samples increasing, solver time non-decreasing, metrics finite
    rows = [json.loads(line) for line in (tiny / "quick.jsonl").read_text().splitlines()]
    runs = [r for r in rows if r["type"] == "run"]
    assert len(runs) == 2 * 2 * len(stochastic.SOLVERS)
    for run in runs:
        samples = [p["samples"] for p in run["curve"]]
        seconds = [p["seconds"] for p in run["curve"]]
        assert samples[0] == 0 and samples == sorted(samples) and seconds == sorted(seconds)
        assert run["warmup_seconds"] > 0 and "suboptimality" in run["curve"][-1]
    # the same tables again from the rows alone (the header has its own date and command)
    (tiny / "quick.md").unlink()
    again = invoke("--report-only", "--out", str(tiny))
    assert again.exit_code == 0, again.output
    rebuilt = (tiny / "quick.md").read_text()
    assert rebuilt.split("\n\n", 1)[1] == table.split("\n\n", 1)[1]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--solvers", "soba,sobaa"], "--solvers: unknown solver 'sobaa'; choose from soba,"),
        (["--problems", "quadratic,mnist"], "--problems: unknown problem 'mnist'; choose from"),
        (["--problems", ","], "--problems: no problem named; choose from quadratic"),
        (["--seeds", "0"], "Invalid value for '--seeds'"),
    ],
)
def test_bad_input_is_refused_with_one_line(tiny, args, words):
    result = invoke(*args, "--out", str(tiny))
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert not tiny.exists()  # nothing ran, nothing written


def test_the_libsvm_files_are_used_when_present_and_a_bad_one_is_one_line(
    tiny, small_ijcnn1, tmp_path, monkeypatch
):
    from bilevel.app.bench.stochastic import problems

    files, rows = small_ijcnn1
    monkeypatch.setitem(problems.SIZES["quick"], "ijcnn1", (7, 5, 0))
    (tmp_path / "libsvm").mkdir()
    for split, file in files.items():
        text = libsvm_text(*rows[split]).encode()
        (tmp_path / "libsvm" / file.name).write_bytes(bz2.compress(text))
    bench = problems.build("ijcnn1", "quick", tmp_path, "cpu")
    assert bench.data == "ijcnn1" and bench.title == "ijcnn1 (ijcnn1)"
    expected = torch.from_numpy(rows["test"][0]).double()  # the site's test file: validation
    assert torch.equal(bench.problem.a_val, expected)
    (tmp_path / "libsvm" / files["test"].name).write_bytes(bz2.compress(b"1 1:0.5\n"))
    result = invoke("--problems", "ijcnn1", "--data-dir", str(tmp_path), "--out", str(tiny))
    assert result.exit_code == 1
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert "is not the file first used" in error
