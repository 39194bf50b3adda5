// Top-k selection shared by msbp's kernels: the k largest of a row of values, by (value desc,
// index asc), as the indices in ascending order (the lowest index wins a tie, as in
// msbp.ops.reference.topk_ref).
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

namespace msbp {

// The values ranked by a selection: x[j] (+ add[j] * mul), their absolute value for Abs.
template <typename A, bool Abs, bool Add>
struct Ranked {
  const A* x;
  const A* add;
  A mul;
  template <typename V>
  inline V at(int64_t j) const {
    V v = load<V>(x + j);
    if (Add) v = v + load<V>(add + j) * (V{} + mul);
    return Abs ? vabs(v) : v;
  }
};

// Scratch space of topk_blocks, reused over the rows of a call.
template <typename A>
struct TopkScratch {
  std::vector<A> bmax, sel, cand_v, pad;
  std::vector<int64_t> cand_i, rank;
};

// Up to this many values, ranks are counted in vector registers instead of nth_element: n^2 / W
// compares without a branch, where nth_element mispredicts about every other comparison on
// random data (the 63 block maxima of a row of 500, k = 20: 0.65 us, a third of the row's
// selection). For the block maxima only where k >= n / 8: nth_element for a small k is cheaper
// (m = 2,000, k = 5: 63 blocks). Row of 500, k = 20: 1.78 -> 0.61 us; 1,200, k = 30: 3.1 ->
// 1.1 us; 2,000, k = 5: equal (a microbenchmark over 256 random rows).
constexpr int64_t kRankCountMax = 128;

// The k-th largest of b[0..n), counted with multiplicity (k <= n <= kRankCountMax): the least
// b_i with fewer than k values above it.
template <typename A>
A kth_largest_counted(const A* b, int64_t n, int64_t k, std::vector<A>& pad) {
  using V = typename Vec<A>::type;
  using I = decltype(V{} > V{});
  using L = std::remove_reference_t<decltype(std::declval<I&>()[0])>;
  constexpr int W = Vec<A>::width;
  const A inf = std::numeric_limits<A>::infinity();
  const int64_t nv = (n + W - 1) / W;
  pad.assign(nv * W, -inf);  // never the answer: at least k >= 1 real values lie above it
  std::copy_n(b, n, pad.begin());
  V best = V{} + inf;
  for (int64_t v = 0; v < nv; ++v) {
    const V bi = load<V>(pad.data() + v * W);
    I above = I{};
    for (int64_t j = 0; j < n; ++j) above -= (V{} + pad[j]) > bi;  // a true lane is -1
    const V keep = above < static_cast<L>(k) ? bi : V{} + inf;
    best = keep < best ? keep : best;
  }
  A out = inf;
  for (int q = 0; q < W; ++q) out = best[q] < out ? best[q] : out;
  return out;
}

// The indices of the k largest values of r over [0, m) (ties: the lower index), ascending, into
// out. First the maximum of every block of values (vectorised); the k-th largest block maximum
// is a lower bound of the k-th largest value, so only the values of blocks whose maximum reaches
// it are candidates (about k blocks on random data, instead of all m values), and the k best
// candidates are found among them. Blocks are 32 values, halved down to one vector while there
// are fewer than 2 k of them.
template <typename A, bool Abs, bool Add>
void topk_blocks(const Ranked<A, Abs, Add>& r, int64_t m, int64_t k, int64_t* out,
                 TopkScratch<A>& s) {
  if (k >= m) {
    for (int64_t q = 0; q < m; ++q) out[q] = q;
    return;
  }
  using V = typename Vec<A>::type;
  using I = decltype(V{} > V{});
  using L = std::remove_reference_t<decltype(std::declval<I&>()[0])>;
  constexpr int W = Vec<A>::width;
  int64_t bs = 32;
  while (bs > W && m / bs < 2 * k) bs /= 2;
  const int64_t nb = (m + bs - 1) / bs;
  std::vector<A>& bmax = s.bmax;
  bmax.resize(nb);
  for (int64_t bl = 0; bl < nb; ++bl) {
    const int64_t j0 = bl * bs, j1 = std::min(m, j0 + bs);
    int64_t j = j0;
    A mx = -std::numeric_limits<A>::infinity();
    if (j + W <= j1) {
      V mv = r.template at<V>(j);
      for (j += W; j + W <= j1; j += W) {
        const V v = r.template at<V>(j);
        mv = v > mv ? v : mv;
      }
      for (int q = 0; q < W; ++q) mx = mv[q] > mx ? mv[q] : mx;
    }
    for (; j < j1; ++j) {
      const A v = r.template at<A>(j);
      mx = v > mx ? v : mx;
    }
    bmax[bl] = mx == mx ? mx : std::numeric_limits<A>::infinity();  // NaN: scan the block
  }
  A thr = -std::numeric_limits<A>::infinity();
  if (nb >= k) {
    if (nb <= kRankCountMax && 8 * k >= nb) {
      thr = kth_largest_counted(bmax.data(), nb, k, s.pad);
    } else {
      s.sel.assign(bmax.begin(), bmax.end());
      std::nth_element(s.sel.begin(), s.sel.begin() + (k - 1), s.sel.end(), std::greater<A>());
      thr = s.sel[k - 1];
    }
  }
  // the candidates, in index order: every value >= thr (a NaN fails the comparison) of the
  // blocks whose maximum reaches it, appended without a branch
  if (static_cast<int64_t>(s.cand_v.size()) < m + W) {
    s.cand_v.resize(m + W);
    s.cand_i.resize(m + W);
  }
  A* cv = s.cand_v.data();
  int64_t* ci = s.cand_i.data();
  int64_t c = 0;
  for (int64_t bl = 0; bl < nb; ++bl) {
    if (!(bmax[bl] >= thr)) continue;
    const int64_t j1 = std::min(m, (bl + 1) * bs);
    for (int64_t j = bl * bs; j < j1; ++j) {
      const A v = r.template at<A>(j);
      cv[c] = v;
      ci[c] = j;
      c += v >= thr;
    }
  }
  if (c < k) {
    // only with NaNs, which fail the finiteness check anyway: any k distinct indices keep the
    // step well defined
    for (int64_t q = 0; q < k; ++q) out[q] = q;
    return;
  }
  if (c == k) {
    std::copy_n(ci, k, out);
    return;
  }
  if (c <= kRankCountMax) {
    // rank of candidate i: the candidates above it, and those equal to it at a lower index
    // (candidates are in index order); the k of rank < k come out in index order
    const int64_t nv = (c + W - 1) / W;
    for (int64_t q = c; q < nv * W; ++q) cv[q] = -std::numeric_limits<A>::infinity();
    s.rank.resize(nv * W);
    I lane{};
    for (int q = 0; q < W; ++q) lane[q] = q;
    for (int64_t v = 0; v < nv; ++v) {
      const V ri = load<V>(cv + v * W);
      const I pos = lane + static_cast<L>(v * W);
      I rank = I{};
      for (int64_t j = 0; j < c; ++j) {
        const V rj = V{} + cv[j];
        const I jv = I{} + static_cast<L>(j);
        rank -= (rj > ri) | ((rj == ri) & (jv < pos));
      }
      for (int q = 0; q < W; ++q) s.rank[v * W + q] = rank[q];
    }
    int64_t q = 0;
    for (int64_t i = 0; i < c; ++i) {
      ci[q] = ci[i];
      q += s.rank[i] < k;
    }
    std::copy_n(ci, k, out);
    return;
  }
  // the k-th best value among the candidates, then one pass in index order: every candidate
  // above it, and as many equal to it as are left, lowest index first. No sort of the k
  // indices, no (value, index) pairs: a row of 4,096 values, k = 164 (~190 candidates), took
  // 27 us with those, 15 us so (the whole selection, 1 thread, the Xeon).
  s.sel.assign(cv, cv + c);
  std::nth_element(s.sel.begin(), s.sel.begin() + (k - 1), s.sel.end(), std::greater<A>());
  const A kth = s.sel[k - 1];
  int64_t ties = k;
  for (int64_t i = 0; i < c; ++i) ties -= cv[i] > kth;
  int64_t q = 0;
  for (int64_t i = 0; i < c; ++i) {
    const A v = cv[i];
    const bool tie = v == kth && ties > 0;
    ties -= tie;
    ci[q] = ci[i];  // in place: q <= i
    q += (v > kth) | tie;
  }
  std::copy_n(ci, k, out);
}

}  // namespace msbp
