// Vector helpers shared by msbp's kernels: GCC/Clang vector types (AVX-512 registers under
// -mavx512f, AVX2 ones under -mavx2, SSE pairs otherwise; no intrinsics) and the register-blocked
// row products built on them.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace msbp {

// The register width the build targets (native.cpu_flags: AVX-512 where PyTorch's own kernels
// run AVX-512, else AVX2). 64 bytes on an AVX-512 build: at 10 x 784 x 500 the backward of a
// unified layer ran ~1.2x faster than with 32-byte vectors on the same CPU. Each lane adds its
// terms in the same order at any width: the results equal an AVX2 build's bit for bit but where
// a row's scalar tail is rounded differently (1 ulp in some float64 dW rows 37 wide).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

// GCC/Clang vector types of kVecBytes (SSE pairs without -mavx2); no intrinsics. The register
// type keeps its natural alignment (so arrays of it stay in registers); memory is read and
// written through the unaligned, may-alias twin.
typedef float vf __attribute__((vector_size(kVecBytes)));
typedef double vd __attribute__((vector_size(kVecBytes)));
typedef float vf_u __attribute__((vector_size(kVecBytes), aligned(4), may_alias));
typedef double vd_u __attribute__((vector_size(kVecBytes), aligned(8), may_alias));
template <typename T> struct Vec;
template <> struct Vec<float> {
  using type = vf;
  using mem = vf_u;
  static constexpr int width = kVecBytes / sizeof(float);
};
template <> struct Vec<double> {
  using type = vd;
  using mem = vd_u;
  static constexpr int width = kVecBytes / sizeof(double);
};

template <typename V, typename A>
inline V load(const A* p) {
  if constexpr (std::is_floating_point_v<V>) {
    return *p;
  } else {
    return *reinterpret_cast<const typename Vec<A>::mem*>(p);
  }
}
template <typename V, typename A>
inline void store(A* p, V v) {
  if constexpr (std::is_floating_point_v<V>) {
    *p = v;
  } else {
    *reinterpret_cast<typename Vec<A>::mem*>(p) = v;
  }
}
template <typename V>
inline V vabs(V x) {
  if constexpr (std::is_floating_point_v<V>) {
    return std::abs(x);
  } else {
    // the sign bit cleared, as std::abs does (a NaN stays a NaN): one AND, where the compare
    // and blend of `x < 0 ? -x : x` took three or four instructions of the scoring passes
    using E = std::remove_cv_t<std::remove_reference_t<decltype(x[0])>>;
    using IE = std::conditional_t<sizeof(E) == 8, int64_t, int32_t>;
    typedef IE I __attribute__((vector_size(sizeof(V))));
    return (V)((I)x & (I{} + std::numeric_limits<IE>::max()));
  }
}

constexpr int kBlockVecs = 8;  // accumulators per block: 8 vectors in registers

// From b on, blocks of NV vectors of dst[0..len) (+)= sum_j coef[j] * src[j][..]; returns where
// it stopped (fewer than NV vectors left).
template <typename T, bool Add, int NV>
inline int64_t axpy_block(T* dst, const T* const* src, const T* coef, int64_t cnt, int64_t len,
                          int64_t b) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  for (; b + NV * W <= len; b += NV * W) {
    V acc[NV];
    for (int q = 0; q < NV; ++q) acc[q] = V{};
    for (int64_t j = 0; j < cnt; ++j) {
      const T* s = src[j] + b;
      const V c = V{} + coef[j];
      for (int q = 0; q < NV; ++q) acc[q] += c * load<V>(s + q * W);
    }
    for (int q = 0; q < NV; ++q)
      store(dst + b + q * W, Add ? load<V>(dst + b + q * W) + acc[q] : acc[q]);
  }
  return b;
}

// dst[0..len) (+)= sum_j coef[j] * src[j][0..len): every product of the backward.
template <typename T, bool Add>
void axpy_rows(T* dst, const T* const* src, const T* coef, int64_t cnt, int64_t len) {
  // blocks of 8 vectors (64 floats with AVX2), then narrower ones: 4, 2, 1 (column blocks
  // narrower than 8 vectors land there), then the scalar tail
  int64_t b = axpy_block<T, Add, kBlockVecs>(dst, src, coef, cnt, len, 0);
  b = axpy_block<T, Add, 4>(dst, src, coef, cnt, len, b);
  b = axpy_block<T, Add, 2>(dst, src, coef, cnt, len, b);
  b = axpy_block<T, Add, 1>(dst, src, coef, cnt, len, b);
  for (; b < len; ++b) {
    T acc = 0;
    for (int64_t j = 0; j < cnt; ++j) acc += coef[j] * src[j][b];
    dst[b] = Add ? dst[b] + acc : acc;
  }
}

// dst[0..len) += a * src[0..len)
template <typename T>
inline void axpy1(T* dst, const T* src, T a, int64_t len) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const V av = V{} + a;
  int64_t i = 0;
  for (; i + W <= len; i += W) store(dst + i, load<V>(dst + i) + av * load<V>(src + i));
  for (; i < len; ++i) dst[i] += a * src[i];
}

}  // namespace msbp
