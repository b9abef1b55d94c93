#pragma once
/// @file parallel.hpp
/// The library's own loops run on OpenMP, the runtime oneDNN runs on, so both share one
/// pool of threads (OMP_NUM_THREADS sets it) and never compete for the cores; built
/// without OpenMP (-fopenmp absent; CMake option OREPA_OPENMP=OFF) they run serially.
///
/// parallel_ranges() splits [0, n) into one contiguous range per thread. The split depends
/// only on n and the thread count, so successive loops over the same n (the output
/// channels of a kernel, say) give each thread the same rows: the rows one loop writes
/// are still in that thread's core cache when the next loop reads them.

#include <algorithm>
#include <cstdint>
#include <exception>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// OREPA_SIMD before a loop asks for it to be vectorized (OpenMP's `simd`), which GCC's -O2
// cost model otherwise declines for loops of unknown length; OREPA_SIMD_OR(v) for a loop
// that ORs into `v`. Without OpenMP both are nothing.
/// \cond DO_NOT_DOCUMENT_THIS
#ifdef _OPENMP
#define OREPA_PRAGMA(x) _Pragma(#x)
#define OREPA_SIMD OREPA_PRAGMA(omp simd)
#define OREPA_SIMD_OR(v) OREPA_PRAGMA(omp simd reduction(| : v))
#else
#define OREPA_SIMD
#define OREPA_SIMD_OR(v)
#endif
/// \endcond

namespace orepa {

/// Threads parallel_ranges() uses for `n` items (at least 1, at most n, 1 when already
/// inside a parallel region).
inline int range_threads(std::int64_t n) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  return int(std::max<std::int64_t>(1, std::min<std::int64_t>(omp_get_max_threads(), n)));
#else
  (void)n;
  return 1;
#endif
}

/// The most threads parallel_ranges() can use (for per-thread scratch).
inline int max_range_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

/// Runs f(begin, end, thread) once per thread over contiguous ranges covering [0, n),
/// thread in [0, range_threads(n)); an exception a call throws is rethrown after all
/// have finished.
template <class F>
void parallel_ranges(std::int64_t n, F&& f) {
#ifdef _OPENMP
  if (const int T = range_threads(n); T > 1) {
    std::exception_ptr error;
#pragma omp parallel num_threads(T)
    {
      const int t = omp_get_thread_num();
      const std::int64_t per = n / T, extra = n % T;
      const std::int64_t begin = t * per + std::min<std::int64_t>(t, extra);
      try {
        f(begin, begin + per + (t < extra ? 1 : 0), t);
      } catch (...) {
#pragma omp critical(orepa_parallel_ranges)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  f(std::int64_t(0), n, 0);
}

/// Runs f(k, j0, j1) on elements [j0, j1) of span k, for spans of `sizes[k]` elements laid
/// end to end as one index range that parallel_ranges() splits: many small tensors (a
/// network's parameters, say) share the threads as evenly as one large one.
template <class F>
void parallel_spans(const std::vector<std::int64_t>& sizes, F&& f) {
  std::vector<std::int64_t> start(sizes.size() + 1, 0);
  for (std::size_t k = 0; k < sizes.size(); ++k) start[k + 1] = start[k] + sizes[k];
  parallel_ranges(start.back(), [&](std::int64_t begin, std::int64_t end, int) {
    auto k = std::size_t(std::upper_bound(start.begin(), start.end(), begin) - start.begin()) - 1;
    for (; k < sizes.size() && start[k] < end; ++k)
      if (sizes[k] > 0) f(k, std::max(begin, start[k]) - start[k], std::min(end, start[k + 1]) - start[k]);
  });
}

}  // namespace orepa
