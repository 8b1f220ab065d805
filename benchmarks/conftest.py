"""Benchmarks' shared ``device`` fixture, and the closing table of ratios against the baseline measured in
the same run (each benchmark names its baseline in ``extra_info``)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))

from clfast_testing import device_params  # noqa: E402


@pytest.fixture(params=device_params(emulated=False), scope="module")
def device(request):
    """cpu, and cuda where a GPU is present."""
    return request.param


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    by_name = {b.name: b for b in session.benchmarks}
    rows = []
    for b in session.benchmarks:
        info = b.extra_info
        row = {"name": b.name, "median_ms": 1e3 * b.stats.median, "min_ms": 1e3 * b.stats.min}
        base = by_name.get(info.get("baseline", ""))
        if base is not None:
            row["speedup_vs_" + info["baseline"]] = base.stats.median / b.stats.median
            # the same from the fastest rounds of each, less sensitive to the machine's bursts of load
            row["speedup_min"] = base.stats.min / b.stats.min
        copy = by_name.get(info.get("copy", ""))
        if copy is not None and "bytes" in info:
            bandwidth = copy.extra_info["bytes"] / copy.stats.median  # bytes/s of a plain copy, same run
            row["bandwidth_GBps"] = info["bytes"] / b.stats.median / 1e9
            row["x_of_bandwidth_bound"] = b.stats.median / (info["bytes"] / bandwidth)
            # the same from the fastest rounds, less sensitive to the machine's bursts of load
            best = copy.extra_info["bytes"] / copy.stats.min
            row["x_of_bandwidth_bound_min"] = b.stats.min / (info["bytes"] / best)
        if "bytes" in info and b.name == info.get("copy"):
            row["bandwidth_GBps"] = info["bytes"] / b.stats.median / 1e9
        rows.append(row)
    tr = terminalreporter
    tr.section("clfast: ratios in this run (median times; *_min: from the fastest rounds)")
    for r in rows:
        extras = "  ".join(f"{k}={v:.2f}" for k, v in r.items() if k not in ("name", "median_ms", "min_ms"))
        tr.write_line(f"{r['name']:<58} {r['median_ms']:9.3f} ms  {extras}")
    out = os.environ.get("CLFAST_BENCH_SUMMARY")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
