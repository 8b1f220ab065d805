"""Mutation check of the CUDA kernels' synchronisation: deletes each __syncthreads (a _or/_and/_count form keeps
its predicate) and breaks each warp operation's mask (full -> lane 31 left out), one at a time, in a copy of
csrc/, and shows whether the emulated tests (blocks and threads forward, then both reversed) or ThreadSanitizer
catch the mutant.

    python tests/cuemu/mutate.py [--out benchmarks/results/cuemu-mutations.md]

A mutant is caught by the tests when ``pytest -m cuemu`` fails on its emulated library; one that passes both
orders is then run under TSan (tests/cuemu/sanitize.sh's subset). The table goes to --out.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORK = os.path.join(ROOT, "build", "mutate")
# The sanitizer subset: the op matrix and the emulator's own tests launch every kernel of csrc/.
TSAN_TESTS = ["tests/test_ops.py", "tests/test_cuemu.py", "-k", "not every_cuda_kernel"]

BARRIER = re.compile(r"__syncthreads(_or|_and|_count)?\(")
MASK = re.compile(r"(__shfl\w*_sync|__ballot_sync|__any_sync|__all_sync|__syncwarp)\(0xffffffffu")


def mutants():
    """(file, line number, description, mutated text of the file) for every barrier and warp mask."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu*"), recursive=True)):
        lines = open(path).read().split("\n")
        for i, line in enumerate(lines):
            code = line.split("//")[0]
            m = BARRIER.search(code)
            if m:
                if m.group(1):  # __syncthreads_or(p) -> (p): the predicate stays, the barrier goes
                    new = line[:m.start()] + "(" + line[m.end():]
                else:
                    new = re.sub(r"__syncthreads\(\);", "", line, count=1)
                out.append((path, i + 1, f"delete {m.group(0)})", lines[:i] + [new] + lines[i + 1:]))
            m = MASK.search(code)
            if m:
                new = line[:m.start()] + m.group(1) + "(0x7fffffffu" + line[m.end():]
                out.append((path, i + 1, f"{m.group(1)} mask 0xffffffff -> 0x7fffffff", lines[:i] + [new] + lines[i + 1:]))
    return out


def run(cmd, env=None, timeout=3600):
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def build(tree, sanitize=""):
    r = run([sys.executable, os.path.join(HERE, "build.py")],
            {"CLFAST_EMU_ROOT": tree, "CLFAST_EMU_BUILD_DIR": WORK,
             "CLFAST_EMU_SANITIZE": sanitize})
    if r.returncode != 0:
        raise RuntimeError(f"build failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def tests_fail(lib, order):
    r = run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-x", "-m", "cuemu", "-k",
             "not every_cuda_kernel"], {"CLFAST_EMU_LIBRARY": lib, "CLFAST_EMU_BLOCK_ORDER": order,
                                        "CLFAST_EMU_THREAD_ORDER": order, "CLFAST_REQUIRE_CUEMU": "1"})
    failed = [l for l in r.stdout.splitlines() if l.startswith("FAILED") or l.startswith("ERROR")]
    return r.returncode != 0, (failed[0] if failed else r.stdout.strip().splitlines()[-1] if r.stdout else "")


def tsan_reports(tree):
    build(tree, "thread")
    env = {"PY": sys.executable, "CLFAST_EMU_ROOT": tree, "CLFAST_EMU_BUILD_DIR": WORK}
    r = run([os.path.join(HERE, "sanitize.sh"), "thread", "--", *TSAN_TESTS], env)
    text = r.stdout + r.stderr
    summary = [l for l in text.splitlines() if l.startswith("SUMMARY: ThreadSanitizer")]
    return r.returncode != 0, summary[0] if summary else text.strip().splitlines()[-1] if text.strip() else ""


def write_table(out, rows, total):
    with open(out, "w") as f:
        f.write("# Mutation check of the CUDA kernels' synchronisation\n\n"
                "`python tests/cuemu/mutate.py`: each barrier deleted (or each full warp mask broken), one at a "
                "time; caught by the emulated tests (`pytest -m cuemu`, blocks and threads forward, then both "
                "reversed) or else by ThreadSanitizer (`tests/cuemu/sanitize.sh thread` on the op matrix and the "
                "emulator's tests).\n\n"
                "| site | mutant | caught by | first failure |\n|---|---|---|---|\n")
        for r in rows:
            f.write("| " + " | ".join(r) + " |\n")
        caught = sum(r[2] != "survived" for r in rows)
        rest = f" ({total - len(rows)} not run yet)" if total > len(rows) else ""
        f.write(f"\n{caught} of {len(rows)} mutants caught{rest}.\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cuemu-mutations.md"))
    args = ap.parse_args()
    tree = os.path.join(WORK, "tree")
    if os.path.exists(tree):
        shutil.rmtree(tree)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc"))
    rows, todo = [], mutants()
    total = len(todo)
    for path, line, what, text in todo:
        rel = os.path.relpath(path, ROOT)
        target = os.path.join(tree, rel)
        pristine = open(path).read()
        t0 = time.time()
        with open(target, "w") as f:
            f.write("\n".join(text))
        try:
            lib = build(tree)
            verdict, detail = "survived", ""
            for order in ("forward", "reverse"):
                failed, detail = tests_fail(lib, order)
                if failed:
                    verdict = f"tests ({order})"
                    break
            if verdict == "survived":
                caught, detail = tsan_reports(tree)
                if caught:
                    verdict = "TSan"
        finally:
            with open(target, "w") as f:
                f.write(pristine)
        rows.append((f"{rel}:{line}", what, verdict, detail.replace("|", "/")[:160]))
        print(f"{rel}:{line} {what}: {verdict} ({time.time() - t0:.0f} s) {detail[:120]}", flush=True)
        write_table(args.out, rows, total)  # after every mutant, so that a stopped run keeps what it found
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
