// Python bindings of rlhf_engine._C: one m.def line per op. Pointers are passed as integers
// (tensor.data_ptr()); the wrappers in kernels/native.py check every argument first.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "ops.h"
#include "ppo_math.h"

namespace py = pybind11;
using namespace rlhf;

namespace {

// One ppo_loss_with_grads call: the cached hyperparameters `cfg` (a PpoLossArgs whose pointers are unused;
// max_len <= 0 means T) plus this call's pointers, sizes and normalizers, as plain positional arguments (the
// cheapest pybind11 call: setting the fields of a PpoLossArgs from Python costs ~0.3 us each); `cuda` picks the
// CUDA op (on `stream`) or the C++ CPU op. workspace: B * (kNumPartials + 1) doubles (row partials, row scales).
void ppo_loss_grads(const PpoLossArgs& cfg, int64_t logp, int64_t old_logp, int64_t advantages, int64_t mask,
                    int64_t values, int64_t old_values, int64_t returns, int64_t ref_logp, int64_t entropy,
                    int64_t grad_logp, int64_t grad_values, int64_t grad_entropy, int64_t workspace, int64_t loss,
                    int64_t metrics, int64_t B, int64_t T, int ntok_mode, double ntok_value, int64_t ntok_ptr,
                    int nseq_mode, double nseq_value, int64_t nseq_ptr, double grad_scale, bool cuda, int64_t stream) {
  PpoLossArgs a = cfg;
  a.logp = logp, a.old_logp = old_logp, a.advantages = advantages, a.mask = mask;
  a.values = values, a.old_values = old_values, a.returns = returns, a.ref_logp = ref_logp, a.entropy = entropy;
  a.grad_logp = grad_logp, a.grad_values = grad_values, a.grad_entropy = grad_entropy;
  a.row_partials = workspace;
  a.row_scale = workspace == 0 ? 0 : workspace + int64_t(sizeof(double)) * B * kNumPartials;
  a.loss = loss, a.metrics = metrics, a.B = B, a.T = T;
  if (a.max_len <= 0.0) a.max_len = double(T);
  a.ntok_mode = ntok_mode, a.ntok_value = ntok_value, a.ntok_ptr = ntok_ptr;
  a.nseq_mode = nseq_mode, a.nseq_value = nseq_value, a.nseq_ptr = nseq_ptr;
  a.stream = stream;
  if (!cuda) {
    ppo_loss_grads_cpu(a, grad_scale);
    return;
  }
#ifdef RLHF_WITH_CUDA
  ppo_loss_grads_cuda(a, grad_scale);
#else
  throw std::invalid_argument("rlhf_engine._C: ppo_loss_grads: built without CUDA");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_engine native ops: GAE and the fused PPO loss (C++/OpenMP and CUDA); see kernels/native.py";
#ifdef RLHF_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef RLHF_WITH_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.attr("ppo_num_partials") = int(kNumPartials);

  py::class_<PpoLossArgs>(m, "PpoLossArgs", "Arguments of ppo_loss_forward_* (see csrc/ppo_math.h)")
      .def(py::init<>())
      .def_readwrite("logp", &PpoLossArgs::logp).def_readwrite("old_logp", &PpoLossArgs::old_logp)
      .def_readwrite("advantages", &PpoLossArgs::advantages).def_readwrite("mask", &PpoLossArgs::mask)
      .def_readwrite("values", &PpoLossArgs::values).def_readwrite("old_values", &PpoLossArgs::old_values)
      .def_readwrite("returns", &PpoLossArgs::returns).def_readwrite("ref_logp", &PpoLossArgs::ref_logp)
      .def_readwrite("entropy", &PpoLossArgs::entropy).def_readwrite("grad_logp", &PpoLossArgs::grad_logp)
      .def_readwrite("grad_values", &PpoLossArgs::grad_values)
      .def_readwrite("grad_entropy", &PpoLossArgs::grad_entropy)
      .def_readwrite("row_partials", &PpoLossArgs::row_partials)
      .def_readwrite("row_scale", &PpoLossArgs::row_scale).def_readwrite("loss", &PpoLossArgs::loss)
      .def_readwrite("metrics", &PpoLossArgs::metrics).def_readwrite("B", &PpoLossArgs::B)
      .def_readwrite("T", &PpoLossArgs::T).def_readwrite("clip_low", &PpoLossArgs::clip_low)
      .def_readwrite("clip_high", &PpoLossArgs::clip_high).def_readwrite("dual_clip", &PpoLossArgs::dual_clip)
      .def_readwrite("value_clip", &PpoLossArgs::value_clip).def_readwrite("vf_coef", &PpoLossArgs::vf_coef)
      .def_readwrite("ent_coef", &PpoLossArgs::ent_coef).def_readwrite("kl_coef", &PpoLossArgs::kl_coef)
      .def_readwrite("kl_kind", &PpoLossArgs::kl_kind).def_readwrite("agg", &PpoLossArgs::agg)
      .def_readwrite("max_len", &PpoLossArgs::max_len).def_readwrite("ntok_mode", &PpoLossArgs::ntok_mode)
      .def_readwrite("nseq_mode", &PpoLossArgs::nseq_mode).def_readwrite("ntok_value", &PpoLossArgs::ntok_value)
      .def_readwrite("nseq_value", &PpoLossArgs::nseq_value).def_readwrite("ntok_ptr", &PpoLossArgs::ntok_ptr)
      .def_readwrite("nseq_ptr", &PpoLossArgs::nseq_ptr).def_readwrite("dtype", &PpoLossArgs::dtype)
      .def_readwrite("stream", &PpoLossArgs::stream);

  const py::call_guard<py::gil_scoped_release> nogil{};  // the ops never touch Python objects
  m.def("gae_forward_cpu", &gae_forward_cpu, "GAE forward (C++, OpenMP over rows)", nogil);
  m.def("gae_backward_cpu", &gae_backward_cpu, "GAE backward (C++, OpenMP over rows)", nogil);
  m.def("ppo_loss_forward_cpu", &ppo_loss_forward_cpu, "PPO loss: loss, metrics, gradients in one pass (C++)", nogil);
  m.def("ppo_loss_grads", &ppo_loss_grads,
        "PPO loss, metrics and the final gradients of grad_scale * loss (C++, or CUDA in 2 launches)", nogil);
  m.def("ppo_loss_backward_cpu", &ppo_loss_backward_cpu, "PPO loss backward: grads x row scale x grad (C++)", nogil);
#ifdef RLHF_WITH_CUDA
  m.def("gae_forward_cuda", &gae_forward_cuda, "GAE forward (CUDA, block scan per row)", nogil);
  m.def("gae_backward_cuda", &gae_backward_cuda, "GAE backward (CUDA, block scan per row)", nogil);
  m.def("ppo_loss_forward_cuda", &ppo_loss_forward_cuda, "PPO loss: loss, metrics, grads (CUDA, 2 launches)", nogil);
  m.def("ppo_loss_backward_cuda", &ppo_loss_backward_cuda, "PPO loss backward (CUDA, 1 launch)", nogil);
#endif
}
