// Top-k selection shared by msbp's kernels: the k largest of a row of values, by (value desc,
// index asc), as the indices in ascending order (the lowest index wins a tie, as in
// msbp.ops.reference.topk_ref).
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "vec.h"

namespace msbp {

template <typename A>
struct Entry {
  A s;
  int64_t i;
};

// (score desc, index asc): the order of the k best.
template <typename A>
inline bool better(const Entry<A>& a, const Entry<A>& b) {
  return a.s > b.s || (a.s == b.s && a.i < b.i);
}

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

// The indices of the k largest values of r over [0, m) (ties: the lower index), ascending, into
// out. First the maximum of every block of values (vectorised); the k-th largest block maximum
// is a lower bound of the k-th largest value, so only the values of blocks whose maximum reaches
// it are candidates (about k blocks on random data, instead of all m values), and the k best
// candidates are found by nth_element. Blocks are 32 values, halved down to one vector while
// there are fewer than 2 k of them.
template <typename A, bool Abs, bool Add>
void topk_blocks(const Ranked<A, Abs, Add>& r, int64_t m, int64_t k, int64_t* out,
                 std::vector<A>& bmax, std::vector<A>& bsel, std::vector<Entry<A>>& cand) {
  if (k >= m) {
    for (int64_t q = 0; q < m; ++q) out[q] = q;
    return;
  }
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::width;
  int64_t bs = 32;
  while (bs > W && m / bs < 2 * k) bs /= 2;
  const int64_t nb = (m + bs - 1) / bs;
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
    bsel.assign(bmax.begin(), bmax.end());
    std::nth_element(bsel.begin(), bsel.begin() + (k - 1), bsel.end(), std::greater<A>());
    thr = bsel[k - 1];
  }
  cand.clear();
  for (int64_t bl = 0; bl < nb; ++bl) {
    if (!(bmax[bl] >= thr)) continue;
    const int64_t j1 = std::min(m, (bl + 1) * bs);
    for (int64_t j = bl * bs; j < j1; ++j) {
      const A v = r.template at<A>(j);
      if (v >= thr) cand.push_back({v, j});  // a NaN fails the comparison
    }
  }
  if (static_cast<int64_t>(cand.size()) < k) {
    // only with NaNs, which fail the finiteness check anyway: any k distinct indices keep the
    // step well defined
    for (int64_t q = 0; q < k; ++q) out[q] = q;
    return;
  }
  if (static_cast<int64_t>(cand.size()) > k)
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better<A>);
  for (int64_t q = 0; q < k; ++q) out[q] = cand[q].i;
  std::sort(out, out + k);
}

}  // namespace msbp
