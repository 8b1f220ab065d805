#!/usr/bin/env bash
# The package as users get it: builds the wheel from this checkout, installs it with both extras into a fresh
# virtual environment that has only the pinned torch, and checks it from outside the checkout: every module
# imports from the installed copy with the native extension loaded, the `clfast` console script runs a small
# experiment, and the README's Python examples run.
#   tests/wheel_check.sh PYTHON DATA_DIR
set -euo pipefail
PY=${1:?usage: wheel_check.sh PYTHON DATA_DIR}
DATA_DIR=${2:?usage: wheel_check.sh PYTHON DATA_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The checkout on PYTHONPATH (as make sets it) would make pip see its build's clfast.egg-info as installed.
unset PYTHONPATH
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m build --wheel --no-isolation --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/clfast-*.whl)
echo "built $(basename "$WHEEL")"
"$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q "$(grep -E '^torch==' "$ROOT/requirements.txt")" "$WHEEL[avalanche,experiments]" \
  >"$WORK/pip.log" 2>&1 || { grep -v "^WARNING: Location" "$WORK/pip.log" | tail -40; exit 1; }

cd "$WORK"  # nothing of the checkout on sys.path
"$V/python" - "$WORK/venv" <<'PYEOF'
import importlib, os, pkgutil, sys
import clfast
assert clfast.__file__.startswith(sys.argv[1]), f"clfast imported from {clfast.__file__}, not the installed wheel"
assert clfast.native_available(), "the installed extension did not load"
modules = [m.name for m in pkgutil.walk_packages(clfast.__path__, "clfast.") if m.name != "clfast.__main__"]
for name in modules:
    importlib.import_module(name)
print(f"imported {len(modules)} modules from {os.path.dirname(clfast.__file__)}, backend {clfast.backend()}")
PYEOF
"$V/clfast" --help >/dev/null
"$V/clfast" --data-dir "$DATA_DIR" --methods finetune,si --fraction 0.1 --epochs 2 --batch-size 32 \
  --no-plots \
  --out "$WORK/out" >"$WORK/run.log" 2>&1 || { tail -40 "$WORK/run.log"; exit 1; }
test -s "$WORK/out/results.json"
echo "clfast console script: $(tail -1 "$WORK/run.log")"
"$V/python" - "$ROOT/README.md" <<'PYEOF'
import re, sys
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1]).read(), re.S)
for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
print(f"ran the README's {len(blocks)} Python examples")
PYEOF
echo "wheel check passed"
