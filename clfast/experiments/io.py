"""The output folder: its checks, atomic writes, the results.json document, CSV files and the summary table."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from typing import Dict, List, Optional

from . import metrics

SCHEMA_VERSION = 1
RESULTS = "results.json"
# what clfast writes into --out: --overwrite removes these and nothing else
OWN_NAMES = (RESULTS, "summary.txt")
OWN_SUFFIXES = (".csv", ".png")
# run fields aggregated over seeds as {"mean", "std", "n"}
AGGREGATED = ("average_accuracy", "average_accuracy_task_il", "bwt", "bwt_task_il", "forgetting",
              "forgetting_task_il", "fwt", "fwt_task_il", "wall_time_s", "consolidation_s", "steps_per_s")


class OutError(Exception):
    """--out cannot be used; the message names the flag."""


def _own(name: str) -> bool:
    return name in OWN_NAMES or name.endswith(OWN_SUFFIXES) or name.startswith(".clfast-")


def prepare(out: str, overwrite: bool) -> None:
    """Makes ``out`` ready before anything is trained: creatable, writable, and empty unless ``overwrite`` (which
    clears clfast's own files there, and refuses a folder holding anything else)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise OutError(f"--out {out}: cannot create it ({exc.strerror})") from None
    entries = sorted(os.listdir(out))
    if entries and not overwrite:
        raise OutError(f"--out {out}: is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''});"
                       " pass --overwrite to replace an earlier run's results, --resume to continue it, or choose "
                       "another folder")
    foreign = [e for e in entries if not _own(e) or os.path.isdir(os.path.join(out, e))]
    if foreign:
        raise OutError(f"--out {out}: holds files clfast did not write ({', '.join(foreign[:3])}); --overwrite "
                       "only replaces results, so choose another folder")
    check_writable(out)
    for e in entries:
        os.remove(os.path.join(out, e))


def check_writable(out: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".clfast-check-"):
            pass
    except OSError as exc:
        raise OutError(f"--out {out}: cannot write there ({exc.strerror})") from None


def write_text(path: str, text: str) -> None:
    """Writes ``path`` whole or not at all: a temporary file in the same folder, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".clfast-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    """The commit of the checkout clfast is imported from, or None (an installed copy, or no git)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        r = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def metadata(argv: List[str], threads: int, device: str) -> Dict:
    from .._version import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "versions": {"clfast": __version__, "torch": _version("torch"), "nngeometry": _version("nngeometry"),
                     "continuum": _version("continuum"), "numpy": _version("numpy"),
                     "python": platform.python_version()},
        "git_commit": git_commit(),
        "command": [os.path.basename(sys.executable), "-m", "clfast", *argv],
        "argv": list(argv),
        "started_at": now(),
        "finished_at": None,
        "complete": False,
        "threads": threads,
        "device": device,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def method_entry(runs: List[Dict]) -> Dict:
    """A method's results.json entry: its runs, their status, and each AGGREGATED field over seeds (null when a
    run failed: a failed seed's numbers do not average in)."""
    failed = [r for r in runs if r["status"] != "ok"]
    entry = {"status": "failed" if failed else "ok",
             "error": f"seed {failed[0]['seed']}: {failed[0]['error']}" if failed else None,
             "seeds": [r["seed"] for r in runs]}
    for key in AGGREGATED:
        if failed:
            entry[key] = None
        elif all(key in r for r in runs):
            entry[key] = metrics.mean_std(r[key] for r in runs)
    entry["runs"] = runs
    return entry


def write_results(out: str, doc: Dict, task_il: bool) -> None:
    """results.json, summary.txt and each run's CSV files, each replaced atomically."""
    doc["peak_rss_mb"] = max(doc.get("peak_rss_mb") or 0.0, peak_rss_mb())
    write_text(os.path.join(out, RESULTS), json.dumps(doc, indent=1))
    write_text(os.path.join(out, "summary.txt"), table(doc["methods"], task_il) + "\n")
    for name, entry in doc["methods"].items():
        for r in entry["runs"]:
            for key in ("acc_matrix", "acc_matrix_task_il", "curves"):
                if key in r:
                    buf = io.StringIO()
                    w = csv.writer(buf)
                    w.writerow([f"task{j}" for j in range(len(r[key][0]))])
                    w.writerows([[f"{v:.4f}" for v in row] for row in r[key]])
                    write_text(os.path.join(out, f"{safe(name)}_seed{r['seed']}_{key}.csv"), buf.getvalue())


def safe(method: str) -> str:
    return method.replace("+", "_")


def read(out: str) -> Dict:
    path = os.path.join(out, RESULTS)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise OutError(f"--resume {out}: no {RESULTS} there") from None
    except (OSError, ValueError) as exc:
        raise OutError(f"--resume {out}: cannot read {RESULTS} ({exc})") from None
    if doc.get("schema_version") != SCHEMA_VERSION or "argv" not in doc:
        raise OutError(f"--resume {out}: {RESULTS} is not a clfast results file of schema {SCHEMA_VERSION}")
    return doc


def _cell(stat: Optional[Dict], width: int, pct: bool = True) -> str:
    if stat is None:
        return f"{'-':>{width}}"
    k = 100 if pct else 1
    if stat["n"] > 1:
        return f"{k * stat['mean']:>{width - 5}.1f}±{k * stat['std']:<4.1f}"
    return f"{k * stat['mean']:>{width}.1f}"


def table(methods: Dict[str, Dict], task_il: bool) -> str:
    """The summary: per method, mean (± std over seeds) of each metric, in percent; failed methods say why."""
    cols = [("avg acc", "average_accuracy", True), ("avg TIL", "average_accuracy_task_il", True),
            ("BWT", "bwt", True), ("forget", "forgetting", True), ("FWT", "fwt", True),
            ("time s", "wall_time_s", False), ("steps/s", "steps_per_s", False)]
    if not task_il:
        cols.pop(1)
    w = 12
    head = f"{'method':<16}" + "".join(f"{c[0]:>{w}}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, e in methods.items():
        if e["status"] != "ok":
            lines.append(f"{name:<16}failed: {e['error']}")
            continue
        lines.append(f"{name:<16}" + "".join(_cell(e.get(key), w, pct) for _, key, pct in cols))
    return "\n".join(lines)


def clear_partial(out: str) -> None:
    """Removes temporary files an interrupted write may have left."""
    for e in os.listdir(out):
        if e.startswith(".clfast-") and e.endswith(".tmp"):
            os.remove(os.path.join(out, e))
