"""The table of results, the issue's targets checked against it, and the W1 plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import median

from .common import LOWER_BOUND

HEADER = (
    "| workload | size | implementation | median | min–max | peak memory | × lower bound "
    "| rel. error | note |\n|---|---|---|---:|---:|---:|---:|---:|---|"
)


def seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def megabytes(value: float) -> str:
    return f"{value / 2**20:.1f} MB"


def _group(row: dict) -> tuple[str, str]:
    return row["workload"], json.dumps(row["size"], sort_keys=True)


def lower_bounds(rows: list[dict]) -> dict:
    return {
        _group(r): median(r["times"]) for r in rows if r["impl"] == LOWER_BOUND and "times" in r
    }


def table(rows: list[dict]) -> str:
    bounds = lower_bounds(rows)
    lines = [HEADER]
    for row in rows:
        size = ", ".join(f"{k}={v}" for k, v in row["size"].items())
        cells = [row["workload"], size, row["impl"]]
        if "times" in row:
            times, bound = row["times"], bounds.get(_group(row))
            cells += [
                seconds(median(times)),
                f"{seconds(min(times))} – {seconds(max(times))}",
                megabytes(row["peak_bytes"]),
                f"{median(times) / bound:.2f}" if bound else "–",
                f"{row['error']:.1e}" if row.get("error") is not None else "–",
                row.get("note", ""),
            ]
        else:
            reason = row.get("failure") or row.get("skipped") or "not run"
            cells += ["–"] * 5 + [reason]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- targets of the issue ----------------------------------------------------------------------
def _index(rows):
    done = [r for r in rows if "times" in r]
    return {(r["workload"], tuple(sorted(r["size"].items())), r["impl"]): r for r in done}


def _t(r):
    return median(r["times"])


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met?) for every target whose rows were measured."""
    index, out = _index(rows), []

    def get(workload, size, impl):
        return index.get((workload, tuple(sorted(size.items())), impl))

    peers = ("higher", "torchopt", "torch:unroll")
    for T in (100, 1000):
        graph = get("w1", {"T": T}, "bilevel:reverse-graph")
        fastest = min((get("w1", {"T": T}, p) for p in peers if get("w1", {"T": T}, p)),
                      key=_t, default=None)  # fmt: skip
        if graph and fastest:
            out.append((f"W1 T={T}: graph policy no slower than the fastest peer",
                        f"{seconds(_t(graph))} vs {fastest['impl']} {seconds(_t(fastest))}",
                        _t(graph) <= _t(fastest)))  # fmt: skip
    traj = get("w1", {"T": 1000}, "bilevel:reverse-trajectory")
    bound = get("w1", {"T": 1000}, LOWER_BOUND)
    if traj and bound:
        out.append(("W1 T=1000: trajectory ≤ 2.5× inner training",
                    f"{_t(traj) / _t(bound):.2f}×", _t(traj) <= 2.5 * _t(bound)))  # fmt: skip
    acts, graph = (get("w1", {"T": 1000}, f"bilevel:reverse-{p}") for p in ("activations", "graph"))
    if acts and bound:
        out.append(("W1 T=1000: activations ≤ 2.5× inner training",
                    f"{_t(acts) / _t(bound):.2f}×", _t(acts) <= 2.5 * _t(bound)))  # fmt: skip
    if acts and graph:
        out.append(("W1 T=1000: activations memory a fraction of the graph's",
                    f"{megabytes(acts['peak_bytes'])} vs {megabytes(graph['peak_bytes'])}",
                    acts["peak_bytes"] < graph["peak_bytes"]))  # fmt: skip
    best = [get("w1", {"T": 1000}, p) for p in ("higher", "torchopt")]
    best = min((r["peak_bytes"] for r in best if r), default=None)
    if traj and best:
        out.append(("W1 T=1000: trajectory memory ≤ a tenth of the best peer",
                    f"{megabytes(traj['peak_bytes'])} vs {megabytes(best)}",
                    traj["peak_bytes"] <= best / 10))  # fmt: skip
    for policy in ("trajectory", "checkpoint"):
        r = get("w1", {"T": 10000}, f"bilevel:reverse-{policy}")
        if r:
            out.append((f"W1 T=10000: {policy} under 1 GB", megabytes(r["peak_bytes"]),
                        r["peak_bytes"] < 2**30))  # fmt: skip
    out += _w2_targets(get) + _w3_targets(get) + _w4_targets(get)
    return out


def _w2_targets(get):
    out, size = [], {"B": 16, "T": 5}
    bound = get("w2", size, LOWER_BOUND)
    peer_rows = [get("w2", size, p) for p in ("higher", "torchopt", "torch:unroll-loop",
                                              "torch:unroll-batched")]  # fmt: skip
    fastest_peer = min((r for r in peer_rows if r), key=_t, default=None)
    for policy in ("graph", "trajectory", "checkpoint"):
        r = get("w2", size, f"bilevel:reverse-{policy}")
        if r and bound:
            out.append((f"W2 {policy}: ≤ 1.05× the supervised step",
                        f"{_t(r) / _t(bound):.3f}×", _t(r) <= 1.05 * _t(bound)))  # fmt: skip
        if r and fastest_peer:
            out.append((f"W2 {policy}: no slower than any peer",
                        f"{seconds(_t(r))} vs {fastest_peer['impl']} {seconds(_t(fastest_peer))}",
                        _t(r) <= _t(fastest_peer)))  # fmt: skip
        share = get("w2-share", size, f"bilevel:reverse-{policy}")
        if share:
            out.append((f"W2 own share ({policy}) ≤ 3 ms", seconds(_t(share)), _t(share) <= 3e-3))
    return out


def _w3_targets(get):
    out, peaks = [], []
    for T in (200, 2000):
        fwd, bound = get("w3", {"T": T}, "bilevel:forward"), get("w3", {"T": T}, LOWER_BOUND)
        if fwd and bound:
            out.append((f"W3 T={T}: forward ≤ 1.2·(m+1) = 4.8× inner training",
                        f"{_t(fwd) / _t(bound):.2f}×", _t(fwd) <= 4.8 * _t(bound)))  # fmt: skip
        if fwd:
            peaks.append(fwd["peak_bytes"])
    if len(peaks) == 2:
        same = abs(peaks[0] - peaks[1]) <= 0.1 * max(peaks) + 2**20
        out.append(("W3: forward memory equal at T=200 and T=2000",
                    f"{megabytes(peaks[0])} vs {megabytes(peaks[1])}", same))  # fmt: skip
    return out


def _w4_targets(get):
    out = []
    for size in ({"T": 1000},):
        peer = get("w4", size, "torchopt:implicit-cg")
        for impl in ("bilevel:implicit-cg", "bilevel:implicit-neumann", "bilevel:fixed-point"):
            r = get("w4", size, impl)
            if r and peer and r.get("error") is not None and peer.get("error") is not None:
                met = r["error"] <= peer["error"] * 1.01 and _t(r) <= _t(peer) * 1.02
                out.append((f"W4 {impl}: as accurate as torchopt at no more time",
                            f"{r['error']:.1e} in {seconds(_t(r))} vs {peer['error']:.1e} in "
                            f"{seconds(_t(peer))}", met))  # fmt: skip
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(rows):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------
def plot_w1(rows: list[dict], path: Path) -> Path | None:
    """Time and peak memory against T, log-log, one line per implementation (W1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rows:
        if r["workload"] == "w1" and "times" in r:
            series[r["impl"]].append((r["size"]["T"], median(r["times"]), r["peak_bytes"] / 2**20))
    if not series:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in sorted(series.items()):
        T, time_s, memory = zip(*sorted(points))
        left.plot(T, time_s, marker="o", label=name)
        right.plot(T, memory, marker="o", label=name)
    _sqrt_guide(right, series.get("bilevel:reverse-checkpoint"))
    for axis, label in ((left, "median time (s)"), (right, "peak memory above baseline (MB)")):
        axis.set(xscale="log", yscale="log", xlabel="T (inner steps)", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    figure.suptitle("W1 data hyper-cleaning: cost of one hypergradient against T")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _sqrt_guide(axis, points) -> None:
    """A dashed c*sqrt(T) line through the checkpoint policy's largest T."""
    if not points:
        return
    T, _, memory = max(points)
    grid = sorted({p[0] for p in points})
    axis.plot(grid, [memory * (t / T) ** 0.5 for t in grid], "k--", lw=0.8, label="∝ √T")
