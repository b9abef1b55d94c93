#pragma once
/// @file gemm.hpp
/// The one dense product the branch algebra needs: a strided, batched C = A * B (+ C).
/// Branches take the function to run it as an argument (GemmFn), so they stay pure
/// algebra: the blocks pass the oneDNN matmul (engine/onednn.hpp, JIT, multi-threaded)
/// for float, and eigen_gemm here for any other scalar.

#include <array>
#include <cstdint>

#include <Eigen/Core>

#include "orepa/core/tensor.hpp"

namespace orepa {

/// A strided, batched matrix product C[b] = A[b] * B[b] (+ C[b] when `accumulate`),
/// A[b] M x K, B[b] K x N, C[b] M x N. Element (b, r, c) of X lives at
/// X + b * X_strides[0] + r * X_strides[1] + c * X_strides[2], so transposed or
/// interleaved operands are described by their strides, without copies.
struct GemmDims {
  std::int64_t batch = 1;  ///< number of matrix products
  std::int64_t M = 0;      ///< rows of A and C
  std::int64_t N = 0;      ///< columns of B and C
  std::int64_t K = 0;      ///< columns of A, rows of B
  std::array<std::int64_t, 3> a{};  ///< element strides (batch, row, column) of A
  std::array<std::int64_t, 3> b{};  ///< element strides (batch, row, column) of B
  std::array<std::int64_t, 3> c{};  ///< element strides (batch, row, column) of C
  bool accumulate = false;          ///< add to C instead of overwriting it
};

/// A function running GemmDims on scalars S.
template <class S>
using GemmFn = void (*)(const GemmDims&, const S*, const S*, S*);

/// GemmDims with Eigen, for any scalar (single-threaded; what double checks use).
template <class S>
void eigen_gemm(const GemmDims& d, const S* A, const S* B, S* C) {
  using Stride = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  using CMap = Eigen::Map<const RowMatrix<S>, 0, Stride>;
  using MMap = Eigen::Map<RowMatrix<S>, 0, Stride>;
  for (std::int64_t b = 0; b < d.batch; ++b) {
    CMap a(A + b * d.a[0], d.M, d.K, Stride(d.a[1], d.a[2]));
    CMap bb(B + b * d.b[0], d.K, d.N, Stride(d.b[1], d.b[2]));
    MMap c(C + b * d.c[0], d.M, d.N, Stride(d.c[1], d.c[2]));
    if (d.accumulate) c.noalias() += a * bb;
    else c.noalias() = a * bb;
  }
}

}  // namespace orepa
