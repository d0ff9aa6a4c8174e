#!/usr/bin/env bash
# Compiles the CUDA sources without a GPU: every csrc/cuda/*.cu with nvcc for sm_80 and sm_90,
# warnings as errors, then a host-compiler syntax check of the torch glue
# python_bindings/cuda_ops.cpp against the installed torch headers.
#
# Environment: NVCC (default nvcc), CXX (default g++), PYTHON (default python), CUDA_HOME.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for source in csrc/cuda/*.cu; do
  "$NVCC" -std=c++17 -O3 -Icsrc/include -Icsrc \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Xcompiler -Wall,-Wextra --Werror all-warnings \
    -c "$source" -o "$work/$(basename "$source").o"
  echo "nvcc ok: $source"
done

# The toolkit's own headers, not one of the copies other packages (e.g. triton) ship.
cuda_include=""
for candidate in "${CUDA_HOME:-}/include" /usr/local/cuda/include; do
  if [[ -f "$candidate/cuda_runtime.h" ]]; then
    cuda_include=$candidate
    break
  fi
done
if [[ -z "$cuda_include" ]]; then
  runtime_header=$(find / -name cuda_runtime.h -path '*cuda*/include/*' 2>/dev/null | head -1 || true)
  cuda_include=$(dirname "$runtime_header")
fi

torch_includes=$("$PYTHON" -c \
  "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
system_includes=()
for dir in $torch_includes "$cuda_include"; do
  system_includes+=(-isystem "$dir")
done

# CPU builds of torch ship the c10/cuda headers but not the header CMake generates for them;
# its only content in CUDA builds is this one define.
generated_header=c10/cuda/impl/cuda_cmake_macros.h
torch_has_generated_header() {
  local dir
  for dir in $torch_includes; do
    [[ -f "$dir/$generated_header" ]] && return 0
  done
  return 1
}
if ! torch_has_generated_header; then
  mkdir -p "$work/stub/$(dirname "$generated_header")"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$work/stub/$generated_header"
  system_includes+=(-isystem "$work/stub")
fi

"$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror "${system_includes[@]}" \
  -Ipython_bindings -Icsrc/include -Icsrc python_bindings/cuda_ops.cpp
echo "syntax ok: python_bindings/cuda_ops.cpp"
