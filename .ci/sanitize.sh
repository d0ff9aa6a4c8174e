#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer (VSOPS_SANITIZE=1)
# in a copy of the sources, so the installed build stays as it is, and runs the operator tests
# against that build. Any sanitizer report aborts the test process, and so fails this script.
#
# Usage: .ci/sanitize.sh [pytest arguments]   (default: the operator test files below)
# Deselected: the Triton cases (the interpreter runs Python, which the sanitizers do not see, and
# it is slow) and the gradchecks (thousands of calls of kernels other tests already run: nine
# minutes here). Needs the active Python environment of .ci/run (torch, pytest).
# Environment: CXX (default c++, the compiler torch's build uses), MAX_JOBS (default 2),
# VSOPS_SANITIZE_DIR (build there and keep it, so a rerun recompiles only changed files;
# default: a temporary directory, removed on exit).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CXX=${CXX:-c++}
if [[ -n "${VSOPS_SANITIZE_DIR:-}" ]]; then
  work=$VSOPS_SANITIZE_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

# The files git would commit (tracked, and new ones not ignored): no build outputs. Their times
# are kept, so that a kept build directory recompiles only what changed.
git ls-files -z --cached --others --exclude-standard |
  xargs -0 cp --parents --no-dereference --preserve=timestamps -t "$work"
cd "$work"

start=$SECONDS
VSOPS_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} python setup.py --quiet build_ext --inplace
echo "sanitize: built in $((SECONDS - start)) s"

# Python itself is not instrumented, so the ASan runtime must be loaded first; libstdc++ right
# after it, or ASan's interceptor of __cxa_throw cannot find the real one and aborts on the first
# C++ exception (every TORCH_CHECK). Python's allocations live until exit by design: no leak check.
LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so.6)"
export LD_PRELOAD ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# The tests must import this sanitized build, not an installed one.
python -c "import sys, vsops._C as c; sys.exit(not c.__file__.startswith('$work'))"

if [[ $# -eq 0 ]]; then
  set -- -k "not triton and not gradcheck" tests/ops/test_difftopk.py tests/ops/test_lis.py \
    tests/ops/test_varlen.py tests/ops/test_divprune_op.py tests/ops/test_attention_received_op.py \
    tests/ops/test_op_registration.py tests/methods/test_methods.py
fi
start=$SECONDS
# --capture=sys: a report is written to file descriptor 2 by a process about to exit, which
# pytest's default capture would swallow.
python -m pytest -q -p no:cacheprovider --capture=sys --durations=10 "$@"
echo "sanitize: tests ran in $((SECONDS - start)) s"
