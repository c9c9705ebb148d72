#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU (CI has nvcc and a CPU torch, which cannot build a
# CUDAExtension):
#   - the torch-free kernels (*.cu) with nvcc -c for sm_80 and sm_90;
#   - the binding (plan_cuda.cpp) with g++ -fsyntax-only against torch's and CUDA's headers, when
#     python can import torch (it uses only device-generic c10 headers for exactly this reason).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for arch in sm_80 sm_90; do
  for src in "$here"/*.cu; do
    nvcc -std=c++17 -O3 -c -arch="$arch" -Xcompiler -Wall \
      -o "$tmp/$(basename "$src" .cu)-$arch.o" "$src"
    echo "csrc/cuda: $(basename "$src") compiles for $arch"
  done
done
cuda_inc="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include"
[ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=/usr/local/cuda/include
if torch_inc="$(python -c 'from torch.utils.cpp_extension import include_paths as p; print(" ".join("-I" + i for i in p()))' 2>/dev/null)"; then
  # shellcheck disable=SC2086
  "${CXX:-g++}" -std=c++20 -fsyntax-only $torch_inc -I"$cuda_inc" -I"$here/.." -I"$here" \
    "$here/plan_cuda.cpp"
  echo "csrc/cuda: plan_cuda.cpp passes a syntax check against torch + CUDA headers"
fi
