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
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace msbp {
namespace {

using at::Tensor;

enum Selection : int64_t { kUnified = 0, kPerExample = 1, kRandom = 2 };

// ---- selection ---------------------------------------------------------------------------------

template <typename A>
struct Entry {
  A s;
  int64_t i;
};

// Heap order for the k best: (score desc, index asc) is "better"; the heap's root is the worst
// entry kept, so a candidate enters iff it beats the root.
template <typename A>
inline bool better(const Entry<A>& a, const Entry<A>& b) {
  return a.s > b.s || (a.s == b.s && a.i < b.i);
}

// The indices of the k largest v[0..m) (ties: the lower index), ascending, into out. `heap` is
// scratch of k entries. Candidates are scanned in blocks: a block with no value above the k-th
// best so far (the common case once the heap is warm) costs one vectorised compare.
template <typename A, bool Abs>
void topk_indices(const A* v, int64_t m, int64_t k, int64_t* out, Entry<A>* heap) {
  auto val = [&](int64_t j) { return Abs ? std::abs(v[j]) : v[j]; };
  for (int64_t j = 0; j < k; ++j) heap[j] = {val(j), j};
  std::make_heap(heap, heap + k, better<A>);
  constexpr int64_t kBlock = 16;
  int64_t j = k;
  for (; j < m && j % kBlock; ++j) {
    A x = val(j);
    if (x > heap[0].s) {  // later index: a tie never beats the root
      std::pop_heap(heap, heap + k, better<A>);
      heap[k - 1] = {x, j};
      std::push_heap(heap, heap + k, better<A>);
    }
  }
  for (; j < m; j += kBlock) {
    const int64_t e = std::min(m, j + kBlock);
    const A thr = heap[0].s;
    int any = 0;
    for (int64_t q = j; q < e; ++q) any |= (Abs ? std::abs(v[q]) : v[q]) > thr;
    if (!any) continue;
    for (int64_t q = j; q < e; ++q) {
      A x = val(q);
      if (x > heap[0].s) {
        std::pop_heap(heap, heap + k, better<A>);
        heap[k - 1] = {x, q};
        std::push_heap(heap, heap + k, better<A>);
      }
    }
  }
  for (int64_t q = 0; q < k; ++q) out[q] = heap[q].i;
  std::sort(out, out + k);
}

// ---- products ----------------------------------------------------------------------------------

// GCC/Clang vector types: AVX2 registers under -mavx2, SSE pairs otherwise; no intrinsics.
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef double v4d __attribute__((vector_size(32), aligned(8)));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = v8f; static constexpr int width = 8; };
template <> struct Vec<double> { using type = v4d; static constexpr int width = 4; };
constexpr int kBlockVecs = 8;  // accumulators per block: 64 floats / 32 doubles in registers

// dst[0..len) (+)= sum_j coef[j] * src[j][0..len): every product of the backward.
template <typename T, bool Add>
void axpy_rows(T* dst, const T* const* src, const T* coef, int64_t cnt, int64_t len) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  constexpr int BL = W * kBlockVecs;
  int64_t b = 0;
  for (; b + BL <= len; b += BL) {
    V acc[kBlockVecs];
    for (int q = 0; q < kBlockVecs; ++q) acc[q] = V{};
    for (int64_t j = 0; j < cnt; ++j) {
      const T* s = src[j] + b;
      V c = V{} + coef[j];
      for (int q = 0; q < kBlockVecs; ++q) {
        V sv;
        std::memcpy(&sv, s + q * W, sizeof(V));
        acc[q] += c * sv;
      }
    }
    for (int q = 0; q < kBlockVecs; ++q) {
      V d = acc[q];
      if (Add) {
        V old;
        std::memcpy(&old, dst + b + q * W, sizeof(V));
        d = old + acc[q];
      }
      std::memcpy(dst + b + q * W, &d, sizeof(V));
    }
  }
  for (; b + W <= len; b += W) {
    V acc = V{};
    for (int64_t j = 0; j < cnt; ++j) {
      V sv;
      std::memcpy(&sv, src[j] + b, sizeof(V));
      acc += (V{} + coef[j]) * sv;
    }
    if (Add) {
      V old;
      std::memcpy(&old, dst + b, sizeof(V));
      acc = old + acc;
    }
    std::memcpy(dst + b, &acc, sizeof(V));
  }
  for (; b < len; ++b) {
    T acc = 0;
    for (int64_t j = 0; j < cnt; ++j) acc += coef[j] * src[j][b];
    dst[b] = Add ? dst[b] + acc : acc;
  }
}

// ---- the cell's chain rule ---------------------------------------------------------------------

struct StepPtrs {
  int64_t t;        // time step
  bool has_prev;    // t' exists (else h0, c0)
  int64_t tp;       // t'
};

// One step of the cell's chain rule over hidden units [h0, h1) of every row. Writes G (the gate
// gradient), U = G + memory (when `u` differs from `g`), updates dh/dc in place (dh: the incoming
// U_S W of step t+1 on entry; dc: dc f on exit), accumulates the column scores |U|, the column sums
// of U and of G, and the finiteness witness (a sum of U * 0: NaN iff some U is not finite, never
// an overflow).
template <typename A, int Mem>  // Mem: 0 none, 1 unit (mvec / B), 2 slot (mscale * u in place)
void cell_chunk(int64_t B, int64_t H, int64_t h0, int64_t h1, const A* act, const A* tc,
                const A* cprev, const A* dout, int64_t dout_sb, A* dh, A* dc, A* g, A* u,
                const A* mvec, A mmul, A* score, A* usum, A* gsum, A* witness, bool scores) {
  const int64_t G4 = 4 * H;
  for (int64_t q = 0; q < 4; ++q)
    for (int64_t h = h0; h < h1; ++h) {
      score[q * H + h] = 0;
      usum[q * H + h] = 0;
    }
  A wit = 0;
  for (int64_t b = 0; b < B; ++b) {
    const A* __restrict ab = act + b * G4;
    const A* __restrict tb = tc + b * H;
    const A* __restrict cb = cprev + b * H;
    const A* __restrict ob = dout ? dout + b * dout_sb : nullptr;
    A* __restrict dhb = dh + b * H;
    A* __restrict dcb = dc + b * H;
    A* __restrict gb = g + b * G4;
    A* __restrict ub = u + b * G4;
    for (int64_t h = h0; h < h1; ++h) {
      const A i = ab[h], f = ab[H + h], gg = ab[2 * H + h], o = ab[3 * H + h], tch = tb[h];
      const A d_h = (ob ? ob[h] : A(0)) + dhb[h];
      const A d_c = dcb[h] + d_h * (o * (A(1) - tch * tch));
      const A gi = d_c * (gg * (A(1) - i) * i);
      const A gf = d_c * (cb[h] * (A(1) - f) * f);
      const A gc = d_c * (i * (A(1) - gg * gg));
      const A go = d_h * (tch * (A(1) - o) * o);
      dcb[h] = d_c * f;
      gb[h] = gi;
      gb[H + h] = gf;
      gb[2 * H + h] = gc;
      gb[3 * H + h] = go;
      A ui = gi, uf = gf, uc = gc, uo = go;
      if (Mem == 1) {
        ui += mvec[h] * mmul;
        uf += mvec[H + h] * mmul;
        uc += mvec[2 * H + h] * mmul;
        uo += mvec[3 * H + h] * mmul;
      } else if (Mem == 2) {
        ui += ub[h] * mmul;
        uf += ub[H + h] * mmul;
        uc += ub[2 * H + h] * mmul;
        uo += ub[3 * H + h] * mmul;
      }
      if (Mem != 0) {
        ub[h] = ui;
        ub[H + h] = uf;
        ub[2 * H + h] = uc;
        ub[3 * H + h] = uo;
      }
      gsum[h] += gi;
      gsum[H + h] += gf;
      gsum[2 * H + h] += gc;
      gsum[3 * H + h] += go;
      if (scores) {
        score[h] += std::abs(ui);
        score[H + h] += std::abs(uf);
        score[2 * H + h] += std::abs(uc);
        score[3 * H + h] += std::abs(uo);
      }
      if (Mem == 1) {
        usum[h] += ui;
        usum[H + h] += uf;
        usum[2 * H + h] += uc;
        usum[3 * H + h] += uo;
      }
      wit += ui * A(0) + uf * A(0) + uc * A(0) + uo * A(0);
    }
  }
  *witness = wit;
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
};

template <typename A>
std::vector<Tensor> backward_impl(const Tensor& act, const Tensor& cells, const Tensor& tanh_c,
                                  const Tensor& out, const Tensor& h0, const Tensor& c0,
                                  const Tensor& w, const Tensor& d_out, const Tensor& d_hn,
                                  const Tensor& d_cn, const std::optional<Tensor>& memory,
                                  const std::optional<Tensor>& random_cols, const Options& opt,
                                  bool raw, bool skip_nonfinite) {
  const int64_t T = act.size(0), B = act.size(1), G4 = act.size(2), H = G4 / 4;
  const auto opts = act.options();
  const auto long_opts = opts.dtype(at::kLong);
  const bool dense = raw || opt.k >= G4;
  const bool has_memory = memory.has_value() && opt.alpha > 0 && !raw;
  const bool use_memory = has_memory && !dense;
  const bool per_example = opt.selection == kPerExample;
  const int64_t k = std::min(opt.k, G4);

  Tensor dgates = at::empty({T, B, G4}, opts);
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
  const int64_t dout_sb = d_out.defined() ? d_out.stride(1) : 0;

  // memory, in local copies: written back only when every step was finite
  std::vector<A> score(G4), usum(G4), mvec;
  Tensor ubuf;
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
      mmul = static_cast<A>(1.0 / static_cast<double>(B));
    }
  }
  const int mem_kind = use_memory ? (opt.slot ? 2 : 1) : 0;
  A* up = ubuf.defined() ? ubuf.data_ptr<A>() : nullptr;
  std::vector<A> uvec;  // U for the unit layout (the slot layout works in ubuf)
  if (mem_kind == 1) {
    uvec.resize(B * G4);
    up = uvec.data();
  }
  const A alpha = static_cast<A>(opt.alpha);

  // dW_hh rows, one slot per distinct kept column, in order of first use
  const int64_t max_slots =
      dense ? 0 : std::min<int64_t>(G4, T * k * (per_example ? B : 1));
  Tensor dw_buf = opt.need_w && !dense ? at::empty({max_slots, H}, opts) : Tensor();
  std::vector<int64_t> slot_of(dense ? 0 : G4, -1), slot_cols;
  slot_cols.reserve(max_slots);
  auto slot_for = [&](int64_t col) {
    int64_t& s = slot_of[col];
    if (s < 0) {
      s = static_cast<int64_t>(slot_cols.size());
      slot_cols.push_back(col);
      std::fill_n(dw_buf.data_ptr<A>() + s * H, H, A(0));
    }
    return s;
  };

  const int64_t grain_h = std::max<int64_t>(8, 16384 / std::max<int64_t>(1, 4 * B));
  const int64_t nchunks = (H + grain_h - 1) / grain_h;
  std::vector<A> witness(nchunks);
  std::vector<int64_t> sel(per_example ? B * k : k);
  std::vector<A> vals(B * k), vcol(per_example ? 0 : B * k);
  std::vector<const A*> hprev(B);
  // per-example: the step's kept entries grouped by column (counting sort)
  std::vector<int64_t> col_count(per_example ? G4 + 1 : 0), col_list, ent_start, ent_pos;
  std::vector<A> ent_val;
  std::vector<const A*> ent_src;
  const int64_t* rand_p = random_cols.has_value() ? random_cols->data_ptr<int64_t>() : nullptr;
  bool finite = true;

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = opt.reverse ? s : T - 1 - s;
    const int64_t tp = opt.reverse ? t + 1 : t - 1;
    const bool has_prev = tp >= 0 && tp < T;
    const A* cprev = has_prev ? cellp + tp * B * H : c0p;
    const A* hprev_base = has_prev ? outp + tp * B * H : h0p;
    A* g = dgates.data_ptr<A>() + t * B * G4;
    A* u = mem_kind ? up : g;
    const A* dout = doutp ? doutp + t * dout_st : nullptr;
    const bool scores = !dense && opt.selection == kUnified;

    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * grain_h, hi = std::min(H, lo + grain_h);
        auto run = [&](auto kind) {
          cell_chunk<A, decltype(kind)::value>(
              B, H, lo, hi, actp + t * B * G4, tcp + t * B * H, cprev, dout, dout_sb, dh, dc, g,
              u, mvec.data(), mmul, score.data(), usum.data(), gsum, &witness[c], scores);
        };
        if (mem_kind == 1) run(std::integral_constant<int, 1>{});
        else if (mem_kind == 2) run(std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 0>{});
      }
    });
    if (!raw) {
      for (A x : witness) finite = finite && std::isfinite(x);
      if (!finite) break;
    }

    if (dense) {  // every gate gradient propagated: dh = G_t W_hh, a GEMM
      at::mm_out(dh_t, dgates.select(0, t), w);
      continue;
    }

    for (int64_t b = 0; b < B; ++b) hprev[b] = hprev_base + b * H;
    if (!per_example) {
      // ---- one set of k columns for the batch ----
      if (opt.selection == kRandom) {
        std::copy(rand_p + s * k, rand_p + (s + 1) * k, sel.begin());
      } else {
        std::vector<Entry<A>> heap(k);
        topk_indices<A, false>(score.data(), G4, k, sel.data(), heap.data());
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < k; ++j) {
          const A v = u[b * G4 + sel[j]];
          vals[b * k + j] = v;
          vcol[j * B + b] = v;
        }
      at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
        std::vector<const A*> src(k);
        for (int64_t j = 0; j < k; ++j) src[j] = wp + sel[j] * H;
        for (int64_t b = b0; b < b1; ++b)
          axpy_rows<A, false>(dh + b * H, src.data(), vals.data() + b * k, k, H);
      });
      if (opt.need_w) {
        std::vector<int64_t> slots(k);
        for (int64_t j = 0; j < k; ++j) slots[j] = slot_for(sel[j]);
        A* dwp = dw_buf.data_ptr<A>();
        at::parallel_for(0, k, 1, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j)
            axpy_rows<A, true>(dwp + slots[j] * H, hprev.data(), vcol.data() + j * B, B, H);
        });
      }
      if (mem_kind == 1) {
        for (int64_t o = 0; o < G4; ++o) mvec[o] = alpha * usum[o];
        for (int64_t j = 0; j < k; ++j) mvec[sel[j]] = 0;
      } else if (mem_kind == 2) {
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j < k; ++j) u[b * G4 + sel[j]] = 0;
        mmul = alpha;
      }
    } else {
      // ---- k entries per row ----
      at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
        std::vector<Entry<A>> heap(k);
        std::vector<const A*> src(k);
        for (int64_t b = b0; b < b1; ++b) {
          A* ub = u + b * G4;
          int64_t* ib = sel.data() + b * k;
          A* vb = vals.data() + b * k;
          topk_indices<A, true>(ub, G4, k, ib, heap.data());
          for (int64_t j = 0; j < k; ++j) {
            vb[j] = ub[ib[j]];
            src[j] = wp + ib[j] * H;
          }
          if (mem_kind) {
            for (int64_t j = 0; j < k; ++j) ub[ib[j]] = 0;
          }
          axpy_rows<A, false>(dh + b * H, src.data(), vb, k, H);
        }
      });
      // group the entries by column: the distinct columns, and for each its rows and values
      std::fill(col_count.begin(), col_count.end(), 0);
      for (int64_t e = 0; e < B * k; ++e) ++col_count[sel[e] + 1];
      col_list.clear();
      ent_start.assign(1, 0);
      for (int64_t o = 0; o < G4; ++o) {
        if (col_count[o + 1]) {
          col_list.push_back(o);
          ent_start.push_back(ent_start.back() + col_count[o + 1]);
        }
        col_count[o + 1] = col_count[o] + col_count[o + 1];  // start of column o + 1
      }
      const int64_t nc = static_cast<int64_t>(col_list.size());
      if (opt.need_w) {
        ent_val.resize(B * k);
        ent_src.resize(B * k);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j < k; ++j) {
            const int64_t pos = col_count[sel[b * k + j]]++;
            ent_val[pos] = vals[b * k + j];
            ent_src[pos] = hprev[b];
          }
        std::vector<int64_t> slots(nc);
        for (int64_t q = 0; q < nc; ++q) slots[q] = slot_for(col_list[q]);
        A* dwp = dw_buf.data_ptr<A>();
        at::parallel_for(0, nc, 4, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t e0 = ent_start[q], e1 = ent_start[q + 1];
            axpy_rows<A, true>(dwp + slots[q] * H, ent_src.data() + e0, ent_val.data() + e0,
                               e1 - e0, H);
          }
        });
      }
      if (mem_kind == 1) {
        // the column sums of U with the kept entries zeroed: only kept columns change
        for (int64_t o = 0; o < G4; ++o) mvec[o] = alpha * usum[o];
        for (int64_t q = 0; q < nc; ++q) {
          const int64_t o = col_list[q];
          A sum = 0;
          for (int64_t b = 0; b < B; ++b) sum += u[b * G4 + o];
          mvec[o] = alpha * sum;
        }
      } else if (mem_kind == 2) {
        mmul = alpha;
      }
    }
  }

  if (!finite) {
    if (!skip_nonfinite) nonfinite();
    // skip: the raw gradient through the dense chain rule, the memory untouched
    auto res = backward_impl<A>(act, cells, tanh_c, out, h0, c0, w, d_out, d_hn, d_cn, memory,
                                random_cols, opt, /*raw=*/true, false);
    res.back() = at::ones({}, long_opts);
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
    const int64_t c = static_cast<int64_t>(slot_cols.size());
    cols = at::empty({c}, long_opts);
    std::copy(slot_cols.begin(), slot_cols.end(), cols.data_ptr<int64_t>());
    dw = opt.need_w ? dw_buf.narrow(0, 0, c) : at::empty({0, H}, opts);
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

std::vector<Tensor> lstm_recurrence_backward(
    const Tensor& act, const Tensor& cells, const Tensor& tanh_c, const Tensor& out,
    const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const std::optional<Tensor>& d_out,
    const std::optional<Tensor>& d_hn, const std::optional<Tensor>& d_cn,
    const std::optional<Tensor>& memory, const std::optional<Tensor>& random_cols, int64_t k,
    int64_t selection, double alpha, bool slot, bool reverse, bool need_w,
    bool skip_nonfinite) {
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
  }
  Options opt{k, selection, alpha, slot, reverse, need_w};
  Tensor a = act.contiguous(), ce = cells.contiguous(), tc = tanh_c.contiguous(),
         o = out.contiguous(), h = h0.contiguous(), c = c0.contiguous(), w = w_hh.contiguous();
  if (dtype == at::kDouble) {
    return backward_impl<double>(a, ce, tc, o, h, c, w, dout, dhn, dcn, memory, random_cols, opt,
                                 false, skip_nonfinite);
  }
  return backward_impl<float>(a, ce, tc, o, h, c, w, dout, dhn, dcn, memory, random_cols, opt,
                              false, skip_nonfinite);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msbp, m) {
  m.def(
      "lstm_recurrence_backward(Tensor act, Tensor cells, Tensor tanh_c, Tensor out, Tensor h0, "
      "Tensor c0, Tensor w_hh, Tensor? d_out, Tensor? d_hn, Tensor? d_cn, Tensor(a!)? memory, "
      "Tensor? random_cols, int k, int selection, float alpha, bool slot, bool reverse, "
      "bool need_w, bool skip_nonfinite) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(msbp, CPU, m) {
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward);
}

}  // namespace msbp
