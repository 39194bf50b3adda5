// Vector helpers shared by msbp's kernels: GCC/Clang vector types (AVX2 registers under -mavx2,
// SSE pairs otherwise; no intrinsics) and the register-blocked row products built on them.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace msbp {

// GCC/Clang vector types: AVX2 registers under -mavx2, SSE pairs otherwise; no intrinsics. The
// register type keeps its natural alignment (so arrays of it stay in registers); memory is read
// and written through the unaligned, may-alias twin.
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef double v4d_u __attribute__((vector_size(32), aligned(8), may_alias));
template <typename T> struct Vec;
template <> struct Vec<float> {
  using type = v8f;
  using mem = v8f_u;
  static constexpr int width = 8;
};
template <> struct Vec<double> {
  using type = v4d;
  using mem = v4d_u;
  static constexpr int width = 4;
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

constexpr int kBlockVecs = 8;  // accumulators per block: 64 floats / 32 doubles in registers

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
  // blocks of 8 vectors (64 floats), then narrower ones: 4, 2, 1 (column blocks of 32 or 16
  // floats land there), then the scalar tail
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
