#!/usr/bin/env bash
# The emulated CUDA tests (pytest -m cuemu) under ThreadSanitizer, then under AddressSanitizer with
# UndefinedBehaviorSanitizer (-fno-sanitize-recover: the first report fails the run). Each builds its own copy
# of the emulated library (tests/cuemu/build.py) and preloads the sanitizer's runtime into Python.
# Usage: tests/cuemu/sanitize.sh [thread|address ...] [-- pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
modes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do modes+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#modes[@]} -eq 0 ] && modes=(thread address)
# One thread: torch's OpenMP workers synchronise in ways TSan cannot see. Blocks and threads shuffled: no kernel
# may depend on the order of its blocks, nor on which thread runs ahead between barriers.
export OMP_NUM_THREADS=1 CLFAST_REQUIRE_CUEMU=1 CLFAST_EMU_BLOCK_ORDER=${CLFAST_EMU_BLOCK_ORDER:-shuffle} \
  CLFAST_EMU_THREAD_ORDER=${CLFAST_EMU_THREAD_ORDER:-shuffle}
for mode in "${modes[@]}"; do
  lib=$(CLFAST_EMU_SANITIZE=$mode "$PY" tests/cuemu/build.py 2>/dev/null | tail -n 1)
  case $mode in
    thread) runtime=$(g++ -print-file-name=libtsan.so)
            export TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_thread_leaks=0 report_signal_unsafe=0 \
suppressions=$PWD/tests/cuemu/tsan.supp" ;;
    # libstdc++ right after it: ASan's __cxa_throw interceptor needs the real one loaded at start-up.
    address) runtime="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
             export ASAN_OPTIONS="detect_leaks=0 halt_on_error=1 exitcode=66" \
                    UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1" ;;
    *) echo "unknown sanitizer $mode (thread or address)"; exit 2 ;;
  esac
  echo "== $mode sanitizer: $lib"
  # --capture=sys: a sanitizer's report, written to fd 2, reaches the log.
  LD_PRELOAD="$runtime" CLFAST_EMU_LIBRARY="$lib" "$PY" -m pytest -q -p no:cacheprovider --capture=sys -m cuemu \
    "${@:-tests}"
done
