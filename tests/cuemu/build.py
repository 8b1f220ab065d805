"""Builds the emulated CUDA library for the tests: the op schemas, the fronts and the CUDA launchers of csrc/,
compiled by the host compiler with tests/cuemu/cuemu.h, registered as ``torch.ops.clfast_cuemu.*`` on CPU tensors.
The CPU launchers are left out, so every kernel these ops run is a CUDA kernel, run by the emulator.

``python tests/cuemu/build.py`` builds it (ninja keeps what has not changed) into ``build/cuemu`` and prints the
library's path; ``CLFAST_EMU_SANITIZE=thread`` or ``=address`` builds a sanitized copy beside it (for the runs
of tests/cuemu/sanitize.sh). It is never part of the installed package. The tests load
``build/cuemu/plain/clfast_cuemu.so``, or the library ``CLFAST_EMU_LIBRARY`` names.
"""
from __future__ import annotations

import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NAMESPACE = "clfast_cuemu"

SANITIZERS = {
    "": [],
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}


def sources(wrapper_dir: str, root: str = ROOT) -> list[str]:
    """ops.cpp, every family's front (csrc/<family>/*.cpp but the CPU launchers), a .cpp wrapper per CUDA
    launcher file (the host compiler takes .cpp; the wrapper includes the .cu unchanged), and the emulator's own
    test kernels (selftest.cpp)."""
    csrc = os.path.join(root, "csrc")
    fronts = [p for p in sorted(glob.glob(os.path.join(csrc, "*", "*.cpp"))) if not p.endswith("_cpu.cpp")]
    wrappers = []
    os.makedirs(wrapper_dir, exist_ok=True)
    for cu in sorted(glob.glob(os.path.join(csrc, "*", "*.cu"))):
        path = os.path.join(wrapper_dir, os.path.basename(cu)[: -len(".cu")] + ".cpp")
        text = f'#include "{cu}"\n'
        if not os.path.exists(path) or open(path).read() != text:  # rewritten only on change: ninja keeps the object
            with open(path, "w") as f:
                f.write(text)
        wrappers.append(path)
    return [os.path.join(csrc, "ops.cpp")] + fronts + wrappers + [os.path.join(HERE, "selftest.cpp")]


def build(sanitize: str = "", verbose: bool = False, root: str = ROOT, build_dir: str | None = None) -> str:
    """Builds (or finds up to date) the emulated library of the sources under ``root`` (a tree with csrc/) in
    ``build_dir`` (default build/cuemu/<plain|thread|address>) and returns its path."""
    # torch's ninja build of cpp_extension.load without the load: a sanitized library loads only with its
    # runtime preloaded (sanitize.sh does that for the tests), and the tests load the plain one themselves.
    from torch.utils.cpp_extension import _write_ninja_file_and_build_library

    if sanitize not in SANITIZERS:
        raise ValueError(f"CLFAST_EMU_SANITIZE must be one of {sorted(SANITIZERS)}, got {sanitize!r}")
    name = NAMESPACE + (f"_{sanitize}" if sanitize else "")
    build_dir = build_dir or os.path.join(ROOT, "build", "cuemu", sanitize or "plain")
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-include", os.path.join(HERE, "cuemu.h"), "-DCLFAST_CUEMU", f"-Dclfast={NAMESPACE}",
             "-O1" if sanitize else "-O2", "-g0" if not sanitize else "-g", "-ffp-contract=off"]
    path = os.path.join(build_dir, name + ".so")
    _write_ninja_file_and_build_library(
        name, sources(os.path.join(build_dir, "src"), root), flags + SANITIZERS[sanitize], None, None,
        SANITIZERS[sanitize], None, build_dir, verbose, with_cuda=False, with_sycl=False)
    return path


if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", "2")
    # CLFAST_EMU_ROOT / CLFAST_EMU_BUILD_DIR: another source tree and build folder (tests/cuemu/mutate.py).
    print(build(os.environ.get("CLFAST_EMU_SANITIZE", ""), verbose="-v" in sys.argv,
                root=os.environ.get("CLFAST_EMU_ROOT") or ROOT, build_dir=os.environ.get("CLFAST_EMU_BUILD_DIR")))
