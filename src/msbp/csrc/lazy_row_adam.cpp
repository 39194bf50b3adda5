// Row-sparse ("lazy") Adam: the Adam step of torch.optim.Adam, applied only to given rows.
//
// msbp::lazy_row_adam_(params, exp_avgs, exp_avg_sqs, grads, rows, steps, lr, beta1, beta2,
//                      eps, weight_decay, decoupled_weight_decay)
//
// One call takes every row-sparse parameter of a parameter group, to pay the dispatcher once.
// For each parameter i: the rows r in rows[i] (distinct indices into dim 0) whose gradient row
// is not all zero are stepped (every row where rows[i] names them all, as a dense step; none:
// the parameter takes no step); steps[i] += 1, then the elements of each such row get the math
// of PyTorch's fused CPU Adam
// (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, no amsgrad), in the same order of operations:
// weight decay as L2 added to the gradient (ADAM_MODE::ORIGINAL), or with
// decoupled_weight_decay the parameter scaled by 1 - lr weight_decay first (ADAM_MODE::ADAMW,
// torch.optim.AdamW), exp_avg by lerp, bias corrections in double from the step count. 16-bit
// parameters and moments are computed in float, as PyTorch does.
//
// msbp::lazy_row_adam_step_(params, exp_avgs, exp_avg_sqs, grads, masks, dirty, steps,
//                           dense_params, dense_grads, dense_exp_avgs, dense_exp_avg_sqs,
//                           dense_steps, lr, beta1, beta2, eps, weight_decay,
//                           decoupled_weight_decay) -> counts
// msbp::zero_masked_rows_(grads, dirty, pending) -> counts
//
// A parameter group's whole step: the same row step with each parameter's rows given as the
// uint8 row mask the sparse layers mark (consumed: cleared, the rows stepped marked in `dirty`),
// and the dense parameters by PyTorch's fused Adam; and the zeroing of the gradient rows such
// masks mark. They are what LazyRowAdam's CPU path calls, so that its step() and zero_grad()
// run one op and no tensor op per parameter from Python (at MNIST size that bookkeeping cost
// more than the update itself).
//
// Why ATen's Vectorized and not a plain loop for the compiler: std::sqrt may set errno, so
// without -fno-math-errno GCC vectorises no loop that takes a square root. The build's flags are
// shared by every kernel; this file instead selects ATen's AVX2 vector types itself when the
// compiler targets AVX2 (as ATen's own per-capability kernels do), and the generic ones else.
#if defined(__AVX2__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include "bindings.h"
#include "common.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Elements per task of at::parallel_for: below this a thread costs more than it saves.
constexpr int64_t kGrainElements = 32768;

// The per-step scalars of one parameter, as torch's fused Adam derives them (in double).
struct AdamCoefficients {
  double neg_step_size;  // -lr / (1 - beta1^t)
  double bc2_sqrt;       // sqrt(1 - beta2^t)
  double beta2, sq_coeff, eps, weight_decay;
  bool decoupled;  // AdamW: the parameter times decay_factor instead of L2 in the gradient
  double decay_factor;  // 1 - lr * weight_decay
  double lerp_coeff;  // exp_avg.lerp_(grad, 1 - beta1) as fmadd(coeff, grad - exp_avg, base)
  bool lerp_from_exp_avg;  // base: exp_avg when 1 - beta1 < 0.5, else grad
};

// The Adam update of one vector of elements, float or double, in torch's order of operations.
template <typename scalar_t>
inline void adam_vec(scalar_t* p, scalar_t* m, scalar_t* v, const scalar_t* g,
                     const AdamCoefficients& c) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec p_v = Vec::loadu(p);
  Vec g_v = Vec::loadu(g);
  if (c.weight_decay != 0) {
    if (c.decoupled) {
      p_v = p_v * Vec(static_cast<scalar_t>(c.decay_factor));
    } else {
      g_v += p_v * Vec(static_cast<scalar_t>(c.weight_decay));
    }
  }
  Vec m_v = Vec::loadu(m);
  m_v = at::vec::fmadd(Vec(static_cast<scalar_t>(c.lerp_coeff)), g_v - m_v,
                       c.lerp_from_exp_avg ? m_v : g_v);
  Vec v_v = Vec::loadu(v) * Vec(static_cast<scalar_t>(c.beta2)) +
            Vec(static_cast<scalar_t>(c.sq_coeff)) * g_v * g_v;
  m_v.store(m);
  v_v.store(v);
  const Vec denom =
      (v_v.sqrt() / Vec(static_cast<scalar_t>(c.bc2_sqrt))) + Vec(static_cast<scalar_t>(c.eps));
  p_v = p_v + Vec(static_cast<scalar_t>(c.neg_step_size)) * m_v / denom;
  p_v.store(p);
}

// The same for 16-bit values: computed in float, stored rounded (as torch's fused Adam does).
template <typename scalar_t>
inline void adam_vec_16bit(scalar_t* p, scalar_t* m, scalar_t* v, const scalar_t* g,
                           const AdamCoefficients& c) {
  using lpVec = at::vec::Vectorized<scalar_t>;
  using fVec = at::vec::Vectorized<float>;
  auto [p1, p2] = at::vec::convert_to_float<scalar_t>(lpVec::loadu(p));
  auto [g1, g2] = at::vec::convert_to_float<scalar_t>(lpVec::loadu(g));
  if (c.weight_decay != 0) {
    if (c.decoupled) {
      p1 = p1 * fVec(static_cast<float>(c.decay_factor));
      p2 = p2 * fVec(static_cast<float>(c.decay_factor));
    } else {
      g1 += p1 * fVec(static_cast<float>(c.weight_decay));
      g2 += p2 * fVec(static_cast<float>(c.weight_decay));
    }
  }
  auto [m1, m2] = at::vec::convert_to_float<scalar_t>(lpVec::loadu(m));
  const fVec coeff(static_cast<float>(c.lerp_coeff));
  m1 = at::vec::fmadd(coeff, g1 - m1, c.lerp_from_exp_avg ? m1 : g1);
  m2 = at::vec::fmadd(coeff, g2 - m2, c.lerp_from_exp_avg ? m2 : g2);
  auto [v1, v2] = at::vec::convert_to_float<scalar_t>(lpVec::loadu(v));
  const fVec beta2(static_cast<float>(c.beta2));
  const fVec sq_coeff(static_cast<float>(c.sq_coeff));
  v1 = v1 * beta2 + sq_coeff * g1 * g1;
  v2 = v2 * beta2 + sq_coeff * g2 * g2;
  at::vec::convert_from_float<scalar_t>(m1, m2).store(m);
  at::vec::convert_from_float<scalar_t>(v1, v2).store(v);
  const fVec bc2_sqrt(static_cast<float>(c.bc2_sqrt));
  const fVec eps(static_cast<float>(c.eps));
  const fVec neg_step(static_cast<float>(c.neg_step_size));
  p1 = p1 + neg_step * m1 / ((v1.sqrt() / bc2_sqrt) + eps);
  p2 = p2 + neg_step * m2 / ((v2.sqrt() / bc2_sqrt) + eps);
  at::vec::convert_from_float<scalar_t>(p1, p2).store(p);
}

template <typename scalar_t>
inline void adam_any_vec(scalar_t* p, scalar_t* m, scalar_t* v, const scalar_t* g,
                         const AdamCoefficients& c) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    adam_vec<scalar_t>(p, m, v, g, c);
  } else {
    adam_vec_16bit<scalar_t>(p, m, v, g, c);
  }
}

// Hint that the cache line at `addr` is needed soon (a no-op where the compiler has no hint).
inline void prefetch(const void* addr) {
#if defined(__GNUC__)
  __builtin_prefetch(addr);
#else
  (void)addr;
#endif
}

// One row of `size` elements. The last partial vector is padded into a buffer and goes through
// the very same vector code, so that every element is computed as the bulk of torch's kernel.
// `ahead` (elements, 0: none) is the offset of the row stepped next: its cache lines are fetched
// while this row computes, since the rows are scattered and the moments are read only here,
// cold (at MNIST size that halves the time of a step whose data is out of cache).
template <typename scalar_t>
void adam_row(scalar_t* p, scalar_t* m, scalar_t* v, const scalar_t* g, int64_t size,
              const AdamCoefficients& c, int64_t ahead) {
  constexpr int64_t kLanes = at::vec::Vectorized<scalar_t>::size();
  constexpr int64_t kPerLine = std::max<int64_t>(1, 64 / sizeof(scalar_t));
  int64_t d = 0;
  for (; d + kLanes <= size; d += kLanes) {
    if (ahead != 0 && d % kPerLine < kLanes) {
      prefetch(p + d + ahead);
      prefetch(m + d + ahead);
      prefetch(v + d + ahead);
      prefetch(g + d + ahead);
    }
    adam_any_vec<scalar_t>(p + d, m + d, v + d, g + d, c);
  }
  const int64_t rest = size - d;
  if (rest > 0) {
    scalar_t buf[4][kLanes] = {};  // p, m, v, g; zero padding is harmless (denominator >= eps)
    std::copy_n(p + d, rest, buf[0]);
    std::copy_n(m + d, rest, buf[1]);
    std::copy_n(v + d, rest, buf[2]);
    std::copy_n(g + d, rest, buf[3]);
    adam_any_vec<scalar_t>(buf[0], buf[1], buf[2], buf[3], c);
    std::copy_n(buf[0], rest, p + d);
    std::copy_n(buf[1], rest, m + d);
    std::copy_n(buf[2], rest, v + d);
  }
}

template <typename scalar_t>
void row_adam_one(const at::Tensor& param, const at::Tensor& exp_avg,
                  const at::Tensor& exp_avg_sq, const at::Tensor& grad, const int64_t* row_data,
                  int64_t n_rows, double step, double lr, double beta1, double beta2, double eps,
                  double weight_decay, bool decoupled) {
  if (n_rows == 0 || param.numel() == 0) {
    return;
  }
  const int64_t width = param.numel() / param.size(0);

  AdamCoefficients c;
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  c.neg_step_size = -(lr / bias_correction1);
  c.bc2_sqrt = std::sqrt(bias_correction2);
  c.beta2 = beta2;
  c.sq_coeff = 1 - beta2;
  c.eps = eps;
  c.weight_decay = weight_decay;
  c.decoupled = decoupled;
  c.decay_factor = 1 - lr * weight_decay;
  const double w = 1 - beta1;
  c.lerp_from_exp_avg = std::abs(w) < 0.5;
  c.lerp_coeff = c.lerp_from_exp_avg ? w : w - 1;

  scalar_t* p_data = param.data_ptr<scalar_t>();
  scalar_t* m_data = exp_avg.data_ptr<scalar_t>();
  scalar_t* v_data = exp_avg_sq.data_ptr<scalar_t>();
  const scalar_t* g_data = grad.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, width));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t offset = row_data[i] * width;
      const int64_t ahead = i + 1 < end ? row_data[i + 1] * width - offset : 0;
      adam_row<scalar_t>(p_data + offset, m_data + offset, v_data + offset, g_data + offset,
                         width, c, ahead);
    }
  });
}

double bump_step(const at::Tensor& step) {
  TORCH_CHECK(step.device().is_cpu() && step.numel() == 1,
              "lazy_row_adam_: a step count must be a one-element CPU tensor, got ",
              step.sizes(), " on ", step.device());
  // written directly: an add_ through the dispatcher per parameter would cost more than the
  // update of a few rows
  switch (step.scalar_type()) {
    case at::kFloat: {
      float* s = step.data_ptr<float>();
      *s += 1;
      return *s;
    }
    case at::kDouble: {
      double* s = step.data_ptr<double>();
      *s += 1;
      return *s;
    }
    default:
      TORCH_CHECK(false, "lazy_row_adam_: step counts must be float32 or float64, got ",
                  step.scalar_type());
  }
}

// The tensors a step wrote through raw pointers: their version counters move as an in-place ATen
// op would move them, so that autograd (a saved parameter) and version checks see the write.
void bump_versions(const at::Tensor& param, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const at::Tensor& step) {
  for (const at::Tensor* t : {&param, &exp_avg, &exp_avg_sq, &step}) {
    t->unsafeGetTensorImpl()->bump_version();
  }
}

void check_one(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
               const at::Tensor& grad, const at::Tensor& rows) {
  TORCH_CHECK(param.device().is_cpu(), "lazy_row_adam_: CPU tensors only, got ", param.device());
  TORCH_CHECK(param.dim() >= 1, "lazy_row_adam_: a parameter needs a row dimension, got shape ",
              param.sizes());
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &grad}) {
    TORCH_CHECK(t->sizes() == param.sizes() && t->scalar_type() == param.scalar_type() &&
                    t->device() == param.device(),
                "lazy_row_adam_: moments and gradient must match the parameter (shape ",
                param.sizes(), ", ", param.scalar_type(), "), got shape ", t->sizes(), ", ",
                t->scalar_type());
  }
  for (const at::Tensor* t : {&param, &exp_avg, &exp_avg_sq, &grad}) {
    TORCH_CHECK(t->is_contiguous(), "lazy_row_adam_: tensors must be contiguous");
  }
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 &&
                  rows.is_contiguous(),
              "lazy_row_adam_: rows must be a contiguous 1-D int64 CPU tensor, got shape ",
              rows.sizes(), ", ", rows.scalar_type());
  // checked before anything is written, so that a bad index leaves every tensor as it was
  const int64_t out = param.size(0);
  const int64_t* r = rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < out, "lazy_row_adam_: row index ", r[i],
                " out of range for a parameter of shape ", param.sizes());
  }
}

// Whether row r of a contiguous gradient is all zero (-0 included; NaN is not zero). Such a row
// takes no step although a layer logged it: top-k fills up with units of zero gradient where
// fewer than k have any (lowest index first), and a gradient zeroed in place after its
// backward was discarded keeps the rows that backward logged. Reads up to the first non-zero
// element, which for a row with a gradient is almost always the first.
bool row_is_zero(const at::Tensor& grad, int64_t r) {
  const int64_t width = grad.numel() / grad.size(0);
  bool zero = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad.scalar_type(), "row_is_zero", [&] {
        const scalar_t* g = grad.const_data_ptr<scalar_t>() + r * width;
        for (int64_t e = 0; e < width && zero; ++e) zero = !(g[e] != scalar_t(0));
      });
  return zero;
}

void lazy_row_adam_(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList grads, at::TensorList rows, at::TensorList steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled_weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && grads.size() == n &&
                  rows.size() == n && steps.size() == n,
              "lazy_row_adam_: all lists must have one entry per parameter (", n, ")");
  for (size_t i = 0; i < n; ++i) {
    check_one(params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], rows[i]);
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t* r = rows[i].const_data_ptr<int64_t>();
    const bool all = rows[i].numel() == params[i].size(0);  // distinct: every row, as dense
    std::vector<int64_t> live;
    live.reserve(rows[i].numel());
    for (int64_t j = 0; j < rows[i].numel(); ++j)
      if (all || !row_is_zero(grads[i], r[j])) live.push_back(r[j]);
    if (live.empty()) continue;  // no row with a gradient: no step, the count stays
    const double step = bump_step(steps[i]);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, params[i].scalar_type(), "lazy_row_adam_", [&] {
          row_adam_one<scalar_t>(params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], live.data(),
                                 static_cast<int64_t>(live.size()), step, lr, beta1, beta2, eps,
                                 weight_decay, decoupled_weight_decay);
        });
    bump_versions(params[i], exp_avgs[i], exp_avg_sqs[i], steps[i]);
  }
}

// -- the mask form: what LazyRowAdam's native path calls ------------------------------------

// Whether `t` is a (rows,) uint8 CPU row mask for a parameter with `rows` rows.
bool is_row_mask(const at::Tensor& t, int64_t rows) {
  return t.device().is_cpu() && t.scalar_type() == at::kByte && t.dim() == 1 &&
         t.size(0) == rows && t.is_contiguous();
}

// Whether lazy_row_adam_step_ can take parameter i as it is (else it is left to the caller).
bool can_take(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
              const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& dirty,
              const at::Tensor& step) {
  if (!param.device().is_cpu() || param.dim() < 1 || !param.is_contiguous()) return false;
  const auto dtype = param.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 &&
      dtype != at::kHalf) {
    return false;
  }
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &grad}) {
    if (t->layout() != at::kStrided || t->scalar_type() != dtype || !t->device().is_cpu() ||
        t->sizes() != param.sizes() || !t->is_contiguous()) {
      return false;
    }
  }
  const int64_t rows = param.size(0);
  return is_row_mask(mask, rows) && is_row_mask(dirty, rows) && step.device().is_cpu() &&
         step.numel() == 1 &&
         (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble);
}

// The rows set in a mask whose gradient row is not all zero, in increasing order; clears the
// mask, marks those rows in `dirty` and counts every row that was set in `*taken`.
std::vector<int64_t> take_rows(const at::Tensor& mask, const at::Tensor& dirty,
                               const at::Tensor& grad, int64_t* taken) {
  uint8_t* m = mask.data_ptr<uint8_t>();
  uint8_t* d = dirty.data_ptr<uint8_t>();
  const int64_t n = mask.numel();
  // every row marked (a dense backward: k >= out, a non-finite gradient sent through densely):
  // every row is stepped, zero or not, as torch.optim.Adam steps them
  const bool all = std::all_of(m, m + n, [](uint8_t v) { return v != 0; });
  std::vector<int64_t> rows;
  *taken = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (m[r]) {
      m[r] = 0;
      ++*taken;
      if (!all && row_is_zero(grad, r)) continue;
      rows.push_back(r);
      d[r] = 1;
    }
  }
  return rows;
}

// Whether a dense parameter can take PyTorch's fused CPU Adam here (checked before anything is
// written, so that a refusal leaves the whole group as it was).
void check_dense(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                 const at::Tensor& exp_avg_sq, const at::Tensor& step) {
  TORCH_CHECK(param.device().is_cpu() && param.layout() == at::kStrided &&
                  at::isFloatingType(param.scalar_type()),
              "lazy_row_adam_step_: dense parameters must be floating strided CPU tensors, got ",
              param.scalar_type(), " on ", param.device());
  for (const at::Tensor* t : {&grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->layout() == at::kStrided && t->device() == param.device() &&
                    t->scalar_type() == param.scalar_type() && t->sizes() == param.sizes(),
                "lazy_row_adam_step_: a dense gradient or moment does not match its parameter ",
                "(shape ", param.sizes(), ", ", param.scalar_type(), "), got shape ", t->sizes(),
                ", ", t->scalar_type());
  }
  TORCH_CHECK(step.device().is_cpu() && step.numel() == 1,
              "lazy_row_adam_step_: a step count must be a one-element CPU tensor, got ",
              step.sizes(), " on ", step.device());
}

}  // namespace

namespace msbp {

// One parameter group's step on the CPU, in one call from Python:
// - the row-sparse parameters (params ... steps) with each one's rows given as a uint8 mask (out,),
//   the form the sparse layers mark: the rows are its set entries whose gradient row is not all
//   zero (all rows where all are set), the mask is cleared in the same pass and the rows
//   stepped are marked in dirty[i] (those zero_grad must clear); a parameter with no such row
//   takes no step (its step count stays);
// - the dense parameters (dense_*) by PyTorch's own fused Adam (at::_fused_adam_, or
//   at::_fused_adamw_ with decoupled_weight_decay, after their step counts move by one),
//   exactly as torch.optim.Adam(fused=True) (or AdamW) steps them.
// Returns, per row-sparse parameter, the number of rows its mask had set (those of zero gradient
// among them took no step; 0: the parameter took no part), or -1 where it cannot take the
// tensors (not CPU, not contiguous, another dtype or shape...): that parameter is left entirely
// alone, mask included, for the caller.
std::vector<int64_t> lazy_row_adam_step_(
    at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList grads, at::TensorList masks, at::TensorList dirty, at::TensorList steps,
    at::TensorList dense_params, at::TensorList dense_grads, at::TensorList dense_exp_avgs,
    at::TensorList dense_exp_avg_sqs, at::TensorList dense_steps, double lr, double beta1,
    double beta2, double eps, double weight_decay, bool decoupled_weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && grads.size() == n &&
                  masks.size() == n && dirty.size() == n && steps.size() == n,
              "lazy_row_adam_step_: all row-sparse lists must have one entry per parameter (", n,
              ")");
  const size_t n_dense = dense_params.size();
  TORCH_CHECK(dense_grads.size() == n_dense && dense_exp_avgs.size() == n_dense &&
                  dense_exp_avg_sqs.size() == n_dense && dense_steps.size() == n_dense,
              "lazy_row_adam_step_: all dense lists must have one entry per parameter (", n_dense,
              ")");
  for (size_t i = 0; i < n_dense; ++i) {
    check_dense(dense_params[i], dense_grads[i], dense_exp_avgs[i], dense_exp_avg_sqs[i],
                dense_steps[i]);
  }
  std::vector<int64_t> counts(n, -1);
  for (size_t i = 0; i < n; ++i) {
    if (!can_take(params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], masks[i], dirty[i],
                  steps[i])) {
      continue;
    }
    const std::vector<int64_t> rows = take_rows(masks[i], dirty[i], grads[i], &counts[i]);
    if (rows.empty()) continue;
    const double step = bump_step(steps[i]);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, params[i].scalar_type(), "lazy_row_adam_step_", [&] {
          row_adam_one<scalar_t>(params[i], exp_avgs[i], exp_avg_sqs[i], grads[i], rows.data(),
                                 static_cast<int64_t>(rows.size()), step, lr, beta1, beta2, eps,
                                 weight_decay, decoupled_weight_decay);
        });
    bump_versions(params[i], exp_avgs[i], exp_avg_sqs[i], steps[i]);
  }
  if (n_dense > 0) {
    for (const at::Tensor& step : dense_steps) {
      if (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble) {
        bump_step(step);
        step.unsafeGetTensorImpl()->bump_version();
      } else {
        step.add_(1);
      }
    }
    // the fused kernel reads a gradient as if laid out like its parameter (torch's own
    // Adam(fused=True) updates wrongly from a transposed one): such a gradient is copied
    std::vector<at::Tensor> grads_like(dense_grads.begin(), dense_grads.end());
    for (size_t i = 0; i < grads_like.size(); ++i) {
      const at::Tensor& param = dense_params[i];
      if (grads_like[i].strides() != param.strides())
        grads_like[i] = at::empty_strided(param.sizes(), param.strides(), param.options())
                            .copy_(grads_like[i]);
    }
    if (decoupled_weight_decay) {
      at::_fused_adamw_(dense_params, grads_like, dense_exp_avgs, dense_exp_avg_sqs, {},
                        dense_steps, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                        /*maximize=*/false, std::nullopt, std::nullopt);
    } else {
      at::_fused_adam_(dense_params, grads_like, dense_exp_avgs, dense_exp_avg_sqs, {},
                       dense_steps, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                       /*maximize=*/false, std::nullopt, std::nullopt);
    }
  }
  return counts;
}

// zero_grad's half: zeroes the rows of grads[i] set in dirty[i] or pending[i] (uint8 masks
// (out,); an empty tensor: none) and clears both masks. Returns, per gradient, the number of
// rows pending[i] had set (rows a backward wrote since the last step), or -1 where it cannot take
// the tensors (left alone: not a contiguous CPU tensor, masks of another shape).
std::vector<int64_t> zero_masked_rows_(at::TensorList grads, at::TensorList dirty,
                                       at::TensorList pending) {
  const size_t n = grads.size();
  TORCH_CHECK(dirty.size() == n && pending.size() == n,
              "zero_masked_rows_: all lists must have one entry per gradient (", n, ")");
  std::vector<int64_t> counts(n, -1);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& grad = grads[i];
    if (!grad.device().is_cpu() || grad.layout() != at::kStrided || grad.dim() < 1 ||
        !grad.is_contiguous()) {
      continue;
    }
    const int64_t out = grad.size(0);
    const bool has_dirty = dirty[i].numel() > 0, has_pending = pending[i].numel() > 0;
    if ((has_dirty && !is_row_mask(dirty[i], out)) ||
        (has_pending && !is_row_mask(pending[i], out))) {
      continue;
    }
    uint8_t* d = has_dirty ? dirty[i].data_ptr<uint8_t>() : nullptr;
    uint8_t* p = has_pending ? pending[i].data_ptr<uint8_t>() : nullptr;
    char* data = static_cast<char*>(grad.data_ptr());
    const int64_t row_bytes = out > 0 ? grad.numel() / out * grad.element_size() : 0;
    int64_t n_pending = 0;
    bool wrote = false;
    for (int64_t r = 0; r < out; ++r) {
      const bool was_dirty = d != nullptr && d[r];
      const bool was_pending = p != nullptr && p[r];
      if (was_dirty || was_pending) {
        std::memset(data + r * row_bytes, 0, row_bytes);  // all-bits-zero is 0 in every dtype
        wrote = true;
        if (d != nullptr) d[r] = 0;
        if (p != nullptr) p[r] = 0;
        n_pending += was_pending;
      }
    }
    if (wrote) grad.unsafeGetTensorImpl()->bump_version();
    counts[i] = n_pending;
  }
  return counts;
}

}  // namespace msbp

TORCH_LIBRARY_FRAGMENT(msbp, m) {
  m.def(
      "lazy_row_adam_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] grads, Tensor[] rows, Tensor(d!)[] steps, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled_weight_decay=False) -> ()");
  m.def(
      "lazy_row_adam_step_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] grads, Tensor(e!)[] masks, Tensor(f!)[] dirty, "
      "Tensor(d!)[] steps, Tensor(g!)[] dense_params, Tensor[] dense_grads, "
      "Tensor(h!)[] dense_exp_avgs, Tensor(i!)[] dense_exp_avg_sqs, Tensor(j!)[] dense_steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay=False) -> int[]");
  m.def(
      "zero_masked_rows_(Tensor(a!)[] grads, Tensor(b!)[] dirty, Tensor(c!)[] pending) "
      "-> int[]");
}

TORCH_LIBRARY_IMPL(msbp, CPU, m) {
  m.impl("lazy_row_adam_", &lazy_row_adam_);
  m.impl("lazy_row_adam_step_", &msbp::lazy_row_adam_step_);
  m.impl("zero_masked_rows_", &msbp::zero_masked_rows_);
}
