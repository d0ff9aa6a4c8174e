#!/usr/bin/env bash
# Compiles the CUDA sources without a GPU: every csrc/cuda/*.cu with nvcc and the -gencode flags
# of setup.py (VSOPS_CUDA_ARCHS: native code per arch, and the PTX of the newest), warnings as
# errors, then a host-compiler syntax check of the glue compiled only in CUDA builds
# (python_bindings/cuda_ops.cpp, and the CUDA half of python_bindings/module.cpp) against the
# installed torch and Python headers.
#
# Environment: NVCC (default nvcc), CXX (default g++), PYTHON (default python), CUDA_HOME.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The flags of the real build, from setup.py itself (importing it builds nothing).
gencode_flags=$("$PYTHON" -c "
import importlib.util
spec = importlib.util.spec_from_file_location('vsops_setup', 'setup.py')
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
print(' '.join(setup._cuda_gencode_flags()))")
read -r -a gencode <<<"$gencode_flags"
echo "nvcc flags: ${gencode[*]}"

for source in csrc/cuda/*.cu; do
  "$NVCC" -std=c++17 -O3 -Icsrc/include -Icsrc "${gencode[@]}" \
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

python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
"$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DVSOPS_WITH_CUDA -isystem "$python_include" \
  -isystem "$cuda_include" -Icsrc python_bindings/module.cpp
echo "syntax ok: python_bindings/module.cpp (VSOPS_WITH_CUDA)"
