// Single-threaded GEMMs on raw row-major pointers for the CPU kernels' tiles.
#pragma once
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>

#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <type_traits>

// BLAS entry points that torch's x86 wheels export (MKL); weak, so a torch without them (other
// platforms) loads this library too and the tiles fall back to at::addmm_out. Calling BLAS
// directly saves the dispatcher and tensor construction, ~5 us per GEMM, 3-6 GEMMs per tile.
// MKL_Set_Num_Threads_Local is MKL's C entry point (the lower-case symbol is the Fortran one):
// at::set_num_threads turns MKL's dynamic mode off, after which a GEMM called inside our
// parallel region would start its own nested team (4 threads on 2 cores, 10-100x slower).
extern "C" {
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace mftk {
namespace {

// Single-threaded BLAS in this scope (the tiles are the parallelism); restores on exit.
struct SerialBlas {
  int prev = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
  }
};

// BLAS when torch exports it, unless MFTK_CPU_ATEN_GEMM=1 (the fallback, tested on x86 too).
bool use_blas() {
  static const bool blas = sgemm_ != nullptr && dgemm_ != nullptr &&
                           std::getenv("MFTK_CPU_ATEN_GEMM") == nullptr;
  return blas;
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C, single-threaded inside a tile. op(A) is
// [m, k]: A stored [m, k] (ta false) or [k, m] (ta true), row stride lda; likewise B. beta == 0
// ignores C's contents. Column-major BLAS computes C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // no products: C = beta C (BLAS would reject a leading dimension of 0)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  constexpr int64_t kMax = std::numeric_limits<int>::max();  // BLAS takes int sizes
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "mftk CPU gemm: a size or leading dimension over 2^31 - 1 (m ", m, ", n ", n,
              ", k ", k, ")");
  const char na = tb ? 'T' : 'N', nb = ta ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if (use_blas()) {
    if constexpr (std::is_same_v<T, float>) {
      return sgemm_(&na, &nb, &im, &in, &ik, &alpha, b, &la, a, &lb, &beta, c, &lc);
    } else {
      return dgemm_(&na, &nb, &im, &in, &ik, &alpha, b, &la, a, &lb, &beta, c, &lc);
    }
  }
  const auto o = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto mat = [&](const T* p, bool tr, int64_t r, int64_t cols, int64_t ld) {
    auto t = at::from_blob(const_cast<T*>(p), {tr ? cols : r, tr ? r : cols}, {ld, 1}, o);
    return tr ? t.t() : t;
  };
  auto cm = at::from_blob(c, {m, n}, {ldc, 1}, o);
  at::addmm_out(cm, cm, mat(a, ta, m, k, lda), mat(b, tb, k, n, ldb), beta, alpha);
}

}  // namespace
}  // namespace mftk
