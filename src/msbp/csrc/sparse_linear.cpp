// msbp::sparse_linear_backward: the MSBP backward of y = x W^T + b as one op (CPU).
//
//   U  = G + M * scale        (M kept unscaled; spread as M / n for the `unit` layout)
//   S  = select_k(U)          (unified / random: k columns; per-example: k entries per row)
//   dx = U_S W_S ; dW = U_S^T x   (compacted: only k columns of U, k rows of W and dW)
//   M  = alpha * (U - U_S) / scale
//   db = colsum(G)
//
// One pass over G builds U, the column scores, the column sums of U, and the finiteness
// flag; the products are ATen GEMMs of width k (unified) or blocked loops over the kept entries
// (per-example); with unified / random selection the `unit` memory comes from those sums with
// no second pass over U (per-example sums the residual U - U_S itself; on one thread it ranks
// each row as pass 1 makes it, U never written whole: fused_rows_topk). Mirrors
// msbp.ops.sparse_linear.sparse_linear_backward_torch (the fallback) and
// msbp.ops.reference.sparse_linear_backward_ref (the oracle).
//
// Padding (all_rows false, memory_rows="active"): the rows of G that are all zero take no part.
// Where that matters (a memory, or per-example selection) a scan finds them, stopping in each
// row at its first non-zero entry (so it costs about one read per row unless a row is zero); a
// batch with zero rows runs the backward on its other rows, compacted, and the zero rows get
// dx = 0 and keep their slot memory; with no active row the memory is left as it is.
#include "bindings.h"
#include "common.h"
#include "topk.h"
#include "vec.h"

#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/node.h>
#include <torch/csrc/autograd/python_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <typeinfo>
#include <unordered_map>
#include <sstream>
#include <cmath>
#include <vector>

namespace msbp {
namespace {

using at::Tensor;
using Out5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

enum Selection : int64_t { kUnified = 0, kPerExample = 1, kRandom = 2 };

// The memory row that row r of U takes: none without a memory or for a row that is off
// (row_on: null = every row on), its slot row, or the unit memory.
template <typename A>
inline const A* mem_row(const A* mem, const uint8_t* row_on, bool slot, int64_t r, int64_t out) {
  if (mem == nullptr || (row_on != nullptr && !row_on[r])) return nullptr;
  return slot ? mem + r * out : mem;
}

// One entry of U = G + M * mem_mul (mr: the memory row, or null).
template <typename G, typename A>
inline A u_value(G gv, const A* mr, int64_t o, A mem_mul) {
  A v = static_cast<A>(gv);
  return mr ? v + mr[o] * mem_mul : v;
}

// Pass 1 on rows [r, r + R) and columns [o0, o1) (vectors on [o0, ov), scalars after): U = G +
// madd, written to u when WriteU; colsum |U| into score when Score; colsum U into usum when
// SumU; colsum G into gsum when SumG; wit / nan_acc turn NaN iff some entry is inf or NaN. Each
// column adds its rows in order (the same bits as a row at a time), but the R rows of a vector
// of columns are added in registers before the sums are stored once: at 800 x 2000 (the
// tagger's gates) the loads and stores of the sums per row had cost as much as reading G. g_rows
// (null: the identity) maps row r of U to the row of g it is made from.
template <typename G, typename A, bool WriteU, bool SumG, bool SumU, int R, bool Score = true>
inline void pass_rows(const G* g, const int64_t* g_rows, A* u, int64_t r, int64_t out,
                      int64_t o0, int64_t ov, int64_t o1, const A* mem, const uint8_t* row_on,
                      bool slot, A mem_mul, A* score, A* usum, A* gsum,
                      typename Vec<A>::type& wit, A& nan_acc) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::width;
  const G* gr[R];
  A* ur[R];
  const A* mr[R];
  for (int i = 0; i < R; ++i) {
    gr[i] = g + (g_rows != nullptr ? g_rows[r + i] : r + i) * out;
    ur[i] = WriteU ? u + (r + i) * out : nullptr;
    mr[i] = mem_row(mem, row_on, slot, r + i, out);
  }
  if constexpr (std::is_same_v<G, A>) {
    const V zero = V{}, mm = V{} + mem_mul;
    for (int64_t o = o0; o < ov; o += W) {
      V sc = V{}, us = V{}, gs = V{};
      if constexpr (Score) sc = load<V>(score + o);
      if constexpr (SumU) us = load<V>(usum + o);
      if constexpr (SumG) gs = load<V>(gsum + o);
      for (int i = 0; i < R; ++i) {
        const V gv = load<V>(gr[i] + o);
        const V v = mr[i] ? gv + load<V>(mr[i] + o) * mm : gv;
        if constexpr (WriteU) store(ur[i] + o, v);
        if constexpr (SumG) gs = gs + gv;
        if constexpr (SumU) us = us + v;
        if constexpr (Score) sc = sc + vabs(v);
        wit = wit + v * zero;
      }
      if constexpr (Score) store(score + o, sc);
      if constexpr (SumU) store(usum + o, us);
      if constexpr (SumG) store(gsum + o, gs);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t o = ov; o < o1; ++o) {
      A v = u_value(gr[i][o], mr[i], o, mem_mul);
      if constexpr (WriteU) ur[i][o] = v;
      if constexpr (SumG) gsum[o] += static_cast<A>(gr[i][o]);
      if constexpr (SumU) usum[o] += v;
      if constexpr (Score) score[o] += std::abs(v);
      nan_acc += v * A(0);  // NaN iff some v is inf or NaN; never overflows
    }
  }
}

// Pass 1 over columns [o0, o1) of all n rows (see pass_rows); *bad gets the finiteness witness.
// u, usum, gsum: null where not wanted (unified / random top-k with the `unit` layout reads only
// k columns of U afterwards, which it recomputes, instead of writing n x out values; usum only
// feeds a unit memory; gsum is db).
template <typename G, typename A, bool WriteU, bool SumG, bool SumU>
void build_u_pass(const G* g, const int64_t* g_rows, A* u, int64_t n, int64_t out, int64_t o0,
                  int64_t o1, const A* mem, const uint8_t* row_on, bool slot, A mem_mul,
                  A* score, A* usum, A* gsum, A* bad) {
  std::fill(score + o0, score + o1, A(0));
  if constexpr (SumU) std::fill(usum + o0, usum + o1, A(0));
  if constexpr (SumG) std::fill(gsum + o0, gsum + o1, A(0));
  // vectors across columns where G is A; the witness as a vector (a scalar sum of v * 0 kept
  // the compiler from vectorising the pass: 960 x 2000, 1.2 -> ~0.3 ms)
  constexpr int W = Vec<A>::width;
  const int64_t ov = std::is_same_v<G, A> ? o0 + (o1 - o0) / W * W : o0;
  typename Vec<A>::type wit{};
  A nan_acc = 0;
  constexpr int R = 4;
  int64_t r = 0;
  for (; r + R <= n; r += R)
    pass_rows<G, A, WriteU, SumG, SumU, R>(g, g_rows, u, r, out, o0, ov, o1, mem, row_on, slot,
                                           mem_mul, score, usum, gsum, wit, nan_acc);
  for (; r < n; ++r)
    pass_rows<G, A, WriteU, SumG, SumU, 1>(g, g_rows, u, r, out, o0, ov, o1, mem, row_on, slot,
                                           mem_mul, score, usum, gsum, wit, nan_acc);
  for (int l = 0; l < W; ++l) nan_acc += wit[l];
  *bad = nan_acc;
}

template <typename G, typename A>
void build_u(const G* g, const int64_t* g_rows, A* u, int64_t n, int64_t out, int64_t o0,
             int64_t o1, const A* mem, const uint8_t* row_on, bool slot, A mem_mul, A* score,
             A* usum, A* gsum, A* bad) {
  auto run = [&](auto write_u, auto sum_g, auto sum_u) {
    build_u_pass<G, A, decltype(write_u)::value, decltype(sum_g)::value, decltype(sum_u)::value>(
        g, g_rows, u, n, out, o0, o1, mem, row_on, slot, mem_mul, score, usum, gsum, bad);
  };
  auto with_sum_u = [&](auto write_u, auto sum_g) {
    usum != nullptr ? run(write_u, sum_g, std::true_type{})
                    : run(write_u, sum_g, std::false_type{});
  };
  auto with_sum_g = [&](auto write_u) {
    gsum != nullptr ? with_sum_u(write_u, std::true_type{})
                    : with_sum_u(write_u, std::false_type{});
  };
  u != nullptr ? with_sum_g(std::true_type{}) : with_sum_g(std::false_type{});
}

// Pass 1 of row r for per-example selection (pass_rows on that one row, without scores): U =
// G + M * mem_mul into a scratch row u (0..out), colsum G into gsum when SumG; returns NaN iff
// some entry of U is inf or NaN.
template <typename G, typename A, bool SumG>
A u_row(const G* g, const int64_t* g_rows, int64_t r, int64_t out, const A* mem,
        const uint8_t* row_on, A mem_mul, A* u, A* gsum) {
  constexpr int W = Vec<A>::width;
  const int64_t ov = std::is_same_v<G, A> ? out / W * W : 0;
  typename Vec<A>::type wit{};
  A nan_acc = 0;
  const G* gr = g + (g_rows != nullptr ? g_rows[r] : r) * out;
  pass_rows<G, A, true, SumG, false, 1, false>(gr, nullptr, u, 0, out, 0, ov, out, mem,
                                               row_on != nullptr ? row_on + r : nullptr, false,
                                               mem_mul, nullptr, nullptr, gsum, wit, nan_acc);
  for (int l = 0; l < W; ++l) nan_acc += wit[l];
  return nan_acc;
}

// Per-example selection where no row of U is kept afterwards (no memory, or the `unit`
// layout) and the backward runs on one thread: pass 1 and each row's top-k fused, row by row
// through a scratch row that stays in L1, instead of writing U (n, out) and reading it back
// (the tagger's per-example input transform: ~1,100 x 2,000 a batch, 8.8 MB). Fills ip / vp
// (n, k: each row's kept columns ascending and their values), gsum (db; null: not wanted) and
// res_sum (colsum of the residual U - U_S; null without a memory), every column summed over
// the rows in order, as pass 1 and the top-k loop sum them; returns false if some entry of U
// is inf or NaN (the rows after the first such row only add into gsum).
template <typename G, typename A>
bool fused_rows_topk(const G* g, const int64_t* g_rows, int64_t n, int64_t out, int64_t k,
                     const A* mem, const uint8_t* row_on, A mem_mul, A* gsum, A* res_sum,
                     int64_t* ip, A* vp) {
  std::vector<A> urow(out);
  A* ur = urow.data();
  TopkScratch<A> scratch;
  if (gsum != nullptr) std::fill(gsum, gsum + out, A(0));
  if (res_sum != nullptr) std::fill(res_sum, res_sum + out, A(0));
  bool finite = true;
  for (int64_t r = 0; r < n; ++r) {
    const A bad = gsum != nullptr
                      ? u_row<G, A, true>(g, g_rows, r, out, mem, row_on, mem_mul, ur, gsum)
                      : u_row<G, A, false>(g, g_rows, r, out, mem, row_on, mem_mul, ur, gsum);
    finite = finite && std::isfinite(bad);
    if (!finite) continue;
    int64_t* ir = ip + r * k;
    topk_blocks(Ranked<A, true, false>{ur, nullptr, 0}, out, k, ir, scratch);
    for (int64_t j = 0; j < k; ++j) vp[r * k + j] = ur[ir[j]];
    if (res_sum != nullptr) {
      for (int64_t j = 0; j < k; ++j) ur[ir[j]] = 0;
      for (int64_t o = 0; o < out; ++o) res_sum[o] += ur[o];
    }
  }
  return finite;
}

// Work below which a parallel region costs more than it saves (OpenMP start and join, measured
// on 2 cores: small layers ran 2x slower on 2 threads than on 1 with finer grains).
constexpr int64_t kMinTaskWork = 1 << 18;

// Unified top-k's two products run as loops over the kept rows of W and x instead of a gather
// and two GEMM calls while they are this small (n k in multiply-adds): there the ATen calls
// cost more than the arithmetic (784 x 500, k = 20: 10 rows 2.4x -> 3.6x against dense), above
// it the GEMMs win (4096 x 4096, k = 164, 64 rows: 8.8 ms as loops, 3.8 ms as GEMMs).
constexpr int64_t kLoopWork = 1 << 20;

inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(work_per_item, 1));
}

// Width of the column blocks of the sparse products: the gathered operand's block (rows x
// width) should stay in a core's L2 (512 KiB of it) while every output row is computed from it;
// without blocking each output row streamed k full rows from memory (2x at 1024 x 4096 x 4096
// against 5-6x blocked). A multiple of the axpy kernel's block of kBlockVecs vectors (narrower
// blocks, packed, measured no faster with AVX2).
template <typename T>
int64_t column_block(int64_t operand_rows, int64_t d_in) {
  constexpr int64_t B = Vec<T>::width * kBlockVecs;
  int64_t blocks = (512 * 1024) / (std::max<int64_t>(operand_rows, 1) * B * sizeof(T));
  // at least 1: callers divide by it, and d_in may be 0 (a layer with no input features)
  return std::max<int64_t>(std::min<int64_t>(std::max<int64_t>(blocks, 1) * B, d_in), 1);
}

// Operands from this size on are gathered from a packed copy of each column block: rows of a
// large operand lie a page or more apart, so each gathered row segment cost a TLB miss (at
// 1024 x 4096 x 4096 per-example the products ran at ~7 GFLOP/s unpacked).
constexpr int64_t kPackBytes = 8 << 20;

// The block [off, off + len) of the rows of a (rows, ld) matrix, as a contiguous (rows, len)
// matrix in buf (when packing pays), else a view of the matrix itself; returns (base, stride).
template <typename T>
std::pair<const T*, int64_t> block_of(const T* a, int64_t rows, int64_t ld, int64_t off,
                                      int64_t len, std::vector<T>& buf) {
  if (rows * ld * static_cast<int64_t>(sizeof(T)) < kPackBytes || len == ld) return {a + off, ld};
  buf.resize(rows * len);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(buf.data() + r * len, a + r * ld + off, len * sizeof(T));
  return {buf.data(), len};
}

// Prefetch (for writing) the segment a product writes two rows later: its rows lie a whole
// row of the matrix apart, beyond the hardware prefetcher's reach (1024 x 4096 x 4096
// per-example: ~148 -> ~126 ms).
template <typename T>
inline void prefetch_row(const T* p, int64_t len) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t l = 0; l < len * static_cast<int64_t>(sizeof(T)); l += 64) __builtin_prefetch(c + l, 1);
}

// dx (n, in) = sum over row r's kept entries vals[r, j] * W[idx[r, j]]: n k in multiply-adds,
// column block by column block (threads take blocks: each writes its own columns of dx).
template <typename T>
void rows_product(const int64_t* idx, const T* vals, const T* w, T* dx, int64_t n, int64_t k,
                  int64_t out, int64_t d_in) {
  const int64_t width = column_block<T>(out, d_in);
  const int64_t nblocks = (d_in + width - 1) / width;
  at::parallel_for(0, nblocks, grain(n * k * width), [&](int64_t b0, int64_t b1) {
    std::vector<const T*> src(k);
    std::vector<T> buf;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * width, len = std::min(width, d_in - off);
      auto [base, ld] = block_of(w, out, d_in, off, len, buf);
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j < k; ++j) src[j] = base + idx[r * k + j] * ld;
        if (r + 2 < n) prefetch_row(dx + (r + 2) * d_in + off, len);
        axpy_rows<T, false>(dx + r * d_in + off, src.data(), vals + r * k, k, len);
      }
    }
  });
}

// Index lists for rows_product where each of n rows keeps the same k columns cols[0..k).
inline std::vector<int64_t> same_cols(const int64_t* cols, int64_t k, int64_t n) {
  std::vector<int64_t> idx(n * k);
  for (int64_t r = 0; r < n; ++r) std::copy(cols, cols + k, idx.begin() + r * k);
  return idx;
}

// dW rows: for the q-th kept column (CSC lists), dst[cols[q]] = sum over its entries v * x[row];
// blocked over the columns of x like rows_product.
template <typename T, bool Add>
void columns_product(const int64_t* cols, int64_t c, const int64_t* start, const int64_t* rows,
                     const T* vals, const T* x, T* dst, int64_t n, int64_t d_in) {
  const int64_t width = column_block<T>(n, d_in);
  const int64_t nblocks = (d_in + width - 1) / width;
  at::parallel_for(0, nblocks, grain(start[c] * width), [&](int64_t b0, int64_t b1) {
    std::vector<const T*> src;
    std::vector<T> buf;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * width, len = std::min(width, d_in - off);
      auto [base, ld] = block_of(x, n, d_in, off, len, buf);
      for (int64_t q = 0; q < c; ++q) {
        int64_t s = start[q], e = start[q + 1];
        src.resize(e - s);
        for (int64_t t = s; t < e; ++t) src[t - s] = base + rows[t] * ld;
        if (q + 2 < c) prefetch_row(dst + cols[q + 2] * d_in + off, len);
        axpy_rows<T, Add>(dst + cols[q] * d_in + off, src.data(), vals + s, e - s, len);
      }
    }
  });
}

[[noreturn]] void nonfinite() {
  TORCH_CHECK(false, "msbp-nonfinite: non-finite output gradient; the memory was left unchanged");
}

// The two transposing kernels below move 16 x 16 tiles (16 of W^T's rows by 16 of the listed
// columns) through a buffer in registers / L1: each cache line of W^T is then read or written
// whole at once. Strided loops touching one column of 16 or 64 rows at a time re-read each line
// once per column, and at 3,072 columns (a stride of three pages) those rows fall into one L1
// set: placing 2,240 rows of 768 took 13 ms that way, ~7 ns an element.
constexpr int64_t kTile = 16;

// A zero (out, d_in) tensor laid out as W^T (strides (1, out)) with rows `rows` (c,) set to
// the rows of v (c, d_in): the dense dW of a transposed weight, written a block of W^T's rows
// at a time (index_copy_ into that layout took 25 ms at 3072 x 768, every row kept).
Tensor place_rows_transposed(const Tensor& weight, const Tensor& rows, const Tensor& v) {
  const int64_t out = weight.size(0), d_in = weight.size(1), c = rows.size(0);
  Tensor dst_t = at::empty({d_in, out}, v.options());  // W^T's storage, contiguous
  Tensor vc = v.contiguous(), rc = rows.contiguous();
  const int64_t* rp = rc.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "msbp_rows_t", [&] {
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    scalar_t* dp = dst_t.data_ptr<scalar_t>();
    const int64_t blocks = (d_in + kTile - 1) / kTile;
    at::parallel_for(0, blocks, grain(kTile * out), [&](int64_t b0, int64_t b1) {
      scalar_t tile[kTile][kTile];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kTile, ni = std::min(kTile, d_in - i0);
        std::memset(dp + i0 * out, 0, ni * out * sizeof(scalar_t));
        for (int64_t q0 = 0; q0 < c; q0 += kTile) {
          const int64_t nq = std::min(kTile, c - q0);
          for (int64_t m = 0; m < nq; ++m)
            for (int64_t l = 0; l < ni; ++l) tile[l][m] = vp[(q0 + m) * d_in + i0 + l];
          for (int64_t l = 0; l < ni; ++l) {
            scalar_t* row = dp + (i0 + l) * out;
            for (int64_t m = 0; m < nq; ++m) row[rp[q0 + m]] = tile[l][m];
          }
        }
      }
    });
  });
  return dst_t.t();
}

// The rows `rows` (c,) of a transposed weight (out, d_in) (W^T's storage contiguous), as a
// contiguous (c, d_in) tensor: only the rows the products read (ATen's index_select on the
// transposed view took 7.7 ms for 2,240 of 3,072 rows at 768 inputs, .contiguous() of all of
// it 2.5-9 ms).
Tensor gather_rows_transposed(const Tensor& weight, const int64_t* rows, int64_t c) {
  const int64_t out = weight.size(0), d_in = weight.size(1);
  Tensor dst = at::empty({c, d_in}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "msbp_gather_t",
                                  [&] {
    const scalar_t* wt = weight.data_ptr<scalar_t>();  // W^T (d_in, out), contiguous
    scalar_t* dp = dst.data_ptr<scalar_t>();
    at::parallel_for(0, (d_in + kTile - 1) / kTile, grain(kTile * c), [&](int64_t b0, int64_t b1) {
      scalar_t tile[kTile][kTile];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kTile, ni = std::min(kTile, d_in - i0);
        for (int64_t q0 = 0; q0 < c; q0 += kTile) {
          const int64_t nq = std::min(kTile, c - q0);
          for (int64_t l = 0; l < ni; ++l) {
            const scalar_t* row = wt + (i0 + l) * out;
            for (int64_t m = 0; m < nq; ++m) tile[m][l] = row[rows[q0 + m]];
          }
          for (int64_t m = 0; m < nq; ++m)
            std::memcpy(dp + (q0 + m) * d_in + i0, tile[m], ni * sizeof(scalar_t));
        }
      }
    });
  });
  return dst;
}

// Per-example top-k on a transposed weight (W^T's storage) runs its products as two GEMMs over
// the scattered kept entries, at a dense layer's cost, up to this many rows (where more than an
// eighth of the columns are kept: fewer are gathered for the loops or the GEMMs of width c).
// The loops need W's rows contiguous and hand back dW in W's layout: copying W and transposing
// dW cost a fixed 5-10 ms at 768 x 3072 (a few ns an element), which the n k in multiply-adds
// they save repay only from a few hundred rows on (GPT-2's c_fc at 32 tokens: 0.2x of the dense
// Conv1D by the loops, 0.9x by the GEMMs; at 512, 1.1x by the loops;
// benchmarks/bench_hf_conv1d.py --tokens).
constexpr int64_t kTransposedGemmRows = 128;

// The rows `rows` (c,) of W (out, d_in), contiguous or W^T's storage, as a (c, d_in) tensor.
Tensor weight_rows(const Tensor& weight, const Tensor& rows) {
  if (weight.is_contiguous()) return weight.index_select(0, rows);
  Tensor rc = rows.contiguous();
  return gather_rows_transposed(weight, rc.data_ptr<int64_t>(), rc.size(0));
}

template <typename A>
Out5 backward_impl(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                  const std::optional<Tensor>& memory,
                                  const std::optional<Tensor>& random_cols, double scale_value,
                                  int64_t k, int64_t selection, double alpha, bool slot,
                                  bool need_x, bool need_w, bool need_b, bool compact_dw,
                                  bool skip_nonfinite, double csr_ratio, Tensor* grad_into,
                                  const uint8_t* row_on, int64_t n_on, Tensor* u_out,
                                  const Tensor* g_rows) {
  // row_on (n,) or null: only the rows that are on take the memory, spread over n_on of them
  // (the `unit` layout with padding rows, which take part with their zero gradient).
  // g_rows (n,) or null: the rows of grad_out that x's n rows are (the active rows of a batch
  // with zero rows), read where they are instead of copied out
  const int64_t n = g_rows != nullptr ? g_rows->size(0) : grad_out.size(0);
  const int64_t out = grad_out.size(1), d_in = x.size(1);
  const int64_t* g_row = g_rows != nullptr ? g_rows->data_ptr<int64_t>() : nullptr;
  auto acc_opts = grad_out.options().dtype(c10::CppTypeToScalarType<A>::value);
  auto x_opts = x.options();
  auto long_opts = grad_out.options().dtype(at::kLong);
  const bool use_memory = memory.has_value() && alpha > 0;
  const bool dense = k >= out;
  Tensor g = grad_out.contiguous();

  // Pass 1: U, scores, column sums, finiteness. U itself is not stored where only k of its
  // columns are read later (unified / random selection, `unit` layout or no memory): on large
  // layers writing it (and faulting in its fresh pages) cost more than the rest of the pass.
  const int64_t nchunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n * out) / kMinTaskWork));
  // per-example top-k fused with pass 1 (fused_rows_topk) where no row of U is kept and the
  // two passes would run on one thread anyway (so the same bits at any thread count)
  const bool fused = !dense && selection == kPerExample && !(use_memory && slot) &&
                     (at::get_num_threads() == 1 || at::in_parallel_region() ||
                      (nchunks == 1 && n <= grain(4 * out)));
  const bool keep_u = dense || (selection == kPerExample && !fused) || (use_memory && slot);
  Tensor u = keep_u ? at::empty({n, out}, acc_opts) : Tensor();
  A* u_ptr = keep_u ? u.data_ptr<A>() : nullptr;
  Tensor score = fused ? Tensor() : at::empty({out}, acc_opts);
  // colsum U: what a unit memory keeps of the columns unified / random selection drops
  const bool need_usum = use_memory && !slot && !dense && selection != kPerExample;
  Tensor usum = need_usum ? at::empty({out}, acc_opts) : Tensor();
  Tensor mem_c;
  const A* mem_ptr = nullptr;
  A mem_mul = 0;
  if (use_memory) {
    mem_c = memory->contiguous();
    mem_ptr = mem_c.data_ptr<A>();
    mem_mul = static_cast<A>(slot ? scale_value : scale_value / static_cast<double>(n_on));
  }
  // db in the same pass, except at k = out, where it is summed as torch sums it, so that the
  // layer is bit-identical to a dense one
  Tensor db = need_b && !dense ? at::empty({out}, acc_opts) : Tensor();
  A* gsum_ptr = db.defined() ? db.data_ptr<A>() : nullptr;
  bool finite = true;
  // per-example selection's kept entries (n, k), and a unit memory's colsum of the residual
  // where the top-k loop below or fused_rows_topk has summed it
  Tensor idx_t, val_t;
  std::vector<A> res_sum;
  bool summed = false;
  if (selection == kPerExample && !dense) {
    idx_t = at::empty({n, k}, long_opts);
    val_t = at::empty({n, k}, acc_opts);
  }
  if (fused) {
    if (use_memory) res_sum.resize(out);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "msbp_rows_topk",
                                    [&] {
      finite = fused_rows_topk<scalar_t, A>(
          g.data_ptr<scalar_t>(), g_row, n, out, k, mem_ptr, row_on, mem_mul, gsum_ptr,
          use_memory ? res_sum.data() : nullptr, idx_t.data_ptr<int64_t>(), val_t.data_ptr<A>());
    });
    summed = use_memory;
  } else {
    std::vector<A> bad(nchunks, 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "msbp_build_u",
                                    [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t o0 = out * c / nchunks, o1 = out * (c + 1) / nchunks;
          build_u<scalar_t, A>(gp, g_row, u_ptr, n, out, o0, o1, mem_ptr, row_on, slot, mem_mul,
                               score.data_ptr<A>(), need_usum ? usum.data_ptr<A>() : nullptr,
                               gsum_ptr, &bad[c]);
        }
      });
    });
    for (A b : bad) finite = finite && std::isfinite(b);
  }

  if (!need_b) db = at::empty({0}, acc_opts);
  else if (dense) db = at::sum(g, {0}, false, acc_opts.dtype().toScalarType());
  Tensor empty_x = at::empty({0}, x_opts);

  if (!finite) {
    if (!skip_nonfinite) nonfinite();
    // skip: memory untouched, the raw gradient through the dense chain rule
    Tensor gc = (g_rows != nullptr ? g.index_select(0, *g_rows) : g).to(x.scalar_type());
    Tensor dx = need_x ? at::mm(gc, weight) : empty_x;
    Tensor dW = need_w ? at::mm(gc.t(), x) : empty_x;
    return {dx, dW, db, at::arange(out, long_opts), at::ones({}, long_opts)};
  }

  A* up = u_ptr;
  const A inv_scale = static_cast<A>(alpha / scale_value);
  Tensor dx = empty_x, dW = empty_x, rows;
  // dW: the rows' values (r, in) when compact_dw, else a dense (out, in) with zeros elsewhere
  auto place_rows = [&](const Tensor& rows_idx, const Tensor& src) -> Tensor {
    Tensor v = src.to(weight.scalar_type());
    if (compact_dw) return v;
    if (!weight.is_contiguous()) return place_rows_transposed(weight, rows_idx, v);
    return at::zeros({out, d_in}, weight.options()).index_copy_(0, rows_idx, v);
  };

  // the operands are A itself (no conversion needed for hand-written loops)
  const bool same_type = x.scalar_type() == c10::CppTypeToScalarType<A>::value &&
                         weight.scalar_type() == x.scalar_type();
  // dW's rows by the blocked loops from the kept entries in CSC form (column q, dW row cols[q]):
  // added straight into the gradient buffer when there is one (returns undefined), else a
  // compact (c, in) dW, or a dense (out, in) one with zeros elsewhere
  auto loop_dw = [&](const int64_t* cols, int64_t c, const int64_t* start, const int64_t* csc_rows,
                     const A* csc_vals) -> Tensor {
    const A* xp = x.data_ptr<A>();
    if (grad_into != nullptr) {
      columns_product<A, true>(cols, c, start, csc_rows, csc_vals, xp, grad_into->data_ptr<A>(),
                               n, d_in);
      grad_into->unsafeGetTensorImpl()->bump_version();  // as index_add_ would
      return Tensor();
    }
    // a transposed weight's dW in its layout where few rows are kept; where most are (per-
    // example top-k over many rows) a contiguous one, which AccumulateGrad's transposing copy
    // takes for less than placing the rows (35 against 50 ms at 512 x 768 x 3072, measured
    // before place_rows_transposed moved tiles)
    const bool compact = compact_dw || (!weight.is_contiguous() && 2 * c < out);
    std::vector<int64_t> dst_rows(c);
    for (int64_t q = 0; q < c; ++q) dst_rows[q] = compact ? q : cols[q];
    Tensor d = compact ? at::empty({c, d_in}, x_opts) : at::zeros({out, d_in}, x_opts);
    columns_product<A, false>(dst_rows.data(), c, start, csc_rows, csc_vals, xp, d.data_ptr<A>(),
                              n, d_in);
    if (compact_dw || !compact) return d;
    Tensor idx = at::empty({c}, long_opts);
    std::copy(cols, cols + c, idx.data_ptr<int64_t>());
    return place_rows(idx, d);
  };

  if (dense || selection != kPerExample) {
    // Unified / random / dense: one set of columns for the batch.
    Tensor idx;
    if (dense) {
      idx = at::arange(out, long_opts);
    } else if (selection == kRandom) {
      idx = std::get<0>(at::sort(random_cols->to(at::kLong)));
    } else {
      idx = at::empty({k}, long_opts);  // ascending: the rows of dW in order
      TopkScratch<A> scratch;
      topk_blocks(Ranked<A, false, false>{score.data_ptr<A>(), nullptr, 0}, out, k,
                  idx.data_ptr<int64_t>(), scratch);
    }
    const int64_t kk = idx.size(0);
    const int64_t* ip = idx.data_ptr<int64_t>();
    Tensor u_k;
    if (dense) {
      u_k = u.to(x.scalar_type());
    } else {
      Tensor u_sel = at::empty({n, kk}, acc_opts);
      A* sp = u_sel.data_ptr<A>();
      if (keep_u) {
        for (int64_t r = 0; r < n; ++r)
          for (int64_t j = 0; j < kk; ++j) sp[r * kk + j] = up[r * out + ip[j]];
      } else {
        // the k columns of U from G and the memory, by the same expression as pass 1
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "msbp_u_sel",
                                        [&] {
          const scalar_t* gp = g.data_ptr<scalar_t>();
          for (int64_t r = 0; r < n; ++r) {
            const A* mr = mem_row(mem_ptr, row_on, slot, r, out);
            const scalar_t* gr = gp + (g_row != nullptr ? g_row[r] : r) * out;
            for (int64_t j = 0; j < kk; ++j)
              sp[r * kk + j] = u_value(gr[ip[j]], mr, ip[j], mem_mul);
          }
        });
      }
      u_k = u_sel.to(x.scalar_type());
    }
    // u_out: dx handed back as its factors U_S (n, k) and the rows `idx` of W, for a caller
    // that needs only products of dx (the embedding table's gradient)
    const bool factored = need_x && u_out != nullptr && !dense;
    if (factored) *u_out = u_k.to(x.scalar_type());
    const bool want_dx = need_x && !factored;
    const bool loops = !dense && n * kk * d_in <= kLoopWork && same_type;
    if (loops) {
      // Small products: per-example's blocked loops with every row keeping the same kk columns,
      // straight from W's and x's rows (no gather of W, no GEMM call, no index_add: at
      // 10 x 784 x 500 those ATen calls cost more than the arithmetic)
      const A* sp = u_k.data_ptr<A>();
      if (want_dx) {
        dx = at::empty({n, d_in}, x_opts);
        if (weight.is_contiguous()) {
          const std::vector<int64_t> row_cols = same_cols(ip, kk, n);
          rows_product<A>(row_cols.data(), sp, weight.data_ptr<A>(), dx.data_ptr<A>(), n, kk,
                          out, d_in);
        } else {  // W^T's storage: its kk rows gathered, numbered 0..kk-1
          const Tensor wr = gather_rows_transposed(weight, ip, kk);
          std::vector<int64_t> iota(kk);
          for (int64_t j = 0; j < kk; ++j) iota[j] = j;
          const std::vector<int64_t> row_cols = same_cols(iota.data(), kk, n);
          rows_product<A>(row_cols.data(), sp, wr.data_ptr<A>(), dx.data_ptr<A>(), n, kk, kk,
                          d_in);
        }
      }
      if (need_w) {
        // CSC of U_S: column j holds every row
        std::vector<int64_t> start(kk + 1), csc_rows(kk * n);
        std::vector<A> csc_vals(kk * n);
        for (int64_t j = 0; j <= kk; ++j) start[j] = j * n;
        for (int64_t j = 0; j < kk; ++j)
          for (int64_t r = 0; r < n; ++r) {
            csc_rows[j * n + r] = r;
            csc_vals[j * n + r] = sp[r * kk + j];
          }
        dW = loop_dw(ip, kk, start.data(), csc_rows.data(), csc_vals.data());
      }
    } else {
      if (want_dx) dx = at::mm(u_k, dense ? weight : weight_rows(weight, idx));
      if (need_w) {
        if (dense && !weight.is_contiguous()) {
          dW = at::mm(x.t(), u_k).t().to(weight.scalar_type());  // (out, in), W^T's layout
        } else {
          Tensor dW_k = at::mm(u_k.t(), x);  // (k, in)
          dW = dense ? dW_k.to(weight.scalar_type()) : place_rows(idx, dW_k);
        }
      }
    }
    if (use_memory) {
      if (slot) {
        if (dense) {
          memory->zero_();
        } else {
          // residual rows: alpha * U / scale with the kept columns zeroed
          A* mp = memory->data_ptr<A>();
          at::parallel_for(0, n, grain(out), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              for (int64_t o = 0; o < out; ++o) mp[r * out + o] = up[r * out + o] * inv_scale;
              for (int64_t j = 0; j < kk; ++j) mp[r * out + ip[j]] = 0;
            }
          });
        }
      } else if (dense) {
        memory->zero_();  // everything propagated
      } else {
        A* mp = memory->data_ptr<A>();
        const A* us = usum.data_ptr<A>();
        for (int64_t o = 0; o < out; ++o) mp[o] = us[o] * inv_scale;
        for (int64_t j = 0; j < kk; ++j) mp[ip[j]] = 0;
      }
    }
    rows = idx;
  } else {
    // Per example: k entries per row; c distinct columns over the batch.
    int64_t* ip = idx_t.data_ptr<int64_t>();
    A* vp = val_t.data_ptr<A>();
    // a unit memory's column sums of the residual, added row by row while the row is in cache,
    // where the loop runs as one chunk (rows in order: the bits of the pass below, which then
    // need not read U again; the tagger's ~1,100 x 2,000 residual a batch)
    if (!fused) at::parallel_for(0, n, grain(4 * out), [&](int64_t r0, int64_t r1) {
      const bool sum_here = use_memory && !slot && r0 == 0 && r1 == n;
      if (sum_here) res_sum.assign(out, A(0));
      // by the maxima of blocks of |U| (topk.h), read in place: at the tagger's 800 rows of
      // 2,000 gate gradients, k = 5, the op took 3.8 ms with a threshold from a sample of each
      // row (a scalar scan of |U| copied out), 1.85 ms with this
      TopkScratch<A> scratch;
      for (int64_t r = r0; r < r1; ++r) {
        const A* ur = up + r * out;
        topk_blocks(Ranked<A, true, false>{ur, nullptr, 0}, out, k, ip + r * k,
                    scratch);  // ascending columns
        for (int64_t j = 0; j < k; ++j) vp[r * k + j] = ur[ip[r * k + j]];
        // U becomes the residual U - U_S, which the memory is made of
        if (use_memory)
          for (int64_t j = 0; j < k; ++j) up[r * out + ip[r * k + j]] = 0;
        if (sum_here) {
          A* rs = res_sum.data();
          for (int64_t o = 0; o < out; ++o) rs[o] += ur[o];
        }
      }
      if (sum_here) summed = true;
    });
    // CSC of the kept entries: counting sort by column, rows ascending within a column.
    std::vector<int64_t> count(out + 1, 0);
    for (int64_t e = 0; e < n * k; ++e) ++count[ip[e] + 1];
    std::vector<int64_t> col_of(out, -1);
    std::vector<int64_t> cols_v, start_v;
    start_v.push_back(0);
    for (int64_t o = 0; o < out; ++o) {
      if (count[o + 1] > 0) {
        col_of[o] = static_cast<int64_t>(cols_v.size());
        cols_v.push_back(o);
        start_v.push_back(start_v.back() + count[o + 1]);
      }
    }
    const int64_t c = static_cast<int64_t>(cols_v.size());
    std::vector<int64_t> fill(start_v.begin(), start_v.end() - 1), csc_rows(n * k);
    std::vector<A> csc_vals(n * k);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < k; ++j) {
        int64_t q = col_of[ip[r * k + j]];
        int64_t t = fill[q]++;
        csc_rows[t] = r;
        csc_vals[t] = vp[r * k + j];
      }
    rows = at::empty({c}, long_opts);
    std::copy(cols_v.begin(), cols_v.end(), rows.data_ptr<int64_t>());

    const bool loops = same_type && static_cast<double>(c) >= csr_ratio * static_cast<double>(k);
    if (!weight.is_contiguous() && !compact_dw && n <= kTransposedGemmRows && 8 * c > out) {
      // A transposed weight, few rows, many columns kept: the two products as GEMMs over G_S
      // scattered into (n, out), on W^T's storage as it is, dW in its layout (see
      // kTransposedGemmRows); with few columns the routes below gather them cheaply
      Tensor g_s = at::zeros({n, out}, acc_opts);
      A* gp = g_s.data_ptr<A>();
      for (int64_t e = 0; e < n * k; ++e) gp[(e / k) * out + ip[e]] = vp[e];
      Tensor g_sx = g_s.to(x.scalar_type());
      if (need_x) dx = at::mm(g_sx, weight);
      if (need_w) dW = at::mm(x.t(), g_sx).t().to(weight.scalar_type());
    } else if (loops) {
      // Blocked loops over the kept entries: n k in multiply-adds for each product.
      if (need_x) {
        dx = at::empty({n, d_in}, x_opts);
        if (weight.is_contiguous()) {
          rows_product<A>(ip, vp, weight.data_ptr<A>(), dx.data_ptr<A>(), n, k, out, d_in);
        } else {
          // W^T's storage: its c kept rows gathered where they are few, the entries renumbered
          // to them; else all of it copied (ATen's copy is the faster where most rows are read)
          const bool few = 8 * c <= out;
          const Tensor wr = few ? gather_rows_transposed(weight, cols_v.data(), c)
                                : weight.contiguous();
          std::vector<int64_t> ic;
          if (few) {
            ic.resize(n * k);
            for (int64_t e = 0; e < n * k; ++e) ic[e] = col_of[ip[e]];
          }
          rows_product<A>(few ? ic.data() : ip, vp, wr.data_ptr<A>(), dx.data_ptr<A>(), n, k,
                          few ? c : out, d_in);
        }
      }
      if (need_w) dW = loop_dw(cols_v.data(), c, start_v.data(), csc_rows.data(), csc_vals.data());
    } else {
      // Few distinct columns (or 16-bit operands): GEMMs of width c over the kept columns.
      Tensor g_c = at::zeros({n, c}, acc_opts);
      A* gp = g_c.data_ptr<A>();
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < k; ++j) gp[r * c + col_of[ip[r * k + j]]] = vp[r * k + j];
      Tensor g_cx = g_c.to(x.scalar_type());
      if (need_x) dx = at::mm(g_cx, weight_rows(weight, rows));
      if (need_w) {
        dW = place_rows(rows, at::mm(g_cx.t(), x));
      }
    }
    if (use_memory) {
      A* mp = memory->data_ptr<A>();
      if (slot) {
        at::parallel_for(0, n, grain(out), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t o = 0; o < out; ++o) mp[r * out + o] = up[r * out + o] * inv_scale;
        });
      } else {
        // the column sums of the residual itself, rows in order whatever the thread count:
        // colsum(U) minus the kept entries lost float32 digits where most of a column was kept
        // (relative error 1e-5 to 1e-4 at k/out near 1, growing with n)
        if (summed) {
          for (int64_t o = 0; o < out; ++o) mp[o] = res_sum[o] * inv_scale;
        } else {
          at::parallel_for(0, out, grain(n), [&](int64_t o0, int64_t o1) {
            std::fill(mp + o0, mp + o1, A(0));
            for (int64_t r = 0; r < n; ++r) {
              const A* ur = up + r * out;
              for (int64_t o = o0; o < o1; ++o) mp[o] += ur[o];
            }
            for (int64_t o = o0; o < o1; ++o) mp[o] *= inv_scale;
          });
        }
      }
    }
  }
  return {dx, dW, db, rows, at::zeros({}, long_opts)};
}

// The rows of g (n, out) with an entry that is not zero (NaN and inf count), ascending; each
// row is read up to its first such entry.
template <typename T>
std::vector<int64_t> active_rows(const T* g, int64_t n, int64_t out) {
  std::vector<int64_t> active;
  active.reserve(n);
  for (int64_t r = 0; r < n; ++r) {
    const T* gr = g + r * out;
    for (int64_t o = 0; o < out; ++o) {
      if (gr[o] != T(0)) {  // true for NaN
        active.push_back(r);
        break;
      }
    }
  }
  return active;
}

Out5 dispatch_backward(
    const Tensor& grad_out, const Tensor& xc, const Tensor& wc,
    const std::optional<Tensor>& memory, const std::optional<Tensor>& random_cols,
    double scale_value, int64_t k, int64_t selection, double alpha, bool slot, bool need_x,
    bool need_w, bool need_b, bool compact_dw, bool skip_nonfinite, double csr_ratio,
    at::ScalarType acc, Tensor* grad_into, const uint8_t* row_on = nullptr, int64_t n_on = -1,
    Tensor* u_out = nullptr, const Tensor* g_rows = nullptr) {
  if (n_on < 0) n_on = g_rows != nullptr ? g_rows->size(0) : grad_out.size(0);
  if (acc == at::kDouble) {
    return backward_impl<double>(grad_out, xc, wc, memory, random_cols,
                                 scale_value, k, selection, alpha, slot, need_x, need_w, need_b,
                                 compact_dw, skip_nonfinite, csr_ratio, grad_into, row_on, n_on,
                                 u_out, g_rows);
  }
  return backward_impl<float>(grad_out, xc, wc, memory, random_cols,
                              scale_value, k, selection, alpha, slot, need_x, need_w, need_b,
                              compact_dw, skip_nonfinite, csr_ratio, grad_into, row_on, n_on,
                              u_out, g_rows);
}

// grad_into: a contiguous gradient buffer of the weight's shape and dtype into which the rows
// of dW may be added directly (the result's dW is then undefined), or nullptr. u_out: where
// dx may come back factored (unified / random top-k: dx = *u_out W[rows]; dx is then
// undefined), or nullptr; left undefined where dx itself comes back.
Out5 backward_into(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const std::optional<Tensor>& memory, const std::optional<Tensor>& random_cols,
    const std::optional<Tensor>& scale, int64_t k, int64_t selection, double alpha, bool slot,
    bool need_x, bool need_w, bool need_b, bool compact_dw, bool skip_nonfinite,
    double csr_ratio, bool all_rows, Tensor* grad_into, Tensor* u_out = nullptr) {
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && weight.dim() == 2,
              "sparse_linear_backward: grad_out, x, weight must be 2-D");
  TORCH_CHECK(grad_out.size(1) == weight.size(0) && x.size(1) == weight.size(1) &&
                  grad_out.size(0) == x.size(0),
              "sparse_linear_backward: shapes ", grad_out.sizes(), x.sizes(), weight.sizes(),
              " do not fit");
  TORCH_CHECK(k >= 1, "sparse_linear_backward: k must be >= 1, got ", k);
  TORCH_CHECK(selection != kRandom || k >= grad_out.size(1) || random_cols.has_value(),
              "sparse_linear_backward: random selection needs random_cols");
  if (selection == kRandom && k < grad_out.size(1)) {
    // the kernels read and write U, dW and the memory at these columns unchecked
    const Tensor& rc = *random_cols;
    TORCH_CHECK(rc.dim() == 1 && rc.scalar_type() == at::kLong && rc.device().is_cpu(),
                "sparse_linear_backward: random_cols must be a 1-D int64 CPU tensor, got shape ",
                rc.sizes(), ", ", rc.scalar_type(), " on ", rc.device());
    const Tensor rcc = rc.contiguous();
    const int64_t* rp = rcc.data_ptr<int64_t>();
    for (int64_t j = 0; j < rcc.numel(); ++j)
      TORCH_CHECK(rp[j] >= 0 && rp[j] < grad_out.size(1), "sparse_linear_backward: random_cols ",
                  "holds column ", rp[j], ", out of range for ", grad_out.size(1), " output units");
  }
  const bool use_memory = memory.has_value() && alpha > 0;
  if (use_memory) {
    TORCH_CHECK(memory->is_contiguous(), "sparse_linear_backward: memory must be contiguous");
    if (slot) {
      TORCH_CHECK(memory->dim() == 2 && memory->size(0) == grad_out.size(0) &&
                      memory->size(1) == grad_out.size(1),
                  "sparse_linear_backward: slot memory must be (n, out), got ", memory->sizes());
    } else {
      TORCH_CHECK(memory->dim() == 1 && memory->size(0) == grad_out.size(1),
                  "sparse_linear_backward: unit memory must be (out,), got ", memory->sizes());
    }
  }
  double scale_value = scale.has_value() ? scale->item<double>() : 1.0;
  at::ScalarType acc = use_memory ? memory->scalar_type()
                                  : (grad_out.scalar_type() == at::kDouble ? at::kDouble
                                                                          : at::kFloat);
  // a transposed weight (transformers' Conv1D stores W^T: the layer passes weight.t()) stays
  // as it is: the GEMM paths gather their k rows from it, and dW is made in its layout, so
  // that autograd's transpose hands .grad a contiguous gradient; copying it whole cost 6 ms
  // of a 768 x 3072 layer's backward, adding a transposed dW into .grad 10 more
  Tensor xc = x.contiguous();
  Tensor wc = weight.is_contiguous() || weight.t().is_contiguous() ? weight : weight.contiguous();
  const int64_t n = grad_out.size(0), out = grad_out.size(1);
  if (!all_rows && (use_memory || (selection == kPerExample && k < out))) {
    Tensor g = grad_out.contiguous();
    std::vector<int64_t> active;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "msbp_active",
                                    [&] { active = active_rows(g.data_ptr<scalar_t>(), n, out); });
    const int64_t n_active = static_cast<int64_t>(active.size());
    if (n_active < n && n_active > 0 && !slot && selection != kPerExample) {
      // one set of columns and a unit memory: the zero rows can stay in the batch, where they
      // add nothing to the scores, sums, dW or db and get dx = 0, if they take no memory; no
      // copies of the active rows of G and x (MiniLM batches: 0.177 s -> ~0.15 s a backward)
      std::vector<uint8_t> on(n, 0);
      for (int64_t r : active) on[r] = 1;
      return dispatch_backward(g, xc, wc, memory, random_cols, scale_value, k, selection, alpha,
                               slot, need_x, need_w, need_b, compact_dw, skip_nonfinite,
                               csr_ratio, acc, grad_into, on.data(), n_active, u_out);
    }
    if (n_active < n) {
      // zero rows: the backward of the active rows alone (an empty step without memory); G's
      // active rows are read where they are, as x's would be copied (the tagger's per-example
      // gates, ~1,100 of 2,000-wide rows a batch: the copy and a second pass for db cost
      // 2.3 ms of its 10 ms backward); db sums the active rows in the pass, except at k = out
      // (over all rows as torch sums them, as there without zero rows)
      Tensor idx = at::empty({n_active}, grad_out.options().dtype(at::kLong));
      std::copy(active.begin(), active.end(), idx.data_ptr<int64_t>());
      std::optional<Tensor> mem;
      if (use_memory && n_active > 0) mem = slot ? memory->index_select(0, idx) : *memory;
      Out5 res = dispatch_backward(g, xc.index_select(0, idx), wc, mem, random_cols,
                                   scale_value, k, selection, alpha, slot, need_x, need_w,
                                   need_b, compact_dw, skip_nonfinite, csr_ratio, acc, grad_into,
                                   nullptr, -1, nullptr, &idx);
      if (mem.has_value() && slot) memory->index_copy_(0, idx, *mem);
      if (need_x) {
        std::get<0>(res) =
            at::zeros({n, x.size(1)}, x.options()).index_copy_(0, idx, std::get<0>(res));
      }
      return res;
    }
  }
  return dispatch_backward(grad_out, xc, wc, memory, random_cols, scale_value, k, selection,
                           alpha, slot, need_x, need_w, need_b, compact_dw, skip_nonfinite,
                           csr_ratio, acc, grad_into, nullptr, -1, u_out);
}

Out5 sparse_linear_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const std::optional<Tensor>& memory, const std::optional<Tensor>& random_cols,
    const std::optional<Tensor>& scale, int64_t k, int64_t selection, double alpha, bool slot,
    bool need_x, bool need_w, bool need_b, bool compact_dw, bool skip_nonfinite,
    double csr_ratio, bool all_rows) {
  Out5 res = backward_into(grad_out, x, weight, memory, random_cols, scale, k, selection, alpha,
                           slot, need_x, need_w, need_b, compact_dw, skip_nonfinite, csr_ratio,
                           all_rows, nullptr);
  // a dense dW in the weight's layout whatever route made it, as the fake implementation says
  // (inductor checks the strides): for a transposed weight (SparseHFConv1D's W^T) the loops
  // with most rows kept and a skipped non-finite gradient make a contiguous one, a transposing
  // copy here that AccumulateGrad's add into .grad (W^T's layout too) then saves
  Tensor& dW = std::get<1>(res);
  if (need_w && !compact_dw && dW.defined() && dW.dim() == 2 && dW.strides() != weight.strides()) {
    dW = at::empty_strided(weight.sizes(), weight.strides(), dW.options()).copy_(dW);
  }
  return res;
}


// ---------------------------------------------------------------------------------------------
// The eager fast path: the whole autograd function of a sparse linear layer in C++ (about 80 us
// of Python per layer and step less than msbp.ops.sparse_linear.SparseLinearFunction at
// MNIST's sizes). Python (msbp.functional.sparse_linear) takes it only where it is exactly that
// function: CPU, no autocast, no compile, no probe, no gradient scaler, no torch.distributed,
// unified / per-example selection, backend "sparse", in-place gradients allowed.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The weight's AccumulateGrad node (null for a non-leaf, or where it has none), and whether this
// backward pass runs it to add into .grad: not under torch.autograd.grad(..., [weight]), whose
// result is captured, nor under .backward(inputs=...) without the weight.
std::pair<c10::intrusive_ptr<torch::autograd::Node>, bool> accumulator(const Tensor& weight) {
  if (!weight.is_leaf() || !weight.requires_grad()) return {nullptr, false};
  auto acc = torch::autograd::impl::try_get_grad_accumulator(weight);
  if (!acc) return {nullptr, false};
  const auto* info = torch::autograd::get_current_graph_task_exec_info();
  if (info == nullptr || info->empty()) return {acc, true};  // .backward(): every node runs
  auto it = info->find(acc.get());
  return {acc, it != info->end() && it->second.needed_ && !it->second.captures_};
}

// Whether any of a weight's tensor hooks would run: Python leaves its C++ hook in place, with
// an empty dictionary, when the last hook registered through it is removed (`register_hook(f)
// .remove()`, wandb.unwatch), and such a hook does nothing. torch exports no type information
// of that class: it is told by its name (another name: a hook that runs).
template <typename Hooks>
bool tensor_hooks_run(const Hooks& hooks) {
  for (const auto& hook : hooks) {
    auto* h = hook.get();
    if (std::strcmp(typeid(*h).name(), "N5torch8autograd23PyFunctionTensorPreHookE") != 0)
      return true;
    pybind11::gil_scoped_acquire gil;
    if (PyDict_Size(static_cast<torch::autograd::PyFunctionTensorPreHook*>(h)->dict) != 0)
      return true;
  }
  return false;
}

// Where the rows of dW go: 0 a dense dW for autograd; 1 added into .grad here, nothing for
// autograd; 2 handed to autograd as a row-sparse gradient that AccumulateGrad adds into .grad,
// so that hooks on that node see it.
int grad_route(const Tensor& weight) {
  auto [acc, runs] = accumulator(weight);
  if (!acc || !runs) return 0;
  // the weight's own hooks (register_hook, post-accumulate hooks) get a dense gradient, as from
  // the PyTorch glue; hooks on the AccumulateGrad node get the row-sparse one
  if (tensor_hooks_run(acc->tensor_pre_hooks()) || !acc->retains_grad_hooks().empty() ||
      torch::autograd::impl::post_acc_grad_hooks(weight) != nullptr ||
      tensor_hooks_run(torch::autograd::impl::hooks(weight)))
    return 0;
  return acc->pre_hooks().empty() && acc->post_hooks().empty() ? 1 : 2;
}

// Whether this backward pass adds the weight's gradient into .grad; where it has no
// AccumulateGrad node, whoever owns the gradient decides: true.
bool writes_grad(const Tensor& weight) {
  auto [acc, runs] = accumulator(weight);
  return !acc || runs;
}

// Zero rows[0..r) of a contiguous (out, in) buffer; bumps its version like index_fill_.
void clear_rows(Tensor& buf, const int64_t* rows, int64_t r) {
  if (r <= 0) return;
  const int64_t row_bytes = buf.size(1) * buf.element_size();
  auto* base = static_cast<char*>(buf.data_ptr());
  for (int64_t i = 0; i < r; ++i)  // a state's rows (clear_kept_rows_ takes any state)
    TORCH_CHECK(rows[i] >= 0 && rows[i] < buf.size(0), "msbp: a kept buffer's state lists row ",
                rows[i], ", out of range for a buffer of shape ", buf.sizes());
  for (int64_t i = 0; i < r; ++i) std::memset(base + rows[i] * row_bytes, 0, row_bytes);
  buf.unsafeGetTensorImpl()->bump_version();
}

// Where `state` still describes `buf` (its version unchanged since), zero the rows it lists as
// written and record the buffer clean: true; false (nothing done) where it does not.
bool clear_listed_rows(Tensor& buf, const Tensor& state) {
  int64_t* st = state.data_ptr<int64_t>();
  if (st[0] < 0 || st[0] + 2 > state.numel() || buf._version() != st[1]) return false;
  if (buf.is_contiguous()) clear_rows(buf, st + 2, st[0]);
  else if (st[0] > 0) buf.index_fill_(0, state.narrow(0, 2, st[0]), 0);
  st[0] = 0;
  st[1] = buf._version();
  return true;
}

// Whether Python code holds `t` beyond msbp's own reference (the tuple in the weight's
// __dict__, msbp.functional.kept_grad_buffer) and `arg_refs` more the caller knows of: an old
// .grad the user kept after the forward (`loss = model(x); old = p.grad; opt.zero_grad();
// loss.backward()`) must not be cleared and written into. The expected count is measured once on
// a probe held the same way, as torch versions differ in the reference a C++ holder adds.
bool held_in_python(const Tensor& t, int64_t arg_refs) {
  pybind11::gil_scoped_acquire gil;
  static const Py_ssize_t base = [] {
    Tensor probe = at::empty({0});  // like `kept`: one C++ holder besides its Python object
    pybind11::object own = pybind11::cast(probe), asked = pybind11::cast(probe);
    return Py_REFCNT(asked.ptr());
  }();
  pybind11::object asked = pybind11::cast(t);
  return Py_REFCNT(asked.ptr()) > base + arg_refs;
}

// Whether `kept` is still the buffer the weight's record holds (its __dict__ entry, see
// msbp.functional.kept_grad_buffer), whose reference held_in_python takes for msbp's own. A
// forward that found the buffer held (an old .grad the caller kept) recorded a new one; a node
// that captured the old one at an earlier forward holds it only weakly, so where it still lives,
// what holds it is not msbp: `loss = model(x); old = p.grad; opt.zero_grad(); model(x2);
// loss.backward()` had put `old` back as .grad and added into it.
bool is_recorded_kept(const Tensor& weight, const Tensor& kept) {
  pybind11::gil_scoped_acquire gil;
  pybind11::object w = pybind11::cast(weight);
  auto dict = pybind11::reinterpret_steal<pybind11::object>(
      PyObject_GenericGetDict(w.ptr(), nullptr));
  if (!dict) throw pybind11::error_already_set();
  PyObject* entry = PyDict_GetItemString(dict.ptr(), "_msbp_kept_grad_buffer");  // borrowed
  if (entry == nullptr || !PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 1) return false;
  pybind11::object mine = pybind11::cast(kept);
  return PyTuple_GET_ITEM(entry, 0) == mine.ptr();
}

// The buffer the rows of dW are added into for a route other than 0: weight.grad, or, where
// that is None, `kept` put back as .grad with the rows written into it last time cleared (all of
// it if anything changed it since; fresh memory if another tensor shares its storage; a new
// buffer if Python code holds it: see held_in_python, with `arg_refs`, and is_recorded_kept;
// state: see SparseLinearFn). Undefined where neither serves
// (a .grad of another layout, shape, dtype or strides; no buffer kept): then dW goes to autograd.
Tensor grad_buffer(const Tensor& weight, const Tensor& kept, const Tensor& state,
                   int64_t arg_refs) {
  Tensor grad = weight.grad();
  if (grad.defined()) {
    if (grad.layout() != at::kStrided || grad.sizes() != weight.sizes() ||
        grad.scalar_type() != weight.scalar_type() || !grad.is_contiguous())
      return Tensor();
    return grad;
  }
  if (kept.sizes() != weight.sizes()) return Tensor();
  Tensor w = weight;
  if (held_in_python(kept, arg_refs) || !is_recorded_kept(weight, kept)) {
    // theirs stays as it is; the state keeps describing it, for when they let it go
    w.mutable_grad() = at::zeros(weight.sizes(), weight.options());
    return w.grad();
  }
  Tensor buf = kept;
  int64_t* st = state.data_ptr<int64_t>();
  if (buf.storage().use_count() > 1) {
    // another tensor shares its memory (a .detach(), .data or NumPy view of an old .grad that
    // the caller kept): the buffer takes fresh memory, theirs stays as it was
    buf.set_(at::zeros(buf.sizes(), buf.options()));
  } else if (!clear_listed_rows(buf, state)) {
    buf.zero_();
  }
  st[0] = 0;  // clean: no row written since, at this version
  st[1] = buf._version();
  w.mutable_grad() = buf;
  return buf;
}

// After rows[0..r) (all rows: dense) went into `grad` by `route`: if that is the kept buffer,
// the state lists them for the next grad_buffer to clear, with the version the buffer will have
// once autograd added them. They are added to the rows listed only where the buffer is as the
// state left it (clean from grad_buffer, or its rows' last add done or still pending in
// autograd); where anything else may have written into it (a dense gradient, more rows than it
// has, an in-place change), all of it is to be cleared, and stays so until grad_buffer clears it.
// The state is the weight's, shared by every buffer it had: rows that went into a .grad other
// than this call's buffer (another call of the layer put its buffer back first) may be in the
// buffer the state now describes, unlisted, so all of it is to be cleared. So with route 2:
// autograd sums every gradient of the weight before the node's one add, and the version cannot
// tell a dense part (weight tying, a penalty on the weight in the loss) added with the rows (the
// PyTorch path checks what the node receives; hooks on the node are rare: all of it cleared).
void remember_rows(const Tensor& kept, const Tensor& state, const Tensor& grad, int route,
                   const int64_t* rows, int64_t r, bool dense, int64_t version_before) {
  if (route == 0) return;
  int64_t* st = state.data_ptr<int64_t>();
  if (!grad.is_same(kept)) {
    if (kept.numel() > 0) st[0] = -1;
    return;
  }
  const int64_t out = kept.size(0);
  const int64_t expect = kept._version() + (route == 2 || dense ? 1 : 0);
  const bool as_left = st[0] >= 0 && (st[1] == version_before || st[1] == version_before + 1);
  if (dense || route == 2 || !as_left || st[0] + r > out) {
    st[0] = -1;
  } else {
    std::memcpy(st + 2 + st[0], rows, r * sizeof(int64_t));
    st[0] += r;
  }
  st[1] = expect;
}

// Whether `mask` was last marked in another backward pass than this one (or never), which this
// call now records. One entry per row mask ever marked (one per tracked weight); a dead mask's
// entry met again by a new mask at its address can only skip clearing a mask that is clean.
std::mutex mark_pass_mu;
std::unordered_map<const void*, int>& mark_pass() {
  static std::unordered_map<const void*, int> last_pass;
  return last_pass;
}

bool marked_in_other_pass(const Tensor& mask) {
  const int pass = torch::autograd::get_current_graph_task_id();
  std::lock_guard<std::mutex> lock(mark_pass_mu);
  auto [it, added] = mark_pass().try_emplace(mask.unsafeGetTensorImpl(), pass);
  if (added) return true;
  const bool other = it->second != pass;
  it->second = pass;
  return other;
}

// For a backward that wrote none of the weight's rows (an empty batch; per-example top-k of an
// all-zero output gradient), which marks nothing in the mask: an empty entry in the Parameter's
// row log (msbp.ops.touched_rows), as the PyTorch path logs there, so that LazyRowAdam knows that
// the layer wrote this gradient and steps no row of it. With no trace it took the gradient for
// one no sparse layer wrote and stepped it whole where it had changed (a penalty on the weight
// in the loss, an empty batch's dense zero added to the gradient left from the last step), where
// the PyTorch path steps nothing. Rare: the call into Python costs nothing that counts.
void log_no_rows(const Tensor& weight) {
  pybind11::gil_scoped_acquire gil;
  pybind11::module_::import("msbp.ops.touched_rows")
      .attr("log_touched_rows")(weight, at::empty({0}, weight.options().dtype(at::kLong)));
}

// For LazyRowAdam: rows[0..r) of the block [off, off + out) of `weight` (all of the block where
// dense) marked in its row mask as written by this backward pass. A new gradient (`discarded`:
// .grad was None) first drops the marks of other passes, which were rows of the one discarded,
// but not this pass's (with route 0 .grad stays None until autograd's add: another call of the
// weight may have marked first); no row written is logged as such (log_no_rows).
void mark_written_rows(Tensor& mask, const Tensor& weight, bool discarded, int64_t off,
                       int64_t out, const int64_t* rows, int64_t r, bool dense) {
  if (marked_in_other_pass(mask) && discarded) mask.zero_();
  if (dense) {
    mask.narrow(0, off, out).fill_(1);
    return;
  }
  uint8_t* mp = mask.data_ptr<uint8_t>() + off;
  for (int64_t i = 0; i < r; ++i) mp[rows[i]] = 1;
  if (r == 0) log_no_rows(weight);
}

// The kept buffer as a node holds it between forward and backward: weakly. A strong reference
// counts as a Python one (PyTorch keeps a tensor's Python object alive while C++ holds it), so
// a weight with several calls in one forward (attention's q, k and v blocks of in_proj_weight,
// weight sharing) saw its buffer held by the earlier calls' nodes at every later call and made
// a new zero buffer for each (3 x 7 MB a step at E = 768). (A strong hold also had to end at
// the backward: the graph outlives it while its output lives.)
struct WeakKept : torch::CustomClassHolder {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  explicit WeakKept(const Tensor& t) : impl(t.getIntrusivePtr()) {}
};

c10::IValue weak_kept(const Tensor& kept) {
  return c10::IValue::make_capsule(c10::make_intrusive<WeakKept>(kept));
}

// The buffer behind weak_kept's value, or an empty tensor of `options` where it is gone.
Tensor lock_kept(const c10::IValue& v, const at::TensorOptions& options) {
  auto impl = c10::static_intrusive_pointer_cast<WeakKept>(v.toCapsule())->impl.lock();
  return impl ? Tensor(std::move(impl)) : at::empty({0}, options);
}

// A shape as Python prints a tuple, "(3, 4)", "(9,)": the message of the PyTorch path, which
// IntArrayRef's own "[3, 4]" made differ by backend
std::string python_shape(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

[[noreturn]] void raise_floating_point_error(const std::string& msg) {
  {
    pybind11::gil_scoped_acquire gil;
    PyErr_SetString(PyExc_FloatingPointError, msg.c_str());
  }
  python_error err;
  err.persist();
  throw err;
}

// The forward of both Functions below, once they saved x and the weight as saved variables 0
// and 1: saves what run_backward reads, returns x W^T + b (bias: empty for none).
Tensor layer_forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                     const Tensor& bias, const Tensor& memory, const Tensor& kept,
                     const Tensor& state, const Tensor& mask, int64_t k, int64_t selection,
                     double alpha, bool slot, bool skip_nonfinite, double csr_ratio,
                     std::string name, bool all_rows, const c10::IValue& owner,
                     int64_t row_offset) {
  const bool has_bias = bias.numel() > 0;
  // the Parameter itself, for its .grad: a saved variable may come back as another tensor
  // (activation checkpointing's recomputation, saved-tensor hooks); or the Parameter whose
  // rows [row_offset, row_offset + out) the weight is (attention's in_proj slices)
  ctx->saved_data["param"] = owner.isTensor() ? owner.toTensor() : weight;
  ctx->saved_data["row_offset"] = owner.isTensor() ? row_offset : int64_t(-1);
  ctx->saved_data["memory"] = memory;
  ctx->saved_data["kept"] = weak_kept(kept);
  ctx->saved_data["state"] = state;
  ctx->saved_data["mask"] = mask;
  ctx->saved_data["k"] = k;
  ctx->saved_data["selection"] = selection;
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["slot"] = slot;
  ctx->saved_data["skip"] = skip_nonfinite;
  ctx->saved_data["csr_ratio"] = csr_ratio;
  ctx->saved_data["name"] = name;
  ctx->saved_data["all_rows"] = all_rows;
  ctx->saved_data["has_memory"] = memory.numel() > 0;
  ctx->saved_data["has_bias"] = has_bias;
  Tensor y = at::linear(x, weight, has_bias ? std::optional<Tensor>(bias) : std::nullopt);
  // at::linear of a (*, in) input with a bias returns a view of its 2-d result, and a Function's
  // output that is a view of a tensor made inside it cannot be modified in place
  // (`Linear -> ReLU(inplace=True)` raised); detach is a free alias that is no view
  return y.is_view() ? y.detach() : y;
}

// The backward of the layer y = x W^T + b (x: saved variable 0, W: 1; W at input w_at, b at
// w_at + 1): {dx, dW, db}, dW's rows added into .grad or the kept buffer where it can. With
// u_out, dx may come back factored (see backward_into), its rows of W in *rows_out.
variable_list run_backward(AutogradContext* ctx, const variable_list& grad_outputs, bool need_x,
                           int w_at, Tensor* u_out = nullptr, Tensor* rows_out = nullptr) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "msbp: the sparse backward is not differentiable (create_graph=True): its memory "
              "update is not a function autograd can differentiate; for higher-order gradients "
              "run the layers dense (inside msbp.dense_backward(model), or after "
              "msbp.densify(model))");
  auto saved = ctx->get_saved_variables();
  Tensor x = saved[0], w = saved[1];
  // the Parameter whose .grad the rows go into: the weight, or the one whose rows
  // [off, off + out) it is
  Tensor weight = ctx->saved_data["param"].toTensor();
  const bool block = ctx->saved_data["row_offset"].toInt() >= 0;
  const int64_t off = block ? ctx->saved_data["row_offset"].toInt() : 0;
  Tensor memory = ctx->saved_data["memory"].toTensor();
  Tensor kept = lock_kept(ctx->saved_data["kept"], w.options());
  Tensor state = ctx->saved_data["state"].toTensor();
  Tensor mask = ctx->saved_data["mask"].toTensor();
  const int64_t out = w.size(0), d_in = w.size(1);
  const bool need_w = ctx->needs_input_grad(w_at), need_b =
      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(w_at + 1);
  // n from the leading dimensions: reshape({-1, 0}) of a layer with no input features is
  // ambiguous (and raised there in backward)
  const int64_t n = c10::multiply_integers(grad_outputs[0].sizes().slice(
      0, std::max<int64_t>(grad_outputs[0].dim() - 1, 0)));
  Tensor g = grad_outputs[0].reshape({n, out});
  Tensor x2 = x.reshape({n, d_in});
  auto x_shape = x.sizes().vec();
  variable_list result(3);
  // .grad None: this backward starts a new gradient, the rows logged into the one discarded go
  const bool discarded = need_w && weight.is_leaf() && !weight.grad().defined();
  if (n == 0) {
    if (need_x) result[0] = at::zeros_like(x);
    if (need_w) {
      result[1] = at::zeros_like(w);  // dense: autograd accumulates it
      if (mask.numel() > 0 && writes_grad(weight))  // no row written
        mark_written_rows(mask, weight, discarded, off, out, nullptr, 0, false);
    }
    if (need_b) result[2] = at::zeros({out}, w.options());
    return result;
  }
  const int64_t k = std::min(ctx->saved_data["k"].toInt(), out);
  const bool has_memory = ctx->saved_data["has_memory"].toBool();
  // another call of the layer changed the batch shape since: the slot memory's column sums
  // spread over the new rows; put back as it was if no sparse step takes place (non-finite)
  Tensor mem_before;
  if (has_memory && ctx->saved_data["slot"].toBool() && memory.size(0) != n) {
    at::NoGradGuard no_grad;
    mem_before = memory.clone();
    Tensor total = memory.sum(0).div_(static_cast<double>(n));
    memory.resize_({n, out});
    memory.copy_(total.expand({n, out}));
  }
  auto restore_memory = [&] {
    if (!mem_before.defined()) return;
    at::NoGradGuard no_grad;
    memory.resize_(mem_before.sizes());
    memory.copy_(mem_before);
  };
  int route = need_w ? grad_route(weight) : 0;
  if (block && route == 2) route = 0;  // a row-sparse dW of the block cannot pass its slice
  Tensor grad, grad_rows;  // grad_rows: the block of .grad that is this layer's dW
  if (route != 0) {
    grad = grad_buffer(weight, kept, state, 0);
    if (!grad.defined()) route = 0;  // a dense dW, as autograd would make
    else grad_rows = block ? grad.narrow(0, off, out) : grad;
  }
  const int64_t version_before = kept.numel() > 0 ? kept._version() : -1;
  Out5 outs;
  try {
    outs = backward_into(
        g, x2, w, has_memory ? std::optional<Tensor>(memory) : std::nullopt,
        std::nullopt, std::nullopt, k, ctx->saved_data["selection"].toInt(),
        ctx->saved_data["alpha"].toDouble(), ctx->saved_data["slot"].toBool(), need_x, need_w,
        need_b, route != 0, ctx->saved_data["skip"].toBool(),
        ctx->saved_data["csr_ratio"].toDouble(), ctx->saved_data["all_rows"].toBool(),
        route == 1 && grad.is_contiguous() ? &grad_rows : nullptr, u_out);
  } catch (const c10::Error& e) {
    restore_memory();
    if (route != 0 && discarded) {
      // the buffer put back as .grad before the op: a failed backward leaves .grad None, as
      // autograd (and the PyTorch path) would; the kept buffer stays recorded for the next one
      Tensor owner = weight;
      owner.mutable_grad() = Tensor();
    }
    const std::string what = e.what_without_backtrace();
    if (what.find("msbp-nonfinite") == std::string::npos) throw;
    const std::string name = ctx->saved_data["name"].toStringRef();
    std::ostringstream msg;
    msg << "non-finite output gradient" << (name.empty() ? "" : " in layer '" + name + "'")
        << " (shape " << python_shape(grad_outputs[0].sizes())
        << "); the memory was left unchanged. Use "
        << "on_nonfinite='skip' to propagate it densely, or msbp.amp.GradScaler under mixed "
        << "precision.";
    raise_floating_point_error(msg.str());
  }
  Tensor dx = std::get<0>(outs), dW = std::get<1>(outs), db = std::get<2>(outs);
  Tensor rows = std::get<3>(outs);
  if (rows_out != nullptr) *rows_out = rows;
  const bool skipped = std::get<4>(outs).item<int64_t>() != 0;
  if (skipped) restore_memory();
  const bool dense = k >= out || skipped;
  if (need_w) {
    if (mask.numel() > 0 && (route != 0 || writes_grad(weight)))
      mark_written_rows(mask, weight, discarded, off, out,
                        dense ? nullptr : rows.data_ptr<int64_t>(), dense ? 0 : rows.size(0),
                        dense);
    if (route == 0 || dense) {
      result[1] = dW;  // dense (out, in): autograd accumulates it
    } else if (route == 1) {
      if (dW.defined()) grad_rows.index_add_(0, rows, dW);  // else the kernel added them
      result[1] = Tensor();
    } else {
      result[1] = at::_sparse_coo_tensor_unsafe(rows.unsqueeze(0), dW, {out, d_in},
                                                dW.options().layout(at::kSparse))
                      ._coalesced_(true);
    }
    std::vector<int64_t> param_rows;  // the rows as the Parameter's
    const int64_t* rp = rows.data_ptr<int64_t>();
    if (off > 0 && !dense) {
      param_rows.resize(rows.size(0));
      for (int64_t i = 0; i < rows.size(0); ++i) param_rows[i] = rp[i] + off;
      rp = param_rows.data();
    }
    remember_rows(kept, state, grad, route, rp, rows.size(0), dense, version_before);
  }
  if (need_x && !(u_out != nullptr && u_out->defined()))
    result[0] = dx.reshape(x_shape).to(x.scalar_type());
  if (need_b) result[2] = db.to(weight.scalar_type());
  return result;
}

}  // namespace

// Outside the anonymous namespace, as SparseEmbeddingLinearFn: a profiler or an autograd graph
// names the node torch::autograd::CppNode<msbp::SparseLinearFn>, not "msbp::(anonymous ..."
struct SparseLinearFn : public torch::autograd::Function<SparseLinearFn> {
  // kept: the gradient buffer this layer hands over when .grad is None; state (out + 2,) int64:
  // [rows written into kept last time (-1: unknown), kept's version after that, the rows...];
  // mask (out,) uint8 or undefined: touched rows for LazyRowAdam.
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor bias,
                        Tensor memory, Tensor kept, Tensor state, Tensor mask, int64_t k,
                        int64_t selection, double alpha, bool slot, bool skip_nonfinite,
                        double csr_ratio, std::string name, bool all_rows, c10::IValue owner,
                        int64_t row_offset) {
    ctx->save_for_backward({x, weight});
    return layer_forward(ctx, x, weight, bias, memory, kept, state, mask, k, selection, alpha,
                         slot, skip_nonfinite, csr_ratio, std::move(name), all_rows, owner,
                         row_offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list r = run_backward(ctx, grad_outputs, ctx->needs_input_grad(0), 1);
    r.resize(17);
    return r;
  }
};

namespace {

// Function::apply wants defined tensors: an empty one stands for "none" (made only then: at
// MNIST's sizes the forward's whole overhead is a few microseconds)
Tensor or_empty(const std::optional<Tensor>& t, const at::TensorOptions& options) {
  return t.has_value() && t->defined() ? *t : at::empty({0}, options);
}

// The embedding table's gradient through dx = U_S W_S without forming dx whole: for each row i
// of ids (n, nf) and feature f, dT[ids[i, f]] += dx[i, f d : (f + 1) d], dx made a block of
// rows at a time in a buffer that stays in cache (rows_product: W's kept rows, column block by
// column block) and added from there. At the parser's 10,000 x 48 x 50 -> 500 this replaces
// writing and re-reading dx (96 MB, most of it fresh pages) and the embedding backward. Threads
// take column blocks of dx, then ranges of table rows, so each row of dT sums in the same order
// whatever the thread count.
template <typename T>
void embedding_grad_factored(const int64_t* ids, int64_t n, int64_t nf, const T* u, int64_t kk,
                             const int64_t* w_rows, const T* w, int64_t out, int64_t d, T* dt,
                             int64_t rows) {
  const int64_t width = nf * d;
  const int64_t block =
      std::clamp<int64_t>((1 << 20) / (std::max<int64_t>(width, 1) * sizeof(T)), 1, n);
  std::vector<T> buf(block * width);
  const std::vector<int64_t> row_cols = same_cols(w_rows, kk, block);
  const bool split = n * nf * d >= kMinTaskWork;
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t m = std::min(block, n - i0);
    rows_product<T>(row_cols.data(), u + i0 * kk, w, buf.data(), m, kk, out, width);
    at::parallel_for(0, rows, split ? 1 : rows, [&](int64_t t0, int64_t t1) {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t* id = ids + (i0 + i) * nf;
        const T* dx_i = buf.data() + i * width;
        for (int64_t f = 0; f < nf; ++f)
          if (id[f] >= t0 && id[f] < t1) axpy1<T>(dt + id[f] * d, dx_i + f * d, T(1), d);
      }
    });
  }
}

}  // namespace

// y = flatten(T[ids]) W^T + b: a sparse linear layer whose input is nf rows of an embedding
// table side by side (Chen & Manning's parser). Its backward is the layer's, except that the
// table's gradient comes from dx's factors where the selection gives them (unified top-k).
struct SparseEmbeddingLinearFn : public torch::autograd::Function<SparseEmbeddingLinearFn> {
  static Tensor forward(AutogradContext* ctx, Tensor ids, Tensor table, Tensor weight,
                        Tensor bias, Tensor memory, Tensor kept, Tensor state, Tensor mask,
                        int64_t k, int64_t selection, double alpha, bool slot,
                        bool skip_nonfinite, double csr_ratio, std::string name, bool all_rows,
                        c10::IValue owner, int64_t row_offset) {
    auto shape = ids.sizes().vec();
    shape.back() *= table.size(1);
    Tensor x = at::embedding(table, ids).view(shape);  // (*, nf d)
    ctx->save_for_backward({x, weight, ids});
    ctx->saved_data["table_rows"] = table.size(0);
    return layer_forward(ctx, x, weight, bias, memory, kept, state, mask, k, selection, alpha,
                         slot, skip_nonfinite, csr_ratio, std::move(name), all_rows, owner,
                         row_offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool need_t = ctx->needs_input_grad(1);
    Tensor u_s, rows;
    variable_list r = run_backward(ctx, grad_outputs, need_t, 2, need_t ? &u_s : nullptr, &rows);
    variable_list result(18);
    result[2] = r[1];
    result[3] = r[2];
    if (!need_t) return result;
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    Tensor ids = saved[2].reshape({-1, saved[2].size(-1)}).contiguous();
    const int64_t nf = ids.size(1), d = x.size(-1) / nf, n = ids.size(0);
    Tensor dt = at::zeros({ctx->saved_data["table_rows"].toInt(), d}, x.options());
    if (u_s.defined()) {
      Tensor wc = saved[1].contiguous();
      Tensor uc = u_s.contiguous();
      AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "msbp_embedding_grad", [&] {
        embedding_grad_factored<scalar_t>(ids.data_ptr<int64_t>(), n, nf,
                                          uc.data_ptr<scalar_t>(), uc.size(1),
                                          rows.data_ptr<int64_t>(), wc.data_ptr<scalar_t>(),
                                          wc.size(0), d, dt.data_ptr<scalar_t>(), dt.size(0));
      });
    } else {
      dt.index_add_(0, ids.view(-1), r[0].reshape({-1, d}).to(dt.scalar_type()));
    }
    result[1] = dt;
    return result;
  }
};

bool kept_held_in_python(const Tensor& buf) { return held_in_python(buf, 0); }

bool mask_marked_in_this_pass(const Tensor& mask) {
  const int pass = torch::autograd::get_current_graph_task_id();
  if (pass < 0) return false;
  std::lock_guard<std::mutex> lock(mark_pass_mu);
  auto it = mark_pass().find(mask.unsafeGetTensorImpl());
  return it != mark_pass().end() && it->second == pass;
}

// For LazyRowAdam.zero_grad(set_to_none=True), before it sets the weights' .grad to None: the
// rows each kept buffer's state lists as written (bufs[i] is the buffer, states[i] its state,
// see grad_buffer) are cleared now, and the state says clean, so that the next backward puts
// the buffer back as it is: the zeroing stays in zero_grad, where the optimizer did it before,
// not in the timed backward. A buffer whose state does not list its rows is left to that
// backward (it clears all of it). Returns how many buffers were cleared.
int64_t clear_kept_rows_(at::TensorList bufs, at::TensorList states) {
  TORCH_CHECK(bufs.size() == states.size(), "clear_kept_rows_: ", bufs.size(), " buffers, ",
              states.size(), " states");
  int64_t cleared = 0;
  for (size_t i = 0; i < bufs.size(); ++i) {
    Tensor buf = bufs[i];
    const Tensor& state = states[i];
    TORCH_CHECK(state.scalar_type() == at::kLong && state.is_contiguous() && state.dim() == 1 &&
                    state.numel() >= 2,
                "clear_kept_rows_: a state must be a contiguous int64 vector");
    const int64_t* st = state.data_ptr<int64_t>();
    // (another tensor sharing its memory, a .detach(), .data or NumPy view of the old .grad
    // that the caller kept, stays as it is: the backward gives the weight fresh memory)
    if (!buf.is_contiguous() || buf.dim() != 2 || st[0] + 2 > state.numel() ||
        buf.storage().use_count() > 1)
      continue;
    if (clear_listed_rows(buf, state)) ++cleared;
  }
  return cleared;
}

// The kept buffer's state (rows + 2,) int64 and the row mask (rows,) uint8 of a Parameter of
// `rows` rows, as msbp.functional.kept_grad_buffer and msbp.ops.touched_rows.rows_mask make
// them: the C++ path reads and writes both through raw pointers, at row indices.
void check_state_mask(const Tensor& state, const std::optional<Tensor>& mask, int64_t rows,
                      const char* op) {
  TORCH_CHECK(state.scalar_type() == at::kLong && state.dim() == 1 && state.is_contiguous() &&
                  state.device().is_cpu() && state.size(0) == rows + 2,
              op, ": state must be a contiguous int64 CPU tensor of shape (", rows + 2,
              ",), got shape ", state.sizes(), ", ", state.scalar_type());
  if (!mask.has_value() || !mask->defined() || mask->numel() == 0) return;
  TORCH_CHECK(mask->scalar_type() == at::kByte && mask->dim() == 1 && mask->is_contiguous() &&
                  mask->device().is_cpu() && mask->size(0) == rows,
              op, ": mask must be a contiguous uint8 CPU tensor of shape (", rows,
              ",), got shape ", mask->sizes(), ", ", mask->scalar_type());
}

// msbp::place_grad_rows_, for a Python autograd function (the LSTM recurrence's W_hh): the
// ascending distinct rows `rows` (r,) of dW, values (r, in), added straight into the weight's
// gradient buffer (see grad_buffer; kept / state as for SparseLinearFn) where nothing needs to
// see them as a gradient (grad_route 1), instead of a row-sparse tensor that AccumulateGrad adds
// (at the tagger's size that path cost ~190 us a step, the rows themselves ~20). Returns the
// route: 1 when added (the caller hands autograd no dW), else 0 or 2, nothing done. Eager only.
int64_t place_grad_rows_(const Tensor& weight, const Tensor& kept, const Tensor& state,
                         const Tensor& rows, const Tensor& values) {
  const int route = grad_route(weight);
  if (route != 1) return route;
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && values.dim() == 2 &&
                  values.size(0) == rows.size(0) && values.size(1) == weight.size(1) &&
                  values.scalar_type() == weight.scalar_type(),
              "place_grad_rows_: rows ", rows.sizes(), " and values ", values.sizes(),
              " do not fit the weight ", weight.sizes());
  check_state_mask(state, std::nullopt, weight.size(0), "place_grad_rows_");
  Tensor v = values.contiguous(), rw = rows.contiguous();
  const int64_t r = rw.size(0), d = weight.size(1);
  const int64_t* rp = rw.data_ptr<int64_t>();
  for (int64_t q = 0; q < r; ++q)  // written through raw pointers below: checked first
    TORCH_CHECK(rp[q] >= 0 && rp[q] < weight.size(0), "place_grad_rows_: row ", rp[q],
                " out of range for a weight of shape ", weight.sizes());
  Tensor grad = grad_buffer(weight, kept, state, 1);  // + the call's argument
  if (!grad.defined()) return 0;
  const int64_t version_before = kept.numel() > 0 ? kept._version() : -1;
  if (!grad.is_contiguous()) {
    // a buffer put back with the strides of a non-contiguous weight (zeros_like of a
    // transposed one): the loop below would write its rows as if it were row-major
    grad.index_add_(0, rw, v);
  } else {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "msbp_place_grad_rows", [&] {
      scalar_t* gp = grad.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      for (int64_t q = 0; q < r; ++q) {
        scalar_t* dst = gp + rp[q] * d;
        const scalar_t* src = vp + q * d;
        for (int64_t i = 0; i < d; ++i) dst[i] += src[i];
      }
    });
    grad.unsafeGetTensorImpl()->bump_version();  // as index_add_ would
  }
  remember_rows(kept, state, grad, 1, rp, r, false, version_before);
  return 1;
}

// The Parameter that gets the weight's rows (none: the weight itself) and where they start in
// it, for the Functions above: `owner` must be a contiguous (rows, in) tensor of which the
// weight is the contiguous block of rows [offset, offset + out) (msbp.ops.touched_rows.
// row_block_of finds it); passed as an IValue, so that it is no input of the autograd node.
std::pair<c10::IValue, int64_t> owner_rows(const Tensor& weight,
                                           const std::optional<Tensor>& owner) {
  if (!owner.has_value() || !owner->defined()) return {c10::IValue(), 0};
  const Tensor& base = *owner;
  const int64_t delta = weight.storage_offset() - base.storage_offset();
  TORCH_CHECK(base.dim() == 2 && base.is_contiguous() && weight.is_contiguous() &&
                  base.size(1) == weight.size(1) && weight.is_alias_of(base) && delta >= 0 &&
                  delta % std::max<int64_t>(base.stride(0), 1) == 0 &&
                  delta / std::max<int64_t>(base.stride(0), 1) + weight.size(0) <= base.size(0),
              "sparse_linear_fast: the weight ", weight.sizes(),
              " is no block of rows of its owner ", base.sizes());
  return {c10::IValue(base), delta / std::max<int64_t>(base.stride(0), 1)};
}

// The eager entry points, also bound directly to Python (bindings.cpp).
Tensor sparse_embedding_linear_fast(
    const Tensor& ids, const Tensor& table, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& memory, const Tensor& kept, const Tensor& state,
    const std::optional<Tensor>& mask, int64_t k, int64_t selection, double alpha, bool slot,
    bool skip_nonfinite, double csr_ratio, std::string name, bool all_rows,
    const std::optional<Tensor>& owner) {
  TORCH_CHECK(ids.dim() >= 1 && ids.scalar_type() == at::kLong && table.dim() == 2,
              "sparse_embedding_linear: ids must be int64 (*, features), table (rows, dim)");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out, in), got shape ",
                    weight.sizes());
  auto [param, offset] = owner_rows(weight, owner);
  check_state_mask(state, mask, param.isTensor() ? param.toTensor().size(0) : weight.size(0),
                   "sparse_embedding_linear_fast");
  return SparseEmbeddingLinearFn::apply(
      ids, table, weight, or_empty(bias, weight.options()), or_empty(memory, weight.options()),
      kept, state, or_empty(mask, weight.options().dtype(at::kByte)), k, selection, alpha, slot,
      skip_nonfinite, csr_ratio, std::move(name), all_rows, param, offset);
}

Tensor sparse_linear_fast(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& memory, const Tensor& kept,
                          const Tensor& state, const std::optional<Tensor>& mask, int64_t k,
                          int64_t selection, double alpha, bool slot, bool skip_nonfinite,
                          double csr_ratio, std::string name, bool all_rows,
                          const std::optional<Tensor>& owner) {
  // msbp.functional checks these before its first call; a layer's repeated call does not (its
  // objects are the same), but a tensor reshaped in place (`.data = ...`) is the same object:
  // the ValueError that msbp.functional.check_bias / check_memory would raise, at no cost
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out, in), got shape ",
                    weight.sizes());
  const int64_t out = weight.size(0);
  TORCH_CHECK_VALUE(!bias.has_value() || bias->sizes() == at::IntArrayRef({out}), "bias of shape ",
                    bias->sizes(), " does not match weight of shape ", weight.sizes(),
                    ": expected (", out, ",)");
  TORCH_CHECK_VALUE(
      !memory.has_value() || (slot ? memory->dim() == 2 && memory->size(1) == out
                                   : memory->sizes() == at::IntArrayRef({out})),
      "memory of shape ", memory->sizes(), " does not fit memory_layout='",
      slot ? "slot" : "unit", "' with out_features=", out, ": expected (",
      slot ? "rows, " : "", out, slot ? ")" : ",)");
  auto [param, offset] = owner_rows(weight, owner);
  check_state_mask(state, mask, param.isTensor() ? param.toTensor().size(0) : out,
                   "sparse_linear_fast");
  return SparseLinearFn::apply(x, weight, or_empty(bias, x.options()),
                               or_empty(memory, x.options()), kept, state,
                               or_empty(mask, x.options().dtype(at::kByte)), k, selection, alpha,
                               slot, skip_nonfinite, csr_ratio, std::move(name), all_rows,
                               param, offset);
}


TORCH_LIBRARY_FRAGMENT(msbp, m) {
  // eager only (no fake implementation): mutates memory, kept, state and mask in its backward
  m.def(
      "sparse_linear_fast(Tensor x, Tensor weight, Tensor? bias, Tensor? memory, Tensor kept, "
      "Tensor state, Tensor? mask, int k, int selection, float alpha, bool slot, "
      "bool skip_nonfinite, float csr_ratio, str name, bool all_rows=False, "
      "Tensor? owner=None) -> Tensor");
  m.def(
      "sparse_embedding_linear_fast(Tensor ids, Tensor table, Tensor weight, Tensor? bias, "
      "Tensor? memory, Tensor kept, Tensor state, Tensor? mask, int k, int selection, "
      "float alpha, bool slot, bool skip_nonfinite, float csr_ratio, str name, "
      "bool all_rows=False, Tensor? owner=None) -> Tensor");
  m.def(
      "sparse_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor(a!)? memory, "
      "Tensor? random_cols, Tensor? scale, int k, int selection, float alpha, bool slot, "
      "bool need_x, bool need_w, bool need_b, bool compact_dw, bool skip_nonfinite, "
      "float csr_ratio, bool all_rows=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // eager only: adds into weight.grad (or puts `kept` back as it), updates kept and state
  m.def(
      "place_grad_rows_(Tensor weight, Tensor(a!) kept, Tensor(b!) state, Tensor rows, "
      "Tensor values) -> int");
}

TORCH_LIBRARY_IMPL(msbp, CPU, m) {
  m.impl("sparse_linear_backward", &sparse_linear_backward);
  m.impl("place_grad_rows_", &place_grad_rows_);
}

TORCH_LIBRARY_IMPL(msbp, Autograd, m) {
  m.impl("sparse_linear_fast", &sparse_linear_fast);
  m.impl("sparse_embedding_linear_fast", &sparse_embedding_linear_fast);
}

}  // namespace msbp
