// Python bindings of rlhf_engine._C: one m.def line per op. Pointers are passed as integers
// (tensor.data_ptr()); the wrappers in kernels/native.py check every argument first.
#include <pybind11/pybind11.h>

#include "ops.h"
#include "ppo_math.h"

namespace py = pybind11;
using namespace rlhf;

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
  m.def("ppo_loss_backward_cpu", &ppo_loss_backward_cpu, "PPO loss backward: grads x row scale x grad (C++)", nogil);
#ifdef RLHF_WITH_CUDA
  m.def("gae_forward_cuda", &gae_forward_cuda, "GAE forward (CUDA, block scan per row)", nogil);
  m.def("gae_backward_cuda", &gae_backward_cuda, "GAE backward (CUDA, block scan per row)", nogil);
  m.def("ppo_loss_forward_cuda", &ppo_loss_forward_cuda, "PPO loss: loss, metrics, grads (CUDA, 2 launches)", nogil);
  m.def("ppo_loss_backward_cuda", &ppo_loss_backward_cuda, "PPO loss backward (CUDA, 1 launch)", nogil);
#endif
}
