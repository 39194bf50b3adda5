// The eager entry points that Python calls directly (bindings.cpp), beside their registration as
// torch.ops.msbp ops (only here: lstm_recurrence_backward_eager, which may overwrite an input,
// and lstm_recurrence_forward, ATen ops only, which a traced region runs as the Python loop): a
// pybind11 call converts its arguments in about 1 us where the dispatcher's boxed call from
// Python took 4 us more for the sparse layer's 15, and 15 us more for LazyRowAdam's step with its
// 12 lists (MNIST's MLP, one thread).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace msbp {

at::Tensor sparse_linear_fast(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& memory, const at::Tensor& kept,
                              const at::Tensor& state, const std::optional<at::Tensor>& mask,
                              int64_t k, int64_t selection, double alpha, bool slot,
                              bool skip_nonfinite, double csr_ratio, std::string name,
                              bool all_rows, const std::optional<at::Tensor>& owner);

at::Tensor sparse_embedding_linear_fast(
    const at::Tensor& ids, const at::Tensor& table, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& memory,
    const at::Tensor& kept, const at::Tensor& state, const std::optional<at::Tensor>& mask,
    int64_t k, int64_t selection, double alpha, bool slot, bool skip_nonfinite, double csr_ratio,
    std::string name, bool all_rows, const std::optional<at::Tensor>& owner);

int64_t clear_kept_rows_(at::TensorList bufs, at::TensorList states);

// Whether Python code holds a kept gradient buffer beyond msbp's own reference (the caller holds
// `buf` once in C++); see held_in_python in sparse_linear.cpp. Takes the GIL.
bool kept_held_in_python(const at::Tensor& buf);

// Whether the C++ path marked rows in a weight's row mask during the backward pass running in
// this thread (msbp.ops.touched_rows.forget_touched_rows: such marks are no discarded gradient's,
// though .grad is still None until autograd writes it at the end of the pass).
bool mask_marked_in_this_pass(const at::Tensor& mask);

int64_t place_grad_rows_(const at::Tensor& weight, const at::Tensor& kept,
                         const at::Tensor& state, const at::Tensor& rows,
                         const at::Tensor& values);

// msbp::lstm_recurrence_backward, and with overwrite_act the gate gradients written over act
// (see recurrent.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_recurrence_backward_eager(
    const at::Tensor& act, const at::Tensor& cells, const at::Tensor& tanh_c,
    const at::Tensor& out, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& d_out, const std::optional<at::Tensor>& d_hn,
    const std::optional<at::Tensor>& d_cn, const std::optional<at::Tensor>& memory,
    const std::optional<at::Tensor>& random_cols, int64_t k, int64_t selection, double alpha,
    bool slot, bool reverse, bool need_w, bool skip_nonfinite, bool all_rows,
    bool overwrite_act);

// the forward recurrence of one LSTM layer and direction: (act, cells, tanh_c, out)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_forward(
    const at::Tensor& gates_x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, bool reverse, bool packed);

std::vector<int64_t> lazy_row_adam_step_(
    at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList grads, at::TensorList masks, at::TensorList dirty, at::TensorList steps,
    at::TensorList dense_params, at::TensorList dense_grads, at::TensorList dense_exp_avgs,
    at::TensorList dense_exp_avg_sqs, at::TensorList dense_steps, double lr, double beta1,
    double beta2, double eps, double weight_decay, bool decoupled_weight_decay);

std::vector<int64_t> zero_masked_rows_(at::TensorList grads, at::TensorList dirty,
                                       at::TensorList pending);

}  // namespace msbp
