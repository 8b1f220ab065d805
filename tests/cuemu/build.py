"""Builds the emulated CUDA library for the tests: the op schemas, the fronts and the CUDA launchers of csrc/,
compiled by the host compiler with tests/cuemu/cuemu.h, registered as ``torch.ops.clfast_cuemu.*`` on CPU tensors.
The CPU launchers are left out, so every kernel these ops run is a CUDA kernel, run by the emulator.

``python tests/cuemu/build.py`` builds it (ninja keeps what has not changed) into ``build/cuemu`` and prints the
library's path; ``CLFAST_EMU_SANITIZE=thread`` or ``=address`` builds a sanitized copy beside it (for the runs
of tests/cuemu/sanitize.sh; ``CLFAST_EMU_VERBOSE=1`` shows the compiler lines). It is never part of the
installed package. The tests load
``build/cuemu/plain/clfast_cuemu.so``, or the library ``CLFAST_EMU_LIBRARY`` names.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NAMESPACE = "clfast_cuemu"

SANITIZERS = {
    "": [],
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}


def sources(wrapper_dir: str, root: str = ROOT) -> tuple[list[str], list[str]]:
    """(fronts, kernels): ops.cpp and every family's front (csrc/<family>/*.cpp but the CPU launchers); and a .cpp
    wrapper per CUDA launcher file (the host compiler takes .cpp; the wrapper includes the .cu unchanged) with
    the emulator's own test kernels (selftest.cpp)."""
    csrc = os.path.join(root, "csrc")
    fronts = [os.path.join(csrc, "ops.cpp")] + [
        p for p in sorted(glob.glob(os.path.join(csrc, "*", "*.cpp"))) if not p.endswith("_cpu.cpp")]
    wrappers = []
    os.makedirs(wrapper_dir, exist_ok=True)
    for cu in sorted(glob.glob(os.path.join(csrc, "*", "*.cu"))):
        path = os.path.join(wrapper_dir, os.path.basename(cu)[: -len(".cu")] + ".cpp")
        text = f'#include "{cu}"\n'
        if not os.path.exists(path) or open(path).read() != text:  # rewritten only on change: ninja keeps the object
            with open(path, "w") as f:
                f.write(text)
        wrappers.append(path)
    return fronts, wrappers + [os.path.join(HERE, "selftest.cpp")]


def _ninja(build_dir: str, cflags: list[str], ldflags: list[str], compiled: list[str], linked: list[str],
           target: str) -> None:
    """Writes build_dir/build.ninja (compile each of ``compiled`` there, link them with the objects ``linked``
    into ``target``) and runs ninja."""
    def obj(src):
        return os.path.basename(src).rsplit(".", 1)[0] + ".o"

    esc = lambda p: p.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731
    lines = ["ninja_required_version = 1.3", f"cflags = {' '.join(cflags)}", f"ldflags = {' '.join(ldflags)}",
             "rule compile", "  command = c++ -MMD -MF $out.d $cflags -c $in -o $out", "  depfile = $out.d",
             "  deps = gcc", "rule link", "  command = c++ $in $ldflags -o $out"]
    lines += [f"build {obj(src)}: compile {esc(src)}" for src in compiled]
    lines.append(f"build {os.path.basename(target)}: link " + " ".join([obj(s) for s in compiled] + [esc(o) for o in linked]))
    text = "\n".join(lines) + "\n"
    path = os.path.join(build_dir, "build.ninja")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    ninja = os.path.join(os.path.dirname(sys.executable), "ninja")  # the environment's, else the system's
    subprocess.run([ninja if os.path.exists(ninja) else "ninja", "-C", build_dir, "-j", os.environ.get("MAX_JOBS", "2")], check=True,
                   stdout=None if os.environ.get("CLFAST_EMU_VERBOSE") else subprocess.DEVNULL)


def build(sanitize: str = "", root: str = ROOT, build_dir: str | None = None) -> str:
    """Builds (or finds up to date) the emulated library of the sources under ``root`` (a tree with csrc/) in
    ``build_dir`` (default build/cuemu/<plain|thread|address>) and returns its path. A sanitized build
    instruments the kernels and launchers, and links the plain build's fronts, which it builds first."""
    from torch.utils.cpp_extension import include_paths, library_paths

    if sanitize not in SANITIZERS:
        raise ValueError(f"CLFAST_EMU_SANITIZE must be one of {sorted(SANITIZERS)}, got {sanitize!r}")
    base = build_dir or os.path.join(ROOT, "build", "cuemu")
    out_dir = os.path.join(base, sanitize or "plain")
    os.makedirs(out_dir, exist_ok=True)
    fronts, kernels = sources(os.path.join(out_dir, "src"), root)
    # The flags of torch's extension builds, with the emulator included first and the namespace renamed.
    cflags = ([f"-DTORCH_EXTENSION_NAME={NAMESPACE}", "-DTORCH_API_INCLUDE_EXTENSION_H"] +
              [f"-isystem {p}" for p in include_paths() + [sysconfig.get_paths()["include"]]] +
              ["-fPIC", "-std=c++20", "-include", os.path.join(HERE, "cuemu.h"), "-DCLFAST_CUEMU",
               "-I" + os.path.join(root, "csrc"),  # selftest.cpp's csrc headers come from the tree built
               f"-Dclfast={NAMESPACE}", "-ffp-contract=off"])
    ldflags = ["-shared"] + [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
    name = NAMESPACE + (f"_{sanitize}" if sanitize else "")
    target = os.path.join(out_dir, name + ".so")
    if not sanitize:
        _ninja(out_dir, cflags + ["-O2", "-g0"], ldflags, fronts + kernels, [], target)
    else:
        plain = os.path.join(base, "plain")
        build("", root, base)
        front_objects = [os.path.join(plain, os.path.basename(f).rsplit(".", 1)[0] + ".o") for f in fronts]
        _ninja(out_dir, cflags + ["-O1", "-g"] + SANITIZERS[sanitize], ldflags + SANITIZERS[sanitize], kernels,
               front_objects, target)
    return target


if __name__ == "__main__":
    # CLFAST_EMU_ROOT / CLFAST_EMU_BUILD_DIR: another source tree and build folder (tests/cuemu/mutate.py).
    print(build(os.environ.get("CLFAST_EMU_SANITIZE", ""), root=os.environ.get("CLFAST_EMU_ROOT") or ROOT,
                build_dir=os.environ.get("CLFAST_EMU_BUILD_DIR")))
