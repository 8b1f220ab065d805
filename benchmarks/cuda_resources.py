"""Resource gate of the CUDA kernels: compiles the device code of every csrc/<family>/*_cuda.cu for sm_80, sm_86
and sm_90 (nvcc -cubin, ptxas -v) and reads each kernel's registers, stack frame, spill stores/loads and static
shared memory.

    python benchmarks/cuda_resources.py            # check: fails on any spill, or on a stack frame larger than
                                                   # recorded in benchmarks/results/cuda-resources.txt
    python benchmarks/cuda_resources.py --write    # record the current numbers there

A kernel that is not recorded fails the check too: record it with --write.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "benchmarks", "results", "cuda-resources.txt")
ARCHS = ("sm_80", "sm_86", "sm_90")
HEADER = "# arch   regs  stack  spill_st  spill_ld  smem  kernel"


def nvcc_flags():
    from torch.utils.cpp_extension import include_paths

    # The flags of the extension's build (setup.py, torch's cpp_extension), device code only.
    return (["-cubin", "-std=c++20", "--expt-relaxed-constexpr", "-O3", "-lineinfo", "-Xptxas", "-v",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-D__CUDA_NO_HALF_OPERATORS__",
             "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             f"-I{sysconfig.get_paths()['include']}"] + [f"-I{p}" for p in include_paths()])


def ptxas_report(source: str, arch: str, flags: list[str]) -> str:
    out = os.path.join(ROOT, "build", "cuda-resources", f"{os.path.basename(source)}.{arch}.cubin")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    r = subprocess.run(["nvcc", f"-arch={arch}", *flags, source, "-o", out], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for {arch}:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def parse(report: str, arch: str) -> dict[str, dict]:
    """kernel (mangled) -> its numbers, from ptxas -v."""
    kernels, current = {}, None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = dict(arch=arch, regs=0, stack=0, spill_st=0, spill_ld=0, smem=0)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(s.group(1)) if s else 0
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, r.stdout.splitlines()))


def measure() -> list[dict]:
    flags = nvcc_flags()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda.cu")))
    jobs = [(s, a) for s in sources for a in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(int(os.environ.get("MAX_JOBS", "2"))) as pool:
        reports = list(pool.map(lambda job: parse(ptxas_report(job[0], job[1], flags), job[1]), jobs))
    rows = [dict(kernel=k, **v) for rep in reports for k, v in rep.items()]
    names = demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["name"] = names[r["kernel"]].replace("clfast::cuda::", "").replace("(anonymous namespace)::", "")
    return sorted(rows, key=lambda r: (r["name"], r["arch"]))


def line(r: dict) -> str:
    return f"{r['arch']:6} {r['regs']:5} {r['stack']:6} {r['spill_st']:9} {r['spill_ld']:9} {r['smem']:5}  {r['name']}"


def read_record() -> dict[tuple[str, str], int]:
    recorded = {}
    for text in open(RECORD).read().splitlines():
        if not text.strip() or text.startswith("#"):
            continue
        parts = text.split(None, 6)
        recorded[(parts[0], parts[6])] = int(parts[2])
    return recorded


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="record the numbers in " + os.path.relpath(RECORD, ROOT))
    args = ap.parse_args()
    rows = measure()
    table = "\n".join(line(r) for r in rows)
    if args.write:
        with open(RECORD, "w") as f:
            f.write("# Per-kernel resources of the CUDA kernels (ptxas -v on the device code of "
                    "csrc/*/*_cuda.cu, nvcc -O3),\n# written by `python benchmarks/cuda_resources.py --write`; "
                    "the check fails on any spill and on a larger stack.\n" + HEADER + "\n" + table + "\n")
        print(f"recorded {len(rows)} kernel builds in {os.path.relpath(RECORD, ROOT)}")
        return 0
    print(HEADER + "\n" + table)
    recorded, errors = read_record(), []
    for r in rows:
        if r["spill_st"] or r["spill_ld"]:
            errors.append(f"{r['arch']} {r['name']}: spills ({r['spill_st']} bytes stored, {r['spill_ld']} loaded)")
        limit = recorded.get((r["arch"], r["name"]))
        if limit is None:
            errors.append(f"{r['arch']} {r['name']}: not recorded (python benchmarks/cuda_resources.py --write)")
        elif r["stack"] > limit:
            errors.append(f"{r['arch']} {r['name']}: {r['stack']} bytes of stack, {limit} recorded")
    for e in errors:
        print("cuda-resources: " + e, file=sys.stderr)
    print(f"cuda-resources: {len(rows)} kernel builds, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
