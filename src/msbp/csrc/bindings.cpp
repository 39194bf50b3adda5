// The Python module of the native library: direct bindings of the eager entry points (see
// bindings.h). The ops themselves are registered by their own sources (TORCH_LIBRARY_FRAGMENT).
#include "bindings.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace {

std::vector<int64_t> step_lists(const std::vector<at::Tensor>& params,
                                const std::vector<at::Tensor>& exp_avgs,
                                const std::vector<at::Tensor>& exp_avg_sqs,
                                const std::vector<at::Tensor>& grads,
                                const std::vector<at::Tensor>& masks,
                                const std::vector<at::Tensor>& dirty,
                                const std::vector<at::Tensor>& steps,
                                const std::vector<at::Tensor>& dense_params,
                                const std::vector<at::Tensor>& dense_grads,
                                const std::vector<at::Tensor>& dense_exp_avgs,
                                const std::vector<at::Tensor>& dense_exp_avg_sqs,
                                const std::vector<at::Tensor>& dense_steps, double lr,
                                double beta1, double beta2, double eps, double weight_decay) {
  return msbp::lazy_row_adam_step_(params, exp_avgs, exp_avg_sqs, grads, masks, dirty, steps,
                                   dense_params, dense_grads, dense_exp_avgs, dense_exp_avg_sqs,
                                   dense_steps, lr, beta1, beta2, eps, weight_decay);
}

std::vector<int64_t> zero_lists(const std::vector<at::Tensor>& grads,
                                const std::vector<at::Tensor>& dirty,
                                const std::vector<at::Tensor>& pending) {
  return msbp::zero_masked_rows_(grads, dirty, pending);
}

// torch.set_flush_denormal sets the calling thread's MXCSR only; intra-op threads started
// before keep theirs (their denormals stay slow), and those started after inherit it (and keep it
// after the caller's setting is undone). With `on`, set flush-to-zero and denormals-are-zero on
// every intra-op thread (one at::parallel_for task each); returns each thread's state after.
// Empty off x86-64.
std::vector<bool> flush_denormal_threads(std::optional<bool> on) {
  const int64_t n = at::get_num_threads();
  std::vector<char> state(n, 0);
#if defined(__x86_64__) || defined(_M_X64)
  constexpr unsigned kBits = 0x8040;  // FTZ | DAZ
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (on.has_value()) _mm_setcsr(*on ? (_mm_getcsr() | kBits) : (_mm_getcsr() & ~kBits));
      state[t] = (_mm_getcsr() & kBits) == kBits;
    }
  });
  return std::vector<bool>(state.begin(), state.end());
#else
  (void)on;
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // PyTorch's own wrapping: c10 errors and warnings become Python's (as through torch.ops:
  // ValueError for TORCH_CHECK_VALUE, no C++ backtrace), and the GIL is released in the call
  m.def("sparse_linear_fast", torch::wrap_pybind_function_no_gil(&msbp::sparse_linear_fast));
  m.def("sparse_embedding_linear_fast",
        torch::wrap_pybind_function_no_gil(&msbp::sparse_embedding_linear_fast));
  m.def("place_grad_rows_", torch::wrap_pybind_function_no_gil(&msbp::place_grad_rows_));
  m.def("lstm_recurrence_backward_eager",
        torch::wrap_pybind_function_no_gil(&msbp::lstm_recurrence_backward_eager));
  m.def("lazy_row_adam_step_", torch::wrap_pybind_function_no_gil(&step_lists));
  m.def("zero_masked_rows_", torch::wrap_pybind_function_no_gil(&zero_lists));
  m.def("flush_denormal_threads", torch::wrap_pybind_function_no_gil(&flush_denormal_threads),
        pybind11::arg("on") = pybind11::none());
}
