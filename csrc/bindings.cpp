// pybind11 module firp_engine._C: the CPU ops (names and keywords as in firp_engine/ops.py)
// and, in CUDA builds, the CUDA ops under a `cuda_` prefix (registered by csrc/cuda).
#include <torch/csrc/utils/pybind.h>

#include "cpu/cpu_ops.h"

#ifdef FIRP_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace py = pybind11;

namespace {

// The SIMD code path this build compiled in (chosen from the compiler flags).
const char* cpu_isa() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  return "amx";  // AVX-512-BF16 kernels, with the bf16 GEMM on AMX tiles
#elif defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

// One module per SIMD path (_C: portable, plus CUDA; _C_avx2 ...): setup.py names each.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "firp-engine kernels (CPU C++; CUDA ops prefixed cuda_ when built with CUDA)";
  m.attr("cpu_isa") = cpu_isa();
  m.def("cpu_paths", &firp::cpu_paths);
#ifdef FIRP_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  const auto none = py::none();

  m.def("rms_norm", &firp::rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out") = none);
  m.def("add_rms_norm", &firp::add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("eps"));
  m.def("rope", &firp::rope, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("cos"), py::arg("sin"));
  m.def("silu_mul", &firp::silu_mul, py::arg("gate_up"), py::arg("out") = none);
  m.def("pack_linear", &firp::pack_linear, py::arg("weight"));
  m.def("linear", &firp::linear, py::arg("x"), py::arg("weight"), py::arg("packed"));
  m.def("pack_quant", &firp::pack_quant, py::arg("blocks"), py::arg("kind"), py::arg("act") = "q8");
  m.def("write_kv", &firp::write_kv, py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"),
        py::arg("slots"));
  m.def("paged_decode_attention", &firp::paged_decode_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("page_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("out") = none);
  m.def("tree_attention", &firp::tree_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("page_table"), py::arg("prefix_len"), py::arg("k_new"), py::arg("v_new"), py::arg("mask_bits"),
        py::arg("scale"), py::arg("out") = none);
  m.def("firp_project", &firp::firp_project, py::arg("h"), py::arg("weight"), py::arg("bias"),
        py::arg("out") = none);
  // Released GIL: a server's HTTP threads run while the engine thread is in the layers.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<firp::LayerStack>(m, "LayerStack", py::module_local())  // one per variant module
      .def(py::init<std::vector<std::vector<at::Tensor>>, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, double,
                    double>(),
           py::arg("layers"), py::arg("cos"), py::arg("sin"), py::arg("n_heads"), py::arg("n_kv_heads"),
           py::arg("head_dim"), py::arg("eps"), py::arg("scale"))
      .def_property_readonly("n_layers", &firp::LayerStack::n_layers)
      .def("decode", &firp::LayerStack::decode, py::arg("h"), py::arg("positions"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("slots"), py::arg("page_tables"), py::arg("context_lens"), py::arg("start"),
           py::arg("end"), nogil)
      .def("spans", &firp::LayerStack::spans, py::arg("h"), py::arg("positions"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("slots"), py::arg("k_scratch"), py::arg("v_scratch"), py::arg("starts"),
           py::arg("ends"), py::arg("page_tables"), py::arg("prefix_lens"), py::arg("mask_bits"),
           py::arg("scratch_starts"), py::arg("start"), py::arg("end"), nogil);
  m.def("top_lse", &firp::top_lse, py::arg("x"), py::arg("k"));
  m.def("kv_commit", &firp::kv_commit, py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scratch"),
        py::arg("v_scratch"), py::arg("src_rows"), py::arg("dst_slots"));

#ifdef FIRP_WITH_CUDA
  register_cuda(m);
#endif
}
