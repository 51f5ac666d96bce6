// Torch-side wrappers of the CUDA kernels: check the tensors, bring awkward layouts into
// ones the kernels read (a copy for inputs; a temporary plus copy_ for outputs), and call the
// C-ABI launchers on torch's current stream. Registered as firp_engine._C.cuda_<op> by
// register_cuda(), which csrc/bindings.cpp calls when the extension is built with CUDA.
//
// Each wrapper has the argument list of its reference in firp_engine/ops.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "launchers.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

FirpDtype dtype_of(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kBFloat16) return FIRP_BF16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "firp cuda: ", name, " must be bfloat16 or float32, got ",
              t.scalar_type());
  return FIRP_F32;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "firp cuda: ", name, " must be a CUDA tensor");
}

// Every tensor an op reads or writes on the device of its first argument (else a kernel would
// dereference host or foreign memory).
void check_device(const at::Tensor& first, std::initializer_list<const at::Tensor*> others, const char* op) {
  for (const at::Tensor* t : others)
    TORCH_CHECK(t->device() == first.device(), "firp cuda ", op, ": all tensors must be on ", first.device(),
                ", got one on ", t->device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "firp cuda ", op, ": ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int sm_count() {
  int device = 0, n = 0;
  check_launch(cudaGetDevice(&device), "cudaGetDevice");
  check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return n;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Vector loads need 16-byte-aligned rows: the base aligned, the last dim contiguous, every
// other stride a multiple of 16 bytes.
bool packable(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (t.stride(-1) != 1 || !aligned16(t)) return false;
  const int64_t pack = 16 / t.element_size();
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) % pack != 0) return false;
  return true;
}

// A fresh contiguous (hence aligned) copy unless `t` already fits the vector loads.
at::Tensor packed(const at::Tensor& t) { return packable(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

// Rows with a contiguous last dim (for the scalar-load kernels).
at::Tensor rows_of(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Where a kernel writes its result: `out` itself when it has the dtype and layout asked for,
// else a temporary that finish() copies into `out` (as the reference's out.copy_ would).
struct Output {
  at::Tensor result;  // what the op returns
  at::Tensor target;  // what the kernel writes

  Output(const OptTensor& out, at::IntArrayRef sizes, const at::TensorOptions& options, bool need_contiguous) {
    if (!out.has_value()) {
      result = target = at::empty(sizes, options);
      return;
    }
    result = *out;
    TORCH_CHECK(result.sizes() == sizes, "firp cuda: out has shape ", result.sizes(), ", expected ", sizes);
    const bool fits = result.scalar_type() == options.dtype().toScalarType() && result.device() == options.device() &&
                      (need_contiguous ? result.is_contiguous() && aligned16(result) : result.stride(-1) == 1);
    target = fits ? result : at::empty(sizes, options);
  }

  at::Tensor finish() {
    if (!target.is_same(result)) result.copy_(target);
    return result;
  }
};

FirpPagedKV paged_kv(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "firp cuda: caches must be [num_blocks, block_size, kv_heads, head_dim], alike");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && packable(k_cache) && packable(v_cache),
              "firp cuda: k and v caches need equal strides, a contiguous head dim and 16-byte alignment");
  return FirpPagedKV{k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                     k_cache.stride(2), static_cast<int>(k_cache.size(1))};
}

// ------------------------------------------------------------------ norms / elementwise

at::Tensor cuda_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, OptTensor out) {
  check_cuda(x, "x");
  check_device(x, {&weight}, "rms_norm");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1),
              "firp cuda rms_norm: x [T, d], weight [d]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "firp cuda rms_norm: weight dtype must match x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xr = rows_of(x), w = weight.contiguous();
  Output o(out, x.sizes(), x.options(), false);
  check_launch(launch_rms_norm(dtype_of(x, "x"), xr.data_ptr(), xr.stride(0), w.data_ptr(), o.target.data_ptr(),
                               o.target.stride(0), static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
                               static_cast<float>(eps), stream()),
               "rms_norm");
  return o.finish();
}

std::tuple<at::Tensor, at::Tensor> cuda_add_rms_norm(const at::Tensor& x, at::Tensor residual,
                                                     const at::Tensor& weight, double eps) {
  check_cuda(x, "x");
  check_device(x, {&residual, &weight}, "add_rms_norm");
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "firp cuda add_rms_norm: x, residual [T, d], weight [d]");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "firp cuda add_rms_norm: x, residual and weight must share a dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  if (residual.stride(-1) != 1) {  // the in-place add cannot go through the kernel
    residual.add_(x);
    return {cuda_rms_norm(residual, weight, eps, std::nullopt), residual};
  }
  const at::Tensor xr = rows_of(x), w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  check_launch(launch_add_rms_norm(dtype_of(x, "x"), xr.data_ptr(), xr.stride(0), residual.data_ptr(),
                                   residual.stride(0), w.data_ptr(), out.data_ptr(), out.stride(0),
                                   static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
                                   static_cast<float>(eps), stream()),
               "add_rms_norm");
  return {out, residual};
}

std::tuple<at::Tensor, at::Tensor> cuda_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                             const at::Tensor& cos, const at::Tensor& sin) {
  check_cuda(q, "q");
  check_device(q, {&k, &positions, &cos, &sin}, "rope");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "firp cuda rope: q [T, H, D], k [T, Hkv, D]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "firp cuda rope: q and k must share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(1) * 2 == q.size(2),
              "firp cuda rope: cos/sin must be float32 [max_pos, D / 2]");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qr = rows_of(q), kr = rows_of(k);
  const at::Tensor pos = positions.to(at::kLong).contiguous(), c = cos.contiguous(), s = sin.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  check_launch(launch_rope(dtype_of(q, "q"), qr.data_ptr(), qr.stride(0), qr.stride(1), kr.data_ptr(), kr.stride(0),
                           kr.stride(1), pos.data_ptr<int64_t>(), c.data_ptr<float>(), s.data_ptr<float>(),
                           q_out.data_ptr(), k_out.data_ptr(), static_cast<int>(q.size(0)),
                           static_cast<int>(q.size(1)), static_cast<int>(k.size(1)), static_cast<int>(q.size(2)),
                           stream()),
               "rope");
  return {q_out, k_out};
}

at::Tensor cuda_silu_mul(const at::Tensor& gate_up, OptTensor out) {
  check_cuda(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "firp cuda silu_mul: gate_up [T, 2F]");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor g = rows_of(gate_up);
  const int64_t ffn = g.size(1) / 2;
  Output o(out, {g.size(0), ffn}, g.options(), false);
  check_launch(launch_silu_mul(dtype_of(g, "gate_up"), g.data_ptr(), g.stride(0), o.target.data_ptr(),
                               o.target.stride(0), static_cast<int>(g.size(0)), static_cast<int>(ffn), stream()),
               "silu_mul");
  return o.finish();
}

// ------------------------------------------------------------------ KV cache writes

void cuda_write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& slots) {
  check_cuda(k_cache, "k_cache");
  check_device(k_cache, {&v_cache, &k, &v, &slots}, "write_kv");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k.dim() == 3 && v.sizes() == k.sizes() &&
                  k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3) && slots.numel() == k.size(0),
              "firp cuda write_kv: caches [NB, BS, Hkv, D], k/v [T, Hkv, D], slots [T]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && aligned16(k_cache) && aligned16(v_cache),
              "firp cuda write_kv: caches must be contiguous and 16-byte aligned");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "firp cuda write_kv: k/v caches must share a dtype");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor kk = packed(k.to(k_cache.scalar_type())), vv = packed(v.to(k_cache.scalar_type()));
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  check_launch(launch_write_kv(dtype_of(k_cache, "k_cache"), k_cache.data_ptr(), v_cache.data_ptr(), kk.data_ptr(),
                               kk.stride(0), kk.stride(1), vv.data_ptr(), vv.stride(0), vv.stride(1),
                               sl.data_ptr<int64_t>(), static_cast<int>(k.size(0)), static_cast<int>(k.size(1)),
                               static_cast<int>(k.size(2)), stream()),
               "write_kv");
}

void cuda_kv_commit(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_scratch, const at::Tensor& v_scratch,
                    const at::Tensor& src_rows, const at::Tensor& dst_slots) {
  check_cuda(k_cache, "k_cache");
  check_device(k_cache, {&v_cache, &k_scratch, &v_scratch, &src_rows, &dst_slots}, "kv_commit");
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes() && k_scratch.dim() == 4 &&
                  v_scratch.sizes() == k_scratch.sizes() && k_scratch.size(0) == k_cache.size(0) &&
                  k_scratch.size(2) == k_cache.size(3) && k_scratch.size(3) == k_cache.size(4) &&
                  src_rows.numel() == dst_slots.numel(),
              "firp cuda kv_commit: caches [L, NB, BS, Hkv, D], scratch [L, S, Hkv, D], src_rows/dst_slots [m]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && aligned16(k_cache) && aligned16(v_cache),
              "firp cuda kv_commit: caches must be contiguous and 16-byte aligned");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "firp cuda kv_commit: k/v caches must share a dtype");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  // Rows of the scratch must be contiguous [Hkv * D] runs with matching strides for k and v.
  at::Tensor ks = k_scratch.to(k_cache.scalar_type()), vs = v_scratch.to(k_cache.scalar_type());
  const auto row_contiguous = [](const at::Tensor& t) {
    return t.stride(3) == 1 && t.stride(2) == t.size(3) && packable(t);
  };
  if (!row_contiguous(ks) || !row_contiguous(vs) || ks.strides() != vs.strides()) {
    ks = ks.clone(at::MemoryFormat::Contiguous);
    vs = vs.clone(at::MemoryFormat::Contiguous);
  }
  const at::Tensor src = src_rows.to(at::kLong).contiguous(), dst = dst_slots.to(at::kLong).contiguous();
  check_launch(launch_kv_commit(dtype_of(k_cache, "k_cache"), k_cache.data_ptr(), v_cache.data_ptr(),
                                k_cache.stride(0), ks.data_ptr(), vs.data_ptr(), ks.stride(0), ks.stride(1),
                                src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), static_cast<int>(k_cache.size(0)),
                                static_cast<int>(src.numel()), static_cast<int>(k_cache.size(3) * k_cache.size(4)),
                                stream()),
               "kv_commit");
}

// ------------------------------------------------------------------ FIRP projection

at::Tensor cuda_firp_project(const at::Tensor& h, const at::Tensor& weight, const OptTensor& bias, OptTensor out) {
  check_cuda(h, "h");
  check_device(h, {&weight}, "firp_project");
  if (bias.has_value()) check_device(h, {&*bias}, "firp_project");
  TORCH_CHECK(h.dim() == 2 && weight.dim() == 3 && weight.size(1) == h.size(1) && weight.size(2) == h.size(1),
              "firp cuda firp_project: h [n, d], weight [k, d, d]");
  TORCH_CHECK(h.size(1) % 8 == 0, "firp cuda firp_project: d must be a multiple of 8");
  const int64_t n = h.size(0), k = weight.size(0), d = h.size(1);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hh = packed(h), w = packed(weight.contiguous());
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == k * d, "firp cuda firp_project: bias must be [k, d]");
    b = bias->to(at::kFloat).contiguous();
  }
  Output o(out, {n * k, d}, h.options(), false);
  check_launch(launch_firp_project(dtype_of(h, "h"), dtype_of(weight, "weight"), hh.data_ptr(), hh.stride(0),
                                   w.data_ptr(), b.defined() ? b.data_ptr<float>() : nullptr, o.target.data_ptr(),
                                   o.target.stride(0), static_cast<int>(n), static_cast<int>(k),
                                   static_cast<int>(d), stream()),
               "firp_project");
  return o.finish();
}

// ------------------------------------------------------------------ attention

void check_attention_dims(int64_t heads, int64_t kv_heads, int64_t head_dim, const char* op) {
  TORCH_CHECK(firp_attention_head_dim_supported(static_cast<int>(head_dim)), "firp cuda ", op,
              ": head_dim ", head_dim, " is not built (64 or 128)");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= firp_attention_max_group(), "firp cuda ",
              op, ": heads ", heads, " / kv_heads ", kv_heads, " is not a supported group");
}

at::Tensor cuda_paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& page_tables, const at::Tensor& context_lens, double scale,
                                       OptTensor out) {
  check_cuda(q, "q");
  check_device(q, {&k_cache, &v_cache, &page_tables, &context_lens}, "paged_decode_attention");
  TORCH_CHECK(q.dim() == 3 && page_tables.dim() == 2 && page_tables.size(0) == q.size(0) &&
                  context_lens.numel() == q.size(0),
              "firp cuda paged_decode_attention: q [B, H, D], page_tables [B, P], context_lens [B]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "firp cuda paged_decode_attention: q and the caches must share a dtype");
  const FirpPagedKV kv = paged_kv(k_cache, v_cache);
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "firp cuda paged_decode_attention: head_dim of q and caches differ");
  check_attention_dims(heads, kv_heads, head_dim, "paged_decode_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qq = q.is_contiguous() && aligned16(q) ? q : q.clone(at::MemoryFormat::Contiguous);
  const at::Tensor pt = page_tables.to(at::kInt), ptr = rows_of(pt);
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  Output o(out, q.sizes(), q.options(), true);
  if (batch == 0) return o.finish();

  // The plan uses the page table's width as the longest context: no device-to-host sync.
  int num_splits = 1, split_tokens = 1;
  firp_decode_plan(static_cast<int>(batch), static_cast<int>(kv_heads),
                   static_cast<int>(ptr.size(1) * k_cache.size(1)), sm_count(), &num_splits, &split_tokens);
  at::Tensor part_o, part_lse;
  if (num_splits > 1) {
    part_o = at::empty({batch * heads, num_splits, head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({batch * heads, num_splits}, q.options().dtype(at::kFloat));
  }
  check_launch(launch_paged_decode_attention(
                   dtype_of(q, "q"), qq.data_ptr(), kv, ptr.data_ptr<int32_t>(), ptr.stride(0),
                   lens.data_ptr<int32_t>(), static_cast<int>(batch), static_cast<int>(heads),
                   static_cast<int>(kv_heads), static_cast<int>(head_dim), static_cast<float>(scale), num_splits,
                   split_tokens, o.target.data_ptr(), num_splits > 1 ? part_o.data_ptr<float>() : nullptr,
                   num_splits > 1 ? part_lse.data_ptr<float>() : nullptr, stream()),
               "paged_decode_attention");
  return o.finish();
}

at::Tensor cuda_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& page_table, int64_t prefix_len, const at::Tensor& k_new,
                               const at::Tensor& v_new, const at::Tensor& mask_bits, double scale, OptTensor out) {
  check_cuda(q, "q");
  check_device(q, {&k_cache, &v_cache, &page_table, &k_new, &v_new, &mask_bits}, "tree_attention");
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.sizes() == k_new.sizes() && mask_bits.dim() == 2 &&
                  mask_bits.size(0) == q.size(0),
              "firp cuda tree_attention: q [T, H, D], k_new/v_new [S, Hkv, D], mask_bits [T, W]");
  TORCH_CHECK(mask_bits.scalar_type() == at::kLong, "firp cuda tree_attention: mask_bits must be int64");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  k_new.scalar_type() == q.scalar_type() && v_new.scalar_type() == q.scalar_type(),
              "firp cuda tree_attention: q, caches and new rows must share a dtype");
  const FirpPagedKV kv = paged_kv(k_cache, v_cache);
  const int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = k_cache.size(2);
  const int64_t scratch_len = k_new.size(0);
  TORCH_CHECK(k_cache.size(3) == head_dim && k_new.size(1) == kv_heads && k_new.size(2) == head_dim,
              "firp cuda tree_attention: heads / head_dim of q, caches and new rows differ");
  TORCH_CHECK(mask_bits.size(1) * 64 >= scratch_len, "firp cuda tree_attention: mask_bits has too few words");
  TORCH_CHECK(prefix_len >= 0 && prefix_len + scratch_len > 0, "firp cuda tree_attention: no keys to attend to");
  TORCH_CHECK(prefix_len <= page_table.numel() * k_cache.size(1), "firp cuda tree_attention: prefix_len ",
              prefix_len, " exceeds the page table");
  check_attention_dims(heads, kv_heads, head_dim, "tree_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qq = q.contiguous(), mask = mask_bits.contiguous();
  const at::Tensor pt = page_table.to(at::kInt).contiguous();
  at::Tensor kn = packed(k_new), vn = packed(v_new);
  if (kn.strides() != vn.strides()) {
    kn = kn.clone(at::MemoryFormat::Contiguous);
    vn = vn.clone(at::MemoryFormat::Contiguous);
  }
  Output o(out, q.sizes(), q.options(), true);
  if (rows == 0) return o.finish();

  int num_splits = 1, prefix_splits = 0, split_tokens = 64;
  firp_tree_plan(static_cast<int>(rows), static_cast<int>(heads), static_cast<int>(kv_heads),
                 static_cast<int>(prefix_len), static_cast<int>(scratch_len), sm_count(), &num_splits, &prefix_splits,
                 &split_tokens);
  at::Tensor part_o, part_lse;
  if (num_splits > 1) {
    part_o = at::empty({rows * heads, num_splits, head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({rows * heads, num_splits}, q.options().dtype(at::kFloat));
  }
  check_launch(launch_tree_attention(
                   dtype_of(q, "q"), qq.data_ptr(), kv, pt.data_ptr<int32_t>(), static_cast<int>(prefix_len),
                   kn.data_ptr(), vn.data_ptr(), kn.stride(0), kn.stride(1), static_cast<int>(scratch_len),
                   reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()), static_cast<int>(mask.size(1)),
                   static_cast<int>(rows), static_cast<int>(heads), static_cast<int>(kv_heads),
                   static_cast<int>(head_dim), static_cast<float>(scale), num_splits, prefix_splits, split_tokens,
                   o.target.data_ptr(), num_splits > 1 ? part_o.data_ptr<float>() : nullptr,
                   num_splits > 1 ? part_lse.data_ptr<float>() : nullptr, stream()),
               "tree_attention");
  return o.finish();
}

}  // namespace

void register_cuda(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cuda_rms_norm", &cuda_rms_norm, "RMSNorm (CUDA)", py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("out") = py::none());
  m.def("cuda_add_rms_norm", &cuda_add_rms_norm, "residual += x; RMSNorm (CUDA)", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"));
  m.def("cuda_rope", &cuda_rope, "rotate-half RoPE (CUDA)", py::arg("q"), py::arg("k"), py::arg("positions"),
        py::arg("cos"), py::arg("sin"));
  m.def("cuda_silu_mul", &cuda_silu_mul, "silu(gate) * up (CUDA)", py::arg("gate_up"), py::arg("out") = py::none());
  m.def("cuda_write_kv", &cuda_write_kv, "write one layer's new K/V into the pages (CUDA)", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("slots"));
  m.def("cuda_kv_commit", &cuda_kv_commit, "move accepted scratch rows into the pages, all layers (CUDA)",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scratch"), py::arg("v_scratch"), py::arg("src_rows"),
        py::arg("dst_slots"));
  m.def("cuda_firp_project", &cuda_firp_project, "FIRP pseudo rows for all nodes (CUDA)", py::arg("h"),
        py::arg("weight"), py::arg("bias"), py::arg("out") = py::none());
  m.def("cuda_paged_decode_attention", &cuda_paged_decode_attention, "paged decode attention, split-K (CUDA)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("page_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("out") = py::none());
  m.def("cuda_tree_attention", &cuda_tree_attention, "paged prefix + masked scratch attention (CUDA)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("page_table"), py::arg("prefix_len"), py::arg("k_new"),
        py::arg("v_new"), py::arg("mask_bits"), py::arg("scale"), py::arg("out") = py::none());
}
