// msbp::lstm_recurrence_backward: the backward of one LSTM layer and direction, all T steps, with
// the MSBP backward on the recurrent transform, as one op (CPU).
//
// Per step, from the last to the first (t' is the step before t in the recurrence):
//
//   dh  = d_out[t] + (U_S W_hh of step t+1, or d_hn)
//   dc  = (dc f of step t+1, or d_cn) + dh o (1 - tanh(c_t)^2)
//   G_t = [dc g i(1-i), dc c_t' f(1-f), dc i (1-g^2), dh tanh(c_t) o(1-o)]   (B, 4H), returned
//   U   = G_t + M;  S = select_k(U);  M = alpha (U - U_S)
//   dW_hh += U_S^T h_t';  db += colsum(G_t)
//
// One pass over the gates per step does the chain rule, U, the column scores and sums, db and the
// finiteness flag; the products are register-blocked loops over the k kept rows of W (unified,
// random) or the k kept entries of every row (per-example). The memory is worked on in a local
// copy and written back only when every step was finite. Mirrors msbp.ops.recurrent's Python
// loop (the fallback) and msbp.ops.reference.lstm_recurrence_ref (the oracle).
//
// Padding (memory_rows="active", all_rows false): after a step's cell pass, a scan that stops in
// each row of G_t at its first non-zero entry finds the zero rows (padded steps and batch
// entries); where there are some, that step is redone for the active rows only: M / n_active
// for the unit layout, a zero row's slot kept as it was, no entries selected in a zero row, and
// a step with no active row leaves the memory unchanged. Steps without zero rows cost one
// read per row more.
//
// lstm_recurrence_backward_eager (bound directly in bindings.cpp, not an op): the same, and with
// overwrite_act G is written over act, which the caller gives up (a backward that does not keep
// its graph; no op schema says that act is mutated, so this stays eager only). Step t's cell pass reads its
// gates just before writing G_t in their place, and no later step reads them: writing into
// lines the pass has just read saves the write-allocate reads of a fresh (T, B, 4H) buffer,
// 15% of the layer's backward at the tagger's size (3.3 -> 2.8 ms).
#include "bindings.h"
#include "common.h"
#include "topk.h"
#include "vec.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <tuple>
#include <limits>
#include <type_traits>
#include <vector>

namespace msbp {
namespace {

using at::Tensor;

enum Selection : int64_t { kUnified = 0, kPerExample = 1, kRandom = 2 };

// ---- products ----------------------------------------------------------------------------------

// From this many kept units on, the products of a step are ATen GEMMs (unified, random) or
// accumulated column by column, each kept row of W_hh read once per step (per-example): the
// register-blocked row loops win below it, where a GEMM's fixed cost dominates.
constexpr int64_t kWideK = 16;

// ---- the cell's chain rule ---------------------------------------------------------------------

// The cell's chain rule at hidden units [h, h + lanes) of one row; V is a vector of lanes or
// one scalar. See cell_chunk.
template <typename V, typename A, int Mem, bool Scores>
inline void cell_lanes(int64_t h, int64_t H, const A* ab, const A* tb, const A* cb, const A* ob,
                       A* dhb, A* dcb, A* gb, A* ub, const A* mvec, A mmul, A* score, A* gsum,
                       V& wit) {
  const V one = V{} + A(1), zero = V{};
  const V i = load<V>(ab + h), f = load<V>(ab + H + h), gg = load<V>(ab + 2 * H + h),
          o = load<V>(ab + 3 * H + h), tch = load<V>(tb + h);
  const V d_h = load<V>(ob + h) + load<V>(dhb + h);
  const V d_c = load<V>(dcb + h) + d_h * (o * (one - tch * tch));
  V u[4];
  u[0] = d_c * (gg * (one - i) * i);
  u[1] = d_c * (load<V>(cb + h) * (one - f) * f);
  u[2] = d_c * (i * (one - gg * gg));
  u[3] = d_h * (tch * (one - o) * o);
  store(dcb + h, d_c * f);
  for (int q = 0; q < 4; ++q) {
    store(gb + q * H + h, u[q]);
    store(gsum + q * H + h, load<V>(gsum + q * H + h) + u[q]);
    if (Mem == 1) u[q] = u[q] + load<V>(mvec + q * H + h) * (V{} + mmul);
    if (Mem == 2) u[q] = u[q] + load<V>(ub + q * H + h) * (V{} + mmul);
    if (Mem == 2) store(ub + q * H + h, u[q]);
    if (Scores) store(score + q * H + h, load<V>(score + q * H + h) + vabs(u[q]));
    wit = wit + u[q] * zero;  // NaN iff some U is not finite; never an overflow
  }
}

// One step of the cell's chain rule over rows [b0, b1), whole rows (the access pattern the
// prefetchers follow best). Writes G (the gate gradient) and forms U = G + memory (Mem: 0 none,
// U is G; 1 unit, + mvec / B, not stored: it is cheaper to recompute where needed than to write;
// 2 slot, + mmul * u, stored in u); updates dh and dc in place (on entry: U_S W and dc f of step
// t+1; on exit: dc f of this step); accumulates into score, gsum the column scores sum |U|
// (Scores) and the column sums of G (score is zeroed first; a unit memory's column sums of U are
// those of G plus B times the memory's row, formed once a step by the caller), and
// a finiteness witness: a sum of U * 0, NaN iff some U is not finite, never an overflow (a sum
// of the values would overflow near 3e38 on finite values).
template <typename A, int Mem, bool Scores>
void cell_chunk(int64_t b0, int64_t b1, int64_t H, const A* act, const A* tc, const A* cprev,
                const A* dout, int64_t dout_sb, A* dh, A* dc, A* g, A* u, const A* mvec, A mmul,
                A* score, A* gsum, A* witness) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::width;
  const int64_t G4 = 4 * H;
  if (Scores) std::fill_n(score, G4, A(0));
  V wv = V{};
  A ws = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const A* ab = act + b * G4;
    const A* tb = tc + b * H;
    const A* cb = cprev + b * H;
    const A* ob = dout + b * dout_sb;
    A* dhb = dh + b * H;
    A* dcb = dc + b * H;
    A* gb = g + b * G4;
    A* ub = u + b * G4;
    int64_t h = 0;
    for (; h + W <= H; h += W)
      cell_lanes<V, A, Mem, Scores>(h, H, ab, tb, cb, ob, dhb, dcb, gb, ub, mvec, mmul, score,
                                    gsum, wv);
    for (; h < H; ++h)
      cell_lanes<A, A, Mem, Scores>(h, H, ab, tb, cb, ob, dhb, dcb, gb, ub, mvec, mmul, score,
                                    gsum, ws);
  }
  for (int q = 0; q < W; ++q) ws += wv[q];
  *witness = ws;
}

[[noreturn]] void nonfinite() {
  TORCH_CHECK(false,
              "msbp-nonfinite: non-finite gate gradient; the memory was left unchanged");
}

struct Options {
  int64_t k;
  int64_t selection;
  double alpha;
  bool slot;
  bool reverse;
  bool need_w;
  bool all_rows;
};

// gate gradients, dh0, dc0, the kept columns (distinct, ascending), their dW_hh rows, db, skipped
// (1 if a non-finite gradient was propagated densely instead)
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename A>
Outputs backward_impl(const Tensor& act, const Tensor& cells, const Tensor& tanh_c,
                                  const Tensor& out, const Tensor& h0, const Tensor& c0,
                                  const Tensor& w, const Tensor& d_out, const Tensor& d_hn,
                                  const Tensor& d_cn, const std::optional<Tensor>& memory,
                                  const std::optional<Tensor>& random_cols, const Options& opt,
                                  bool raw, bool skip_nonfinite, bool overwrite_act) {
  const int64_t T = act.size(0), B = act.size(1), G4 = act.size(2), H = G4 / 4;
  const auto opts = act.options();
  const auto long_opts = opts.dtype(at::kLong);
  const bool has_memory = memory.has_value() && opt.alpha > 0 && !raw;
  // k >= 4H keeps every entry, but a memory left by calls at a smaller k (a k schedule, a loaded
  // checkpoint) must still be added in and propagated (the reference; SparseLinear at k = out):
  // the path with the memory does that at the first step, keeping all 4H columns. Only an empty
  // memory allows the dense path. A NaN counts as not zero and is refused as a non-finite U.
  const bool keep_all = opt.k >= G4;
  const bool flush = keep_all && has_memory &&
                     std::any_of(memory->data_ptr<A>(), memory->data_ptr<A>() + memory->numel(),
                                 [](A v) { return v != A(0); });
  const bool dense = raw || (keep_all && !flush);
  const bool use_memory = has_memory && !dense;
  // all 4H columns are one set for the batch, whatever the selection
  const bool per_example = opt.selection == kPerExample && !keep_all;
  const int64_t k = std::min(opt.k, G4);

  // overwrite_act: never with the skip path, which runs again from act after a non-finite step
  Tensor dgates = overwrite_act && !raw && !skip_nonfinite ? act : at::empty({T, B, G4}, opts);
  Tensor dh_t = d_hn.defined() ? d_hn.to(opts).contiguous().clone() : at::zeros({B, H}, opts);
  Tensor dc_t = d_cn.defined() ? d_cn.to(opts).contiguous().clone() : at::zeros({B, H}, opts);
  Tensor db_t = at::zeros({G4}, opts);
  A* dh = dh_t.data_ptr<A>();
  A* dc = dc_t.data_ptr<A>();
  A* gsum = db_t.data_ptr<A>();
  const A* actp = act.data_ptr<A>();
  const A* tcp = tanh_c.data_ptr<A>();
  const A* cellp = cells.data_ptr<A>();
  const A* outp = out.data_ptr<A>();
  const A* h0p = h0.data_ptr<A>();
  const A* c0p = c0.data_ptr<A>();
  const A* wp = w.data_ptr<A>();
  const A* doutp = d_out.defined() ? d_out.data_ptr<A>() : nullptr;
  const int64_t dout_st = d_out.defined() ? d_out.stride(0) : 0;
  const int64_t dout_sb = d_out.defined() ? d_out.stride(1) : H;
  std::vector<A> zeros_bh(d_out.defined() ? 0 : B * H, A(0));  // d_out when none was given

  // memory, in local copies: written back only when every step was finite
  std::vector<A> score(G4), usum(G4), gstep(G4, A(0)), mvec, mnew;
  const A bmul = static_cast<A>(B);  // rows per step
  Tensor ubuf;  // slot layout: U, then the residual (the memory is mmul * ubuf)
  A mmul = 0;
  if (use_memory) {
    const Tensor& m = *memory;
    if (opt.slot) {
      ubuf = at::empty({B, G4}, opts);
      if (m.size(0) == B) {
        ubuf.copy_(m);
        mmul = 1;
      } else {  // rows of another batch shape: their column sums, spread evenly
        ubuf.copy_(m.sum(0).expand({B, G4}));
        mmul = static_cast<A>(1.0 / static_cast<double>(B));
      }
    } else {
      mvec.assign(m.data_ptr<A>(), m.data_ptr<A>() + G4);
      mnew.resize(G4);
      mmul = static_cast<A>(1.0 / static_cast<double>(B));
    }
  }
  const int mem_kind = use_memory ? (opt.slot ? 2 : 1) : 0;
  const A alpha = static_cast<A>(opt.alpha);

  // dW_hh rows, one slot per distinct kept column, in order of first use; a slot's first
  // product writes it (no zeroing), later ones add
  const int64_t max_slots = dense ? 0 : std::min<int64_t>(G4, T * k * (per_example ? B : 1));
  Tensor dw_buf = opt.need_w && !dense ? at::empty({max_slots, H}, opts) : Tensor();
  A* dwp = dw_buf.defined() ? dw_buf.data_ptr<A>() : nullptr;
  std::vector<int64_t> slot_of(dense ? 0 : G4, -1), slot_cols;
  slot_cols.reserve(max_slots);
  auto dw_rows = [&](int64_t slot, bool fresh, const A* const* src, const A* coef, int64_t cnt) {
    if (fresh) axpy_rows<A, false>(dwp + slot * H, src, coef, cnt, H);
    else axpy_rows<A, true>(dwp + slot * H, src, coef, cnt, H);
  };

  // the cell pass in chunks of rows, one per thread (a power of two, 8192 gate units or more
  // each), each with its own column sums, added up in chunk order: on one thread, one chunk
  // (measured 10% faster than 4 at the tagger's size); the sums' rounding, as PyTorch's own
  // reductions', depends on the thread count
  const int64_t threads = at::get_num_threads();
  int64_t nchunks = 1;
  while (nchunks * 2 <= std::min<int64_t>(threads, 16) && nchunks * 2 <= B &&
         B * G4 / (nchunks * 2) >= 8192)
    nchunks *= 2;
  std::vector<A> witness(nchunks), partial(nchunks > 1 ? nchunks * 2 * G4 : 0);
  std::vector<int64_t> sel(per_example ? B * k : k), slots;
  std::vector<char> fresh_slot;
  // slots[j]: the dW buffer row of column cols[j] (j < m); fresh_slot[j]: new this call, so
  // written rather than added to
  auto take_slots = [&](const int64_t* cols, int64_t m) {
    slots.resize(m);
    fresh_slot.resize(m);
    for (int64_t j = 0; j < m; ++j) {
      int64_t& s = slot_of[cols[j]];
      fresh_slot[j] = s < 0;
      if (s < 0) {
        s = static_cast<int64_t>(slot_cols.size());
        slot_cols.push_back(cols[j]);
      }
      slots[j] = s;
    }
  };
  std::vector<A> vals(B * k), vcol(per_example ? 0 : B * k);
  const bool wide = !dense && k >= kWideK;
  Tensor vals_t, w_k, rows_t;  // the GEMMs' operands (wide unified / random)
  if (wide && !per_example) {
    vals_t = at::empty({B, k}, opts);
    w_k = at::empty({k, H}, opts);
    rows_t = at::empty({k, H}, opts);
  }
  std::vector<const A*> hprev(B);
  TopkScratch<A> scratch;
  // per-example: the step's kept entries grouped by column (a counting sort): the distinct
  // columns, and for each its rows (ascending) and values
  std::vector<int64_t> col_start(per_example ? G4 + 1 : 0), col_list, ent_start, ent_row;
  std::vector<A> ent_val;
  std::vector<const A*> ent_src;
  const int64_t* rand_p = random_cols.has_value() ? random_cols->data_ptr<int64_t>() : nullptr;
  bool finite = true;
  const bool track = !dense && !opt.all_rows && (use_memory || per_example);
  std::vector<char> act_row(track ? B : 0, 1);
  int64_t n_act = B;
  // the end of a step for the slot layout: the memory is mmul * ubuf, ubuf the residual of the
  // active rows; a zero row's ubuf holds its kept memory itself (G = 0 plus mmul times the old
  // ubuf), so with zero rows the active ones are scaled now and the multiplier becomes 1
  auto keep_slots = [&]() {
    if (n_act == B) {
      mmul = alpha;
      return;
    }
    A* up = ubuf.data_ptr<A>();
    for (int64_t b = 0; b < B; ++b)
      if (act_row[b])
        for (int64_t o = 0; o < G4; ++o) up[b * G4 + o] *= alpha;
    mmul = 1;
  };

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = opt.reverse ? s : T - 1 - s;
    const int64_t tp = opt.reverse ? t + 1 : t - 1;
    const bool has_prev = tp >= 0 && tp < T;
    const A* cprev = has_prev ? cellp + tp * B * H : c0p;
    const A* hprev_base = has_prev ? outp + tp * B * H : h0p;
    A* g = dgates.data_ptr<A>() + t * B * G4;
    A* u = mem_kind == 2 ? ubuf.data_ptr<A>() : g;  // U where it is stored
    const A* dout = doutp ? doutp + t * dout_st : zeros_bh.data();
    const bool scores = !dense && !keep_all && opt.selection == kUnified;

    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = B * c / nchunks, hi = B * (c + 1) / nchunks;
        // this chunk's column sums: scores, then G's
        A* sums = nchunks > 1 ? partial.data() + c * 2 * G4 : nullptr;
        if (sums) std::fill_n(sums + G4, G4, A(0));
        A* sc = sums ? sums : score.data();
        A* gs = sums ? sums + G4 : gstep.data();
        auto run = [&](auto kind, auto with_scores) {
          cell_chunk<A, decltype(kind)::value, decltype(with_scores)::value>(
              lo, hi, H, actp + t * B * G4, tcp + t * B * H, cprev, dout, dout_sb, dh, dc, g, u,
              mvec.data(), mmul, sc, gs, &witness[c]);
        };
        using Yes = std::true_type;
        using No = std::false_type;
        if (mem_kind == 1) {
          scores ? run(std::integral_constant<int, 1>{}, Yes{})
                 : run(std::integral_constant<int, 1>{}, No{});
        } else if (mem_kind == 2) {
          scores ? run(std::integral_constant<int, 2>{}, Yes{})
                 : run(std::integral_constant<int, 2>{}, No{});
        } else {
          scores ? run(std::integral_constant<int, 0>{}, Yes{})
                 : run(std::integral_constant<int, 0>{}, No{});
        }
      }
    });
    if (nchunks > 1) {
      if (scores) std::fill(score.begin(), score.end(), A(0));
      for (int64_t c = 0; c < nchunks; ++c) {
        const A* sums = partial.data() + c * 2 * G4;
        for (int64_t o = 0; o < G4; ++o) {
          if (scores) score[o] += sums[o];
          gstep[o] += sums[G4 + o];
        }
      }
    }
    // db, and a unit memory's colsum U = colsum G + B (M / B): the memory's row is the same on
    // every row, so its sum needs no pass over the rows (it had cost a load and a store of the
    // sums per row and gate)
    for (int64_t o = 0; o < G4; ++o) gsum[o] += gstep[o];
    if (mem_kind == 1)
      for (int64_t o = 0; o < G4; ++o) usum[o] = gstep[o] + bmul * (mvec[o] * mmul);
    std::fill(gstep.begin(), gstep.end(), A(0));
    if (!raw) {
      for (A x : witness) finite = finite && std::isfinite(x);
      if (!finite) break;
    }

    if (dense) {  // every gate gradient propagated: dh = G_t W_hh, a GEMM
      at::mm_out(dh_t, dgates.select(0, t), w);
      continue;
    }

    // zero rows of G_t: the step redone for the active rows (see the top of the file)
    n_act = B;
    A mstep = mmul;  // the unit memory's multiplier at this step: 1 / n_active
    if (track) {
      n_act = 0;
      for (int64_t b = 0; b < B; ++b) {
        const A* gb = g + b * G4;
        char on = 0;
        for (int64_t o = 0; o < G4; ++o) {
          if (gb[o] != A(0)) {  // true for NaN, which the finiteness check refused anyway
            on = 1;
            break;
          }
        }
        act_row[b] = on;
        n_act += on;
      }
    }
    const bool all_act = n_act == B;
    if (!all_act) {
      if (mem_kind == 1) mstep = n_act > 0 ? static_cast<A>(1.0 / static_cast<double>(n_act)) : 0;
      // the scores and sums of the pass included the memory on the zero rows: again over the
      // active rows (G, and U for the slot layout, are as stored)
      if (scores) std::fill(score.begin(), score.end(), A(0));
      if (mem_kind == 1) std::fill(usum.begin(), usum.end(), A(0));
      for (int64_t b = 0; b < B && (scores || mem_kind == 1); ++b) {
        if (!act_row[b]) continue;
        for (int64_t o = 0; o < G4; ++o) {
          const A v = mem_kind == 1 ? g[b * G4 + o] + mvec[o] * mstep : u[b * G4 + o];
          if (scores) score[o] += std::abs(v);
          if (mem_kind == 1) usum[o] += v;
        }
      }
    }

    // U at (b, o), recomputed for the unit layout (G + M / B, as in cell_lanes); zero on a zero
    // row (whose slot holds its kept memory)
    auto u_at = [&](int64_t b, int64_t o) -> A {
      if (!all_act && !act_row[b]) return 0;
      return mem_kind == 1 ? g[b * G4 + o] + mvec[o] * mstep : u[b * G4 + o];
    };
    for (int64_t b = 0; b < B; ++b) hprev[b] = hprev_base + b * H;
    if (!per_example) {
      // ---- one set of k columns for the batch ----
      if (opt.selection == kRandom && !keep_all) {  // none drawn at k >= 4H, as the reference
        std::copy(rand_p + s * k, rand_p + (s + 1) * k, sel.begin());
      } else {  // at k >= 4H: all columns, in order (topk_blocks' k >= m case)
        topk_blocks(Ranked<A, false, false>{score.data(), nullptr, 0}, G4, k, sel.data(),
                     scratch);
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < k; ++j) {
          const A v = u_at(b, sel[j]);
          vals[b * k + j] = v;
          vcol[j * B + b] = v;
        }
      if (opt.need_w) take_slots(sel.data(), k);
      if (wide) {  // dh = U_S W_S and the k rows U_S^T h_t': GEMMs of width k
        A* wkp = w_k.data_ptr<A>();
        at::parallel_for(0, k, 16, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) std::copy_n(wp + sel[j] * H, H, wkp + j * H);
        });
        std::copy(vals.begin(), vals.end(), vals_t.data_ptr<A>());
        at::mm_out(dh_t, vals_t, w_k);
        if (opt.need_w) {
          at::mm_out(rows_t, vals_t.t(), has_prev ? out.select(0, tp) : h0);
          const A* rp = rows_t.data_ptr<A>();
          at::parallel_for(0, k, 16, [&](int64_t j0, int64_t j1) {
            for (int64_t j = j0; j < j1; ++j) {
              A* dst = dwp + slots[j] * H;
              if (fresh_slot[j]) std::copy_n(rp + j * H, H, dst);
              else axpy1<A>(dst, rp + j * H, A(1), H);
            }
          });
        }
      } else {
        at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
          std::vector<const A*> src(k);
          for (int64_t j = 0; j < k; ++j) src[j] = wp + sel[j] * H;
          for (int64_t b = b0; b < b1; ++b)
            axpy_rows<A, false>(dh + b * H, src.data(), vals.data() + b * k, k, H);
        });
        if (opt.need_w) {
          at::parallel_for(0, k, 1, [&](int64_t j0, int64_t j1) {
            for (int64_t j = j0; j < j1; ++j)
              dw_rows(slots[j], fresh_slot[j], hprev.data(), vcol.data() + j * B, B);
          });
        }
      }
      if (mem_kind == 1 && n_act > 0) {
        for (int64_t o = 0; o < G4; ++o) mvec[o] = alpha * usum[o];
        for (int64_t j = 0; j < k; ++j) mvec[sel[j]] = 0;
      } else if (mem_kind == 2) {
        for (int64_t b = 0; b < B; ++b)
          if (all_act || act_row[b])
            for (int64_t j = 0; j < k; ++j) u[b * G4 + sel[j]] = 0;
        keep_slots();
      }
    } else {
      // ---- k entries per row ----
      at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
        TopkScratch<A> ts;
        std::vector<const A*> src(k);
        for (int64_t b = b0; b < b1; ++b) {
          int64_t* ib = sel.data() + b * k;
          A* vb = vals.data() + b * k;
          if (!all_act && !act_row[b]) {  // a zero row keeps nothing: dh = 0
            std::fill_n(vb, k, A(0));
            if (!wide) std::fill_n(dh + b * H, H, A(0));
            continue;
          }
          if (mem_kind == 1) {
            topk_blocks(Ranked<A, true, true>{g + b * G4, mvec.data(), mstep}, G4, k, ib, ts);
          } else {
            topk_blocks(Ranked<A, true, false>{u + b * G4, nullptr, 0}, G4, k, ib, ts);
          }
          for (int64_t j = 0; j < k; ++j) {
            vb[j] = u_at(b, ib[j]);
            src[j] = wp + ib[j] * H;
          }
          if (mem_kind == 2) {
            for (int64_t j = 0; j < k; ++j) u[b * G4 + ib[j]] = 0;
          }
          if (!wide) axpy_rows<A, false>(dh + b * H, src.data(), vb, k, H);
        }
      });
      std::fill(col_start.begin(), col_start.end(), 0);
      for (int64_t b = 0; b < B; ++b)
        if (all_act || act_row[b])
          for (int64_t j = 0; j < k; ++j) ++col_start[sel[b * k + j] + 1];
      col_list.clear();
      ent_start.assign(1, 0);
      for (int64_t o = 0; o < G4; ++o) {
        if (col_start[o + 1]) {
          col_list.push_back(o);
          ent_start.push_back(ent_start.back() + col_start[o + 1]);
        }
        col_start[o + 1] += col_start[o];  // now the first entry of column o + 1
      }
      const int64_t nc = static_cast<int64_t>(col_list.size());
      ent_val.resize(B * k);
      ent_src.resize(B * k);
      ent_row.resize(B * k);
      for (int64_t b = 0; b < B; ++b) {
        if (!all_act && !act_row[b]) continue;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t pos = col_start[sel[b * k + j]]++;
          ent_val[pos] = vals[b * k + j];
          ent_src[pos] = hprev[b];
          ent_row[pos] = b;
        }
      }
      if (wide) {
        // dh column by column: each kept row of W_hh is read once for all the rows keeping it;
        // slices of H keep the threads' writes apart
        std::fill_n(dh, B * H, A(0));
        at::parallel_for(0, H, 256, [&](int64_t h0, int64_t h1) {
          for (int64_t q = 0; q < nc; ++q) {
            const A* wrow = wp + col_list[q] * H + h0;
            for (int64_t e = ent_start[q]; e < ent_start[q + 1]; ++e)
              axpy1<A>(dh + ent_row[e] * H + h0, wrow, ent_val[e], h1 - h0);
          }
        });
      }
      if (opt.need_w) {
        take_slots(col_list.data(), nc);
        at::parallel_for(0, nc, 4, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t e0 = ent_start[q];
            dw_rows(slots[q], fresh_slot[q], ent_src.data() + e0, ent_val.data() + e0,
                    ent_start[q + 1] - e0);
          }
        });
      }
      if (mem_kind == 1 && n_act > 0) {
        // the column sums of U without the kept entries: only the kept columns differ from
        // those of U, and are summed again over the rows that did not keep them
        for (int64_t o = 0; o < G4; ++o) mnew[o] = alpha * usum[o];
        for (int64_t q = 0; q < nc; ++q) {
          const int64_t o = col_list[q];
          int64_t e = ent_start[q];
          const int64_t e1 = ent_start[q + 1];
          A sum = 0;
          for (int64_t b = 0; b < B; ++b) {
            if (e < e1 && ent_row[e] == b) {
              ++e;
              continue;
            }
            sum += u_at(b, o);
          }
          mnew[o] = alpha * sum;
        }
        mvec.swap(mnew);
      } else if (mem_kind == 2) {
        keep_slots();
      }
    }
  }

  if (!finite) {
    if (!skip_nonfinite) nonfinite();
    // skip: the raw gradient through the dense chain rule, the memory untouched
    auto res = backward_impl<A>(act, cells, tanh_c, out, h0, c0, w, d_out, d_hn, d_cn, memory,
                                random_cols, opt, /*raw=*/true, false, false);
    std::get<6>(res) = at::ones({}, long_opts);
    return res;
  }

  Tensor cols, dw;
  if (dense) {
    cols = opt.need_w ? at::arange(G4, long_opts) : at::empty({0}, long_opts);
    if (opt.need_w) {
      // dW = sum_t G_t^T h_t': one GEMM over the steps with a previous step, one for h0
      Tensor g2 = dgates.view({T * B, G4});
      Tensor o2 = out.view({T * B, H});
      const int64_t first = opt.reverse ? T - 1 : 0;
      dw = at::mm(dgates.select(0, first).t(), h0);
      if (T > 1) {
        Tensor gs = opt.reverse ? g2.narrow(0, 0, (T - 1) * B) : g2.narrow(0, B, (T - 1) * B);
        Tensor hs = opt.reverse ? o2.narrow(0, B, (T - 1) * B) : o2.narrow(0, 0, (T - 1) * B);
        dw.addmm_(gs.t(), hs);
      }
    } else {
      dw = at::empty({0, H}, opts);
    }
    if (has_memory) {
      if (opt.slot) memory->resize_({B, G4});
      memory->zero_();
    }
  } else {
    // the kept columns ascending, their rows in that order
    const int64_t c = static_cast<int64_t>(slot_cols.size());
    cols = at::empty({c}, long_opts);
    int64_t* cp = cols.data_ptr<int64_t>();
    std::copy(slot_cols.begin(), slot_cols.end(), cp);
    std::sort(cp, cp + c);
    dw = at::empty({0, H}, opts);
    if (opt.need_w) {
      if (std::equal(cp, cp + c, slot_cols.begin())) {
        dw = dw_buf.narrow(0, 0, c);
      } else {
        dw = at::empty({c, H}, opts);
        A* dst = dw.data_ptr<A>();
        at::parallel_for(0, c, 64, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q)
            std::copy_n(dwp + slot_of[cp[q]] * H, H, dst + q * H);
        });
      }
    }
    if (mem_kind == 1) {
      std::copy(mvec.begin(), mvec.end(), memory->data_ptr<A>());
    } else if (mem_kind == 2) {
      memory->resize_({B, G4});
      A* mp = memory->data_ptr<A>();
      const A* bp = ubuf.data_ptr<A>();
      at::parallel_for(0, B * G4, 16384, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) mp[e] = mmul * bp[e];
      });
    }
  }
  return {dgates, dh_t, dc_t, cols, dw, db_t, at::zeros({}, long_opts)};
}

}  // namespace

Outputs lstm_recurrence_backward_eager(
    const Tensor& act, const Tensor& cells, const Tensor& tanh_c, const Tensor& out,
    const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const std::optional<Tensor>& d_out,
    const std::optional<Tensor>& d_hn, const std::optional<Tensor>& d_cn,
    const std::optional<Tensor>& memory, const std::optional<Tensor>& random_cols, int64_t k,
    int64_t selection, double alpha, bool slot, bool reverse, bool need_w,
    bool skip_nonfinite, bool all_rows, bool overwrite_act) {
  TORCH_CHECK(act.dim() == 3 && act.size(2) % 4 == 0,
              "lstm_recurrence_backward: act must be (T, B, 4H), got ", act.sizes());
  const int64_t T = act.size(0), B = act.size(1), G4 = act.size(2), H = G4 / 4;
  const auto dtype = act.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "lstm_recurrence_backward: float32 or float64 only, got ", dtype);
  TORCH_CHECK(T >= 1 && B >= 1, "lstm_recurrence_backward: empty input ", act.sizes());
  for (const Tensor* x : {&cells, &tanh_c, &out}) {
    TORCH_CHECK(x->sizes() == at::IntArrayRef({T, B, H}) && x->scalar_type() == dtype,
                "lstm_recurrence_backward: cells, tanh_c, out must be (T, B, H) of ", dtype,
                ", got ", x->sizes(), " ", x->scalar_type());
  }
  for (const Tensor* x : {&h0, &c0}) {
    TORCH_CHECK(x->sizes() == at::IntArrayRef({B, H}) && x->scalar_type() == dtype,
                "lstm_recurrence_backward: h0, c0 must be (B, H), got ", x->sizes());
  }
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({G4, H}) && w_hh.scalar_type() == dtype,
              "lstm_recurrence_backward: w_hh must be (4H, H), got ", w_hh.sizes());
  TORCH_CHECK(k >= 1, "lstm_recurrence_backward: k must be >= 1, got ", k);
  TORCH_CHECK(selection >= kUnified && selection <= kRandom,
              "lstm_recurrence_backward: unknown selection ", selection);
  Tensor dout;
  if (d_out.has_value()) {
    TORCH_CHECK(d_out->sizes() == at::IntArrayRef({T, B, H}),
                "lstm_recurrence_backward: d_out must be (T, B, H), got ", d_out->sizes());
    dout = d_out->to(dtype);
    if (dout.stride(2) != 1) dout = dout.contiguous();
  }
  Tensor dhn = d_hn.has_value() ? *d_hn : Tensor();
  Tensor dcn = d_cn.has_value() ? *d_cn : Tensor();
  for (const Tensor* x : {&dhn, &dcn}) {
    TORCH_CHECK(!x->defined() || x->sizes() == at::IntArrayRef({B, H}),
                "lstm_recurrence_backward: d_hn, d_cn must be (B, H), got ", x->sizes());
  }
  const bool dense = k >= G4;
  if (memory.has_value() && alpha > 0) {
    TORCH_CHECK(memory->scalar_type() == dtype && memory->is_contiguous(),
                "lstm_recurrence_backward: memory must be contiguous ", dtype);
    if (slot) {
      TORCH_CHECK(memory->dim() == 2 && memory->size(1) == G4,
                  "lstm_recurrence_backward: slot memory must be (rows, 4H), got ",
                  memory->sizes());
    } else {
      TORCH_CHECK(memory->dim() == 1 && memory->size(0) == G4,
                  "lstm_recurrence_backward: unit memory must be (4H,), got ", memory->sizes());
    }
  }
  if (!dense && selection == kRandom) {
    TORCH_CHECK(random_cols.has_value() && random_cols->sizes() == at::IntArrayRef({T, k}) &&
                    random_cols->scalar_type() == at::kLong && random_cols->is_contiguous(),
                "lstm_recurrence_backward: random selection needs random_cols (T, k) int64");
    const int64_t* rp = random_cols->data_ptr<int64_t>();
    for (int64_t j = 0; j < T * k; ++j)  // the loops index G, W_hh and the memory by them
      TORCH_CHECK(rp[j] >= 0 && rp[j] < G4, "lstm_recurrence_backward: random_cols holds ",
                  rp[j], ", out of range for ", G4, " gate units");
  }
  Options opt{k, selection, alpha, slot, reverse, need_w, all_rows};
  // (a copy of a non-contiguous act takes G just as well)
  Tensor a = act.contiguous(), ce = cells.contiguous(), tc = tanh_c.contiguous(),
         o = out.contiguous(), h = h0.contiguous(), c = c0.contiguous(), w = w_hh.contiguous();
  if (dtype == at::kDouble) {
    return backward_impl<double>(a, ce, tc, o, h, c, w, dout, dhn, dcn, memory, random_cols, opt,
                                 false, skip_nonfinite, overwrite_act);
  }
  return backward_impl<float>(a, ce, tc, o, h, c, w, dout, dhn, dcn, memory, random_cols, opt,
                              false, skip_nonfinite, overwrite_act);
}

namespace {

Outputs lstm_recurrence_backward(
    const Tensor& act, const Tensor& cells, const Tensor& tanh_c, const Tensor& out,
    const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const std::optional<Tensor>& d_out,
    const std::optional<Tensor>& d_hn, const std::optional<Tensor>& d_cn,
    const std::optional<Tensor>& memory, const std::optional<Tensor>& random_cols, int64_t k,
    int64_t selection, double alpha, bool slot, bool reverse, bool need_w,
    bool skip_nonfinite, bool all_rows) {
  return lstm_recurrence_backward_eager(act, cells, tanh_c, out, h0, c0, w_hh, d_out, d_hn, d_cn,
                                        memory, random_cols, k, selection, alpha, slot, reverse,
                                        need_w, skip_nonfinite, all_rows, false);
}

}  // namespace

// The forward recurrence (msbp.ops.recurrent._lstm_steps, eager, bound in bindings.cpp): the
// same ATen ops in the same order, bit for bit, without their Python dispatch (the Python loop
// cost 39 us a step at hidden 8, where the kernels cost next to nothing). act (T, B, 4H)
// activated gates [i, f, g, o], cells, tanh_c and out (T, B, H), as the backward reads them.
// packed: the steps' products on W_hh^T packed once, by MKL's ops
// (msbp.ops.recurrent._packs_w_hh says where; _lstm_steps, bit for bit).
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_recurrence_forward(
    const Tensor& gates_x, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, bool reverse, bool packed) {
  TORCH_CHECK(gates_x.dim() == 3 && gates_x.size(2) % 4 == 0,
              "lstm_recurrence_forward: gates_x must be (T, B, 4H), got ", gates_x.sizes());
  const int64_t T = gates_x.size(0), B = gates_x.size(1), H = gates_x.size(2) / 4;
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({B, H}) && c0.sizes() == at::IntArrayRef({B, H}),
              "lstm_recurrence_forward: h0, c0 must be (B, H) = (", B, ", ", H, "), got ",
              h0.sizes(), ", ", c0.sizes());
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({4 * H, H}),
              "lstm_recurrence_forward: w_hh must be (4H, H), got ", w_hh.sizes());
  at::NoGradGuard no_grad;
  Tensor act = at::empty({T, B, 4 * H}, gates_x.options());
  Tensor cells = at::empty({T, B, H}, gates_x.options());
  Tensor tanh_c = at::empty_like(cells), out = at::empty_like(cells);
  Tensor h = h0, c = c0;
  const Tensor w_t = w_hh.t();
  Tensor w_packed;
  using Linear = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                        int64_t);
  std::optional<c10::TypedOperatorHandle<Linear>> mkl_linear;
  if (packed) {
    auto& dispatcher = c10::Dispatcher::singleton();
    w_packed = dispatcher.findSchemaOrThrow("mkl::_mkl_reorder_linear_weight", "")
                   .typed<Tensor(const Tensor&, int64_t)>()
                   .call(w_hh, B);
    mkl_linear = dispatcher.findSchemaOrThrow("mkl::_mkl_linear", "").typed<Linear>();
  }
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    Tensor a = act.select(0, t), cell = cells.select(0, t), tc = tanh_c.select(0, t),
           ht = out.select(0, t);
    if (packed) {
      at::add_out(a, gates_x.select(0, t),
                  mkl_linear->call(h.contiguous(), w_packed, w_hh, b_hh, B));
    } else {
      if (b_hh.has_value()) at::add_out(a, gates_x.select(0, t), *b_hh);
      else a.copy_(gates_x.select(0, t));
      a.addmm_(h, w_t);
    }
    a.narrow(1, 0, 2 * H).sigmoid_();
    a.narrow(1, 2 * H, H).tanh_();
    a.narrow(1, 3 * H, H).sigmoid_();
    const Tensor i = a.narrow(1, 0, H), f = a.narrow(1, H, H), g = a.narrow(1, 2 * H, H),
                 o = a.narrow(1, 3 * H, H);
    c = at::mul_out(cell, f, c).addcmul_(i, g);
    h = at::mul_out(ht, o, at::tanh_out(tc, c));
  }
  return {act, cells, tanh_c, out};
}

TORCH_LIBRARY_FRAGMENT(msbp, m) {
  m.def(
      "lstm_recurrence_backward(Tensor act, Tensor cells, Tensor tanh_c, Tensor out, Tensor h0, "
      "Tensor c0, Tensor w_hh, Tensor? d_out, Tensor? d_hn, Tensor? d_cn, Tensor(a!)? memory, "
      "Tensor? random_cols, int k, int selection, float alpha, bool slot, bool reverse, "
      "bool need_w, bool skip_nonfinite, bool all_rows=False) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msbp, CPU, m) {
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward);
}

}  // namespace msbp
