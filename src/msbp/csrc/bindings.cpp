// The Python module of the native library: direct bindings of the eager entry points (see
// bindings.h). The ops themselves are registered by their own sources (TORCH_LIBRARY_FRAGMENT).
#include "bindings.h"

#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstring>

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
                                double beta1, double beta2, double eps, double weight_decay,
                                bool decoupled_weight_decay) {
  return msbp::lazy_row_adam_step_(params, exp_avgs, exp_avg_sqs, grads, masks, dirty, steps,
                                   dense_params, dense_grads, dense_exp_avgs, dense_exp_avg_sqs,
                                   dense_steps, lr, beta1, beta2, eps, weight_decay,
                                   decoupled_weight_decay);
}

int64_t clear_lists(const std::vector<at::Tensor>& bufs, const std::vector<at::Tensor>& states) {
  return msbp::clear_kept_rows_(bufs, states);
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

// `obj` as an optional tensor: None -> nullopt; false where it is neither
bool optional_tensor(PyObject* obj, std::optional<at::Tensor>* out) {
  if (obj == Py_None) return true;
  if (!THPVariable_Check(obj)) return false;
  *out = THPVariable_Unpack(obj);
  return true;
}

// SparseLinear's repeated call (msbp.functional.sparse_linear_fast_call, after its checks of the
// global state): msbp::sparse_linear_fast with the weight's kept gradient buffer and row mask,
// looked up as msbp.functional._fast_args does, or None wherever that lookup would do more than
// read them (no buffer yet, one to replace or to make, a row log to drop, a mask to make, a
// weight that is no leaf Parameter) or the call would not take the C++ path (another device or
// dtype, no gradient wanted, a TorchDispatchMode): the caller then takes that path. (In
// msbp train's MNIST loop the two sparse layers' forward took 28-31 us a step less this way:
// benchmarks/bench_train_loop.py, README.)
// settings: (k, selection, alpha, slot, skip_nonfinite, csr_ratio, name, all_rows).
pybind11::object sparse_linear_try(pybind11::handle x_obj, pybind11::handle w_obj,
                                   pybind11::handle b_obj, pybind11::handle m_obj,
                                   pybind11::tuple settings) {
  static PyObject* kKept = PyUnicode_InternFromString("_msbp_kept_grad_buffer");
  static PyObject* kLog = PyUnicode_InternFromString("_msbp_rows");
  static PyObject* kTrack = PyUnicode_InternFromString("_msbp_track_rows");
  static PyObject* kMask = PyUnicode_InternFromString("_msbp_row_mask");
  pybind11::object none = pybind11::none();
  if (!THPVariable_Check(x_obj.ptr()) || !THPVariable_Check(w_obj.ptr()) ||
      settings.size() != 8 || c10::impl::TorchDispatchModeTLS::stack_len() > 0)
    return none;
  const at::Tensor& x = THPVariable_Unpack(x_obj.ptr());
  const at::Tensor& w = THPVariable_Unpack(w_obj.ptr());
  std::optional<at::Tensor> bias, memory;
  if (!optional_tensor(b_obj.ptr(), &bias) || !optional_tensor(m_obj.ptr(), &memory)) return none;
  const auto dtype = x.scalar_type();
  if (!x.device().is_cpu() || !w.device().is_cpu() || dtype != w.scalar_type() ||
      (dtype != at::kFloat && dtype != at::kDouble) || x.dim() < 1 || w.dim() != 2 ||
      x.size(-1) != w.size(1))
    return none;
  if (!at::GradMode::is_enabled() || !w.requires_grad() || !w.is_leaf() || w.is_view())
    return none;
  auto dict = pybind11::reinterpret_steal<pybind11::object>(
      PyObject_GenericGetDict(w_obj.ptr(), nullptr));
  if (!dict) throw pybind11::error_already_set();
  PyObject* d = dict.ptr();
  PyObject* kept = PyDict_GetItemWithError(d, kKept);  // borrowed
  if (kept == nullptr || !PyTuple_Check(kept) || PyTuple_GET_SIZE(kept) < 2 ||
      !THPVariable_Check(PyTuple_GET_ITEM(kept, 0)) || !THPVariable_Check(PyTuple_GET_ITEM(kept, 1)))
    return PyErr_Occurred() ? throw pybind11::error_already_set() : none;
  PyObject* buf_obj = PyTuple_GET_ITEM(kept, 0);
  at::Tensor buf = THPVariable_Unpack(buf_obj);  // (one C++ holder, as held_in_python counts)
  if (!w.grad().defined()) {
    // msbp.functional.kept_grad_buffer puts the buffer back as it is only where no row log
    // is to be dropped and nobody else holds it
    if (PyDict_GetItemWithError(d, kLog) != nullptr || PyErr_Occurred())
      return PyErr_Occurred() ? throw pybind11::error_already_set() : none;
    if (msbp::kept_held_in_python(buf) || buf.sizes() != w.sizes() ||
        buf.scalar_type() != w.scalar_type())
      return none;
  }
  std::optional<at::Tensor> mask;
  PyObject* track = PyDict_GetItemWithError(d, kTrack);
  if (track != nullptr && track != Py_None) {  // msbp.ops.touched_rows.rows_mask
    auto owner = pybind11::reinterpret_steal<pybind11::object>(PyObject_CallNoArgs(track));
    if (!owner) throw pybind11::error_already_set();
    if (!owner.is_none()) {
      PyObject* m = PyDict_GetItemWithError(d, kMask);
      if (m == nullptr || !THPVariable_Check(m))
        return PyErr_Occurred() ? throw pybind11::error_already_set() : none;
      const at::Tensor& mt = THPVariable_Unpack(m);
      if (!mt.device().is_cpu() || mt.numel() != w.size(0)) return none;
      mask = mt;
    }
  } else if (PyErr_Occurred()) {
    throw pybind11::error_already_set();
  }
  // .grad None: the rows marked into a gradient since discarded take no step, also where no
  // backward of the layer comes to forget them (msbp.ops.touched_rows.forget_touched_rows)
  if (mask.has_value() && !w.grad().defined() && !msbp::mask_marked_in_this_pass(*mask)) {
    if (mask->is_contiguous() && mask->scalar_type() == at::kByte)
      std::memset(mask->data_ptr(), 0, mask->numel());
    else
      mask->zero_();
  }
  const int64_t k = settings[0].cast<int64_t>(), selection = settings[1].cast<int64_t>();
  const double alpha = settings[2].cast<double>(), csr_ratio = settings[5].cast<double>();
  const bool slot = settings[3].cast<bool>(), skip = settings[4].cast<bool>(),
             all_rows = settings[7].cast<bool>();
  std::string name = settings[6].cast<std::string>();
  at::Tensor state = THPVariable_Unpack(PyTuple_GET_ITEM(kept, 1));
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = msbp::sparse_linear_fast(x, w, bias, memory, buf, state, mask, k, selection, alpha, slot,
                                 skip, csr_ratio, std::move(name), all_rows, std::nullopt);
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(y)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // PyTorch's own wrapping: c10 errors and warnings become Python's (as through torch.ops:
  // ValueError for TORCH_CHECK_VALUE, no C++ backtrace), and the GIL is released in the call
  m.def("sparse_linear_fast", torch::wrap_pybind_function_no_gil(&msbp::sparse_linear_fast));
  m.def("sparse_linear_try", torch::wrap_pybind_function(&sparse_linear_try));
  m.def("sparse_embedding_linear_fast",
        torch::wrap_pybind_function_no_gil(&msbp::sparse_embedding_linear_fast));
  m.def("place_grad_rows_", torch::wrap_pybind_function_no_gil(&msbp::place_grad_rows_));
  m.def("clear_kept_rows_", torch::wrap_pybind_function_no_gil(&clear_lists));
  m.def("mask_marked_in_this_pass",
        torch::wrap_pybind_function_no_gil(&msbp::mask_marked_in_this_pass));
  m.def("lstm_recurrence_forward",
        torch::wrap_pybind_function_no_gil(&msbp::lstm_recurrence_forward));
  m.def("lstm_recurrence_backward_eager",
        torch::wrap_pybind_function_no_gil(&msbp::lstm_recurrence_backward_eager));
  m.def("lazy_row_adam_step_", torch::wrap_pybind_function_no_gil(&step_lists));
  m.def("zero_masked_rows_", torch::wrap_pybind_function_no_gil(&zero_lists));
  m.def("flush_denormal_threads", torch::wrap_pybind_function_no_gil(&flush_denormal_threads),
        pybind11::arg("on") = pybind11::none());
}
