// conv_channel_sums: the per-channel sums of a convolution's output gradient in one pass.
//
// For G (N, C, *spatial), contiguous or channels-last, and an optional per-channel shift s (C,)
// (the unit memory spread over the rows, M / rows), returns
//   abs_sum[c] = sum over n, positions of |G[n, c, .] + s[c]|   (the unified top-k scores)
//   sum[c]     = sum over n, positions of  G[n, c, .] + s[c]    (the unit memory's residual)
// without materialising G + s (which would cost a write and two reads of the whole gradient).
// Partial sums run in 8 independent lanes of the input type (vectorisable without fast-math)
// and are folded into double per block, so float32 inputs lose no more than PyTorch's sum.
#include "common.h"

#include <atomic>
#include <cmath>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kLanes = 8;
constexpr int64_t kBlockRows = 256;  // channels-last rows summed in the input type per flush

// WantSum a template parameter: no branch in the inner loops, which then vectorise
template <typename T, bool WantSum>
void sums_contiguous(const T* g, const T* shift, int64_t n, int64_t c, int64_t s,
                     double* abs_out, double* sum_out) {
  // one channel per task: every (n, c) plane is a contiguous run of s values
  at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const T sh = shift[ch];
      double a_tot = 0, s_tot = 0;
      for (int64_t i = 0; i < n; ++i) {
        const T* p = g + (i * c + ch) * s;
        T a[kLanes] = {}, t[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= s; j += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            const T v = p[j + l] + sh;
            a[l] += std::abs(v);
            if constexpr (WantSum) t[l] += v;
          }
        }
        for (; j < s; ++j) {
          const T v = p[j] + sh;
          a[0] += std::abs(v);
          if constexpr (WantSum) t[0] += v;
        }
        for (int64_t l = 0; l < kLanes; ++l) {
          a_tot += a[l];
          s_tot += t[l];
        }
      }
      abs_out[ch] = a_tot;
      sum_out[ch] = s_tot;
    }
  });
}

template <typename T, bool WantSum>
void sums_channels_last(const T* g, const T* shift, int64_t rows, int64_t c, double* abs_out,
                        double* sum_out) {
  constexpr bool want_sum = WantSum;
  // rows of c contiguous channels: blocks of rows per task, one partial row of sums each
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  std::vector<double> part_a(blocks * c, 0.0), part_s(want_sum ? blocks * c : 0, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> a(c), t(c);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(a.begin(), a.end(), T(0));
      std::fill(t.begin(), t.end(), T(0));
      const int64_t r1 = std::min(rows, (b + 1) * kBlockRows);
      for (int64_t r = b * kBlockRows; r < r1; ++r) {
        const T* p = g + r * c;
        for (int64_t ch = 0; ch < c; ++ch) {
          const T v = p[ch] + shift[ch];
          a[ch] += std::abs(v);
          if constexpr (WantSum) t[ch] += v;
        }
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        part_a[b * c + ch] = a[ch];
        if (want_sum) part_s[b * c + ch] = t[ch];
      }
    }
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    double a_tot = 0, s_tot = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      a_tot += part_a[b * c + ch];
      if (want_sum) s_tot += part_s[b * c + ch];
    }
    abs_out[ch] = a_tot;
    sum_out[ch] = s_tot;
  }
}

std::tuple<Tensor, Tensor> conv_channel_sums(const Tensor& grad, const std::optional<Tensor>& shift,
                                             bool want_sum) {
  TORCH_CHECK(grad.dim() >= 3, "conv_channel_sums: grad must be (N, C, *spatial), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
              "conv_channel_sums: float32 or float64 only, got ", grad.scalar_type());
  const int64_t n = grad.size(0), c = grad.size(1);
  const int64_t s = c == 0 || n == 0 ? 0 : grad.numel() / (n * c);
  const bool cl = grad.dim() == 4 && !grad.is_contiguous() &&
                  grad.is_contiguous(at::MemoryFormat::ChannelsLast);
  Tensor g = cl ? grad : grad.contiguous();
  Tensor sh;
  if (shift.has_value() && shift->defined()) {
    TORCH_CHECK(shift->numel() == c, "conv_channel_sums: shift must have ", c, " values, got ",
                shift->numel());
    sh = shift->to(grad.scalar_type()).contiguous();
  } else {  // a zero shift keeps the inner loops free of a branch
    sh = at::zeros({c}, grad.options());
  }
  Tensor abs_d = at::zeros({c}, grad.options().dtype(at::kDouble));
  Tensor sum_d = at::zeros({c}, grad.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv_channel_sums", [&] {
    const scalar_t* sp = sh.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    double* ap = abs_d.data_ptr<double>();
    double* sp2 = sum_d.data_ptr<double>();
    if (cl) {
      want_sum ? sums_channels_last<scalar_t, true>(gp, sp, n * s, c, ap, sp2)
               : sums_channels_last<scalar_t, false>(gp, sp, n * s, c, ap, sp2);
    } else {
      want_sum ? sums_contiguous<scalar_t, true>(gp, sp, n, c, s, ap, sp2)
               : sums_contiguous<scalar_t, false>(gp, sp, n, c, s, ap, sp2);
    }
  });
  return {abs_d.to(grad.scalar_type()), sum_d.to(grad.scalar_type())};
}

// Whether every position (n, spatial) of G has a non-zero channel (NaN counts): the padding-safe
// memory's common case, answered without a pass over G. A position usually stops at its first
// channel, so a dense gradient costs one read per position instead of the C reads (plus a bool
// tensor of G's size) of `(G != 0).any(1)`.
template <typename T>
bool all_positions_active(const T* g, int64_t n, int64_t c, int64_t s, bool cl) {
  // channels-last: position r's channels are g[r c .. r c + c); else channel ch of (i, j) is
  // g[(i c + ch) s + j]
  const int64_t positions = n * s;
  std::atomic<bool> ok{true};
  at::parallel_for(0, positions, 4096, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1 && ok.load(std::memory_order_relaxed); ++p) {
      const T* base = cl ? g + p * c : g + (p / s) * c * s + p % s;
      const int64_t step = cl ? 1 : s;
      bool any = false;
      for (int64_t ch = 0; ch < c && !any; ++ch) any = base[ch * step] != T(0);
      if (!any) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

bool conv_all_positions_active(const Tensor& grad) {
  TORCH_CHECK(grad.dim() >= 3, "conv_all_positions_active: grad must be (N, C, *spatial), got ",
              grad.sizes());
  const int64_t n = grad.size(0), c = grad.size(1);
  if (n == 0 || grad.numel() == 0) return true;
  const int64_t s = grad.numel() / (n * c);
  const bool cl = grad.dim() == 4 && !grad.is_contiguous() &&
                  grad.is_contiguous(at::MemoryFormat::ChannelsLast);
  Tensor g = cl ? grad : grad.contiguous();
  bool out = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(),
                                  "conv_all_positions_active", [&] {
    out = all_positions_active<scalar_t>(g.data_ptr<scalar_t>(), n, c, s, cl);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msbp, m) {
  m.def("conv_channel_sums(Tensor grad, Tensor? shift, bool want_sum) -> (Tensor, Tensor)");
  m.def("conv_all_positions_active(Tensor grad) -> bool");
}

TORCH_LIBRARY_IMPL(msbp, CPU, m) {
  m.impl("conv_channel_sums", &conv_channel_sums);
  m.impl("conv_all_positions_active", &conv_all_positions_active);
}
