// Row-wise ops (RMSNorm, residual add + RMSNorm, RoPE, SwiGLU) and the KV-cache copies.
// Where torch stores an intermediate in bf16 (e.g. the normalised x before the weight), the
// kernels round it the same way, so results match the reference to the last bit or two.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

#include "cpu_ops.h"

namespace firp {
namespace {

using namespace simd;
constexpr float LOG2E = 1.4426950408889634f;

template <typename T>
inline vf round_as(vf v) {
  if constexpr (std::is_same_v<T, bf16_t>) return round_bf16(v);
  return v;
}

// Rows per parallel chunk such that a chunk holds at least ~16k elements.
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_len)); }

// dst[0:n] = src[0:n] converted to TD.
template <typename TD, typename TS>
inline void copy_row(TD* dst, const TS* src, int64_t n) {
  if constexpr (std::is_same_v<TD, TS>) {
    std::memcpy(dst, src, n * sizeof(TD));
  } else {
    int64_t i = 0;
    for (; i + W <= n; i += W) store(dst + i, load(src + i));
    for (; i < n; ++i) dst[i] = from_float<TD>(to_float(src[i]));
  }
}

// ------------------------------------------------------------------ RMSNorm

template <typename T>
inline float sum_squares(const T* x, int64_t d) {
  vf acc[4] = {zero(), zero(), zero(), zero()};  // independent chains: not latency-bound
  int64_t i = 0;
  for (; i + 4 * W <= d; i += 4 * W)
    for (int j = 0; j < 4; ++j) {
      const vf v = load(x + i + j * W);
      acc[j] = fma(v, v, acc[j]);
    }
  for (; i + W <= d; i += W) acc[0] = fma(load(x + i), load(x + i), acc[0]);
  float s = hsum(add(add(acc[0], acc[1]), add(acc[2], acc[3])));
  for (; i < d; ++i) s += to_float(x[i]) * to_float(x[i]);
  return s;
}

// y = round_T(x * r) * w, rounded into T: the reference's two roundings.
template <typename T>
inline void scale_row(T* y, const T* x, const T* w, float r, int64_t d) {
  const vf rv = set1(r);
  int64_t i = 0;
  for (; i + W <= d; i += W) store(y + i, mul(round_as<T>(mul(load(x + i), rv)), load(w + i)));
  for (; i < d; ++i) y[i] = from_float<T>(round_to<T>(to_float(x[i]) * r) * to_float(w[i]));
}

// res = round_T(res + x), in place.
template <typename T, typename X>
inline void add_row(T* res, const X* x, int64_t d) {
  int64_t i = 0;
  for (; i + W <= d; i += W) store(res + i, add(load(res + i), load(x + i)));
  for (; i < d; ++i) res[i] = from_float<T>(to_float(res[i]) + to_float(x[i]));
}

// y [rows, d] (contiguous) = RMSNorm(x) for x rows with stride ldx; with `add`, x is first
// replaced by x + a (a [rows, d], row stride lda): the fused residual add.
template <typename T, typename X>
void norm_rows(T* y, T* x, int64_t ldx, const X* a, int64_t lda, const T* w, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * ldx;
      if (a) add_row(xr, a + r * lda, d);
      const float inv = 1.f / std::sqrt(sum_squares(xr, d) / float(d) + eps);
      scale_row(y + r * d, xr, w, inv, d);
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(x, "rms_norm");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must be [", x.size(-1),
              "], got ", weight.sizes());
}

// The reference formula in ATen ops, for what the kernels do not cover (weight and
// activations of different dtypes: the result then has the promoted dtype).
at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  return xf.mul(xf.square().mean(at::IntArrayRef{-1}, true).add(eps).rsqrt()).to(x.scalar_type()).mul(weight);
}

// Writes `res` into `out` when given (the reference's `out=` contract).
at::Tensor into(const OptTensor& out, const at::Tensor& res) {
  if (!out) return res;
  out->copy_(res);
  return *out;
}

// A contiguous buffer for the result: `out` itself when it already is one.
at::Tensor result_buffer(const OptTensor& out, at::IntArrayRef shape, const at::Tensor& like) {
  if (out && out->is_contiguous() && out->sizes() == shape && out->scalar_type() == like.scalar_type())
    return *out;
  return at::empty(shape, like.options());
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps, const OptTensor& out) {
  check_norm(x_in, weight_in);
  if (weight_in.scalar_type() != x_in.scalar_type()) return into(out, rms_norm_aten(x_in, weight_in, eps));
  const int64_t d = x_in.size(-1);
  const at::Tensor x = rows_contig(x_in.reshape({-1, d}));
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor y = result_buffer(out, x_in.sizes(), x_in);
  dispatch_float(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    norm_rows<T, T>(ptr<T>(y), ptr<T>(x), x.stride(0), nullptr, 0, ptr<T>(weight), x.size(0), d, float(eps));
  });
  return into(out, y);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, at::Tensor& residual,
                                                const at::Tensor& weight_in, double eps) {
  check_norm(residual, weight_in);
  TORCH_CHECK(x_in.sizes() == residual.sizes(), "add_rms_norm: x ", x_in.sizes(), " and residual ",
              residual.sizes(), " differ");
  const int64_t d = residual.size(-1);
  if (residual.dim() != 2 || residual.stride(-1) != 1 || weight_in.scalar_type() != residual.scalar_type()) {
    // rare layouts and dtype mixes: the unfused path
    residual.add_(x_in);
    return {rms_norm(residual, weight_in, eps, std::nullopt), residual};
  }
  const at::Tensor x = rows_contig(x_in);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor y = at::empty(residual.sizes(), residual.options());
  dispatch_float(residual, "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    dispatch_float(x, "add_rms_norm", [&](auto xtag) {
      using X = decltype(xtag);
      norm_rows<T, X>(ptr<T>(y), ptr<T>(residual), residual.stride(0), ptr<X>(x), x.stride(0), ptr<T>(weight),
                      residual.size(0), d, float(eps));
    });
  });
  return {y, residual};
}

// ------------------------------------------------------------------ RoPE
namespace {

// out = rotate-half RoPE of one head vector x [D] with cos/sin rows c, s [D/2].
template <typename T>
inline void rope_row(T* out, const T* x, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    const vf x1 = load(x + i), x2 = load(x + half + i), cv = load(c + i), sv = load(s + i);
    store(out + i, sub(mul(x1, cv), mul(x2, sv)));
    store(out + half + i, add(mul(x2, cv), mul(x1, sv)));
  }
  for (; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[half + i]);
    out[i] = from_float<T>(x1 * c[i] - x2 * s[i]);
    out[half + i] = from_float<T>(x2 * c[i] + x1 * s[i]);
  }
}

// x [T, H, D] (strided rows/heads) -> new contiguous tensor, rotated by positions.
at::Tensor rope_one(const at::Tensor& x_in, const int64_t* pos, const float* cos, const float* sin) {
  const at::Tensor x = rows_contig(x_in);
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  at::Tensor out = at::empty({T, H, D}, x.options());
  dispatch_float(x, "rope", [&](auto tag) {
    using E = decltype(tag);
    const E* xp = ptr<E>(x);
    E* op = ptr<E>(out);
    at::parallel_for(0, T * H, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / H, h = r % H;
        rope_row(op + r * D, xp + t * x.stride(0) + h * x.stride(1), cos + pos[t] * half, sin + pos[t] * half,
                 half);
      }
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions_in,
                                        const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_cpu(q, "rope");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(2) % 2 == 0,
              "rope: expected q [T, H, D] and k [T, Hkv, D] with an even D, got ", q.sizes(), " and ", k.sizes());
  const int64_t half = q.size(2) / 2;
  const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == half && sin.sizes() == cos.sizes(), "rope: cos/sin must be [max_pos, ",
              half, "], got ", cos.sizes());
  const at::Tensor positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(positions.numel() == q.size(0), "rope: ", positions.numel(), " positions for ", q.size(0), " tokens");
  const int64_t* pos = ptr<int64_t>(positions);
  for (int64_t t = 0; t < positions.numel(); ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rope: position ", pos[t], " outside the table of ",
                cos.size(0));
  return {rope_one(q, pos, ptr<float>(cos), ptr<float>(sin)), rope_one(k, pos, ptr<float>(cos), ptr<float>(sin))};
}

// ------------------------------------------------------------------ SwiGLU

namespace {

// o = silu(g) * u for W values; silu is rounded to T before the product, as in torch.
template <typename T>
inline void silu_mul_vec(T* o, const T* g, const T* u) {
  const vf gv = load(g);
  const vf e = exp2(mul(gv, set1(-LOG2E)));
  store(o, mul(round_as<T>(mul(gv, recip(add(set1(1.f), e)))), load(u)));
}

}  // namespace

at::Tensor silu_mul(const at::Tensor& gate_up_in, const OptTensor& out) {
  check_cpu(gate_up_in, "silu_mul");
  TORCH_CHECK(gate_up_in.size(-1) % 2 == 0, "silu_mul: last dimension must be even, got ", gate_up_in.sizes());
  const int64_t F = gate_up_in.size(-1) / 2;
  const at::Tensor gu = rows_contig(gate_up_in.reshape({-1, 2 * F}));
  std::vector<int64_t> shape(gate_up_in.sizes().begin(), gate_up_in.sizes().end());
  shape.back() = F;
  at::Tensor y = result_buffer(out, shape, gu);
  dispatch_float(gu, "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* src = ptr<T>(gu);
    T* dst = ptr<T>(y);
    const int64_t ld = gu.stride(0);
    at::parallel_for(0, gu.size(0), row_grain(F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = src + r * ld;
        const T* u = g + F;
        T* o = dst + r * F;
        int64_t i = 0;
        for (; i + 2 * W <= F; i += 2 * W) {  // two independent chains per iteration
          silu_mul_vec(o + i, g + i, u + i);
          silu_mul_vec(o + i + W, g + i + W, u + i + W);
        }
        for (; i + W <= F; i += W) silu_mul_vec(o + i, g + i, u + i);
        for (; i < F; ++i) {
          const float gv = to_float(g[i]);
          o[i] = from_float<T>(round_to<T>(gv / (1.f + std::exp(-gv))) * to_float(u[i]));
        }
      }
    });
  });
  return into(out, y);
}

// ------------------------------------------------------------------ KV cache copies
namespace {

void check_slots(const int64_t* slots, int64_t n, int64_t limit, const char* what) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(slots[i] >= 0 && slots[i] < limit, what, " ", slots[i], " is outside [0, ", limit, ")");
}

// Where the rows come from and go to, for L layers at once.
struct Scatter {
  const int64_t* dst;      // [n] cache slot per row
  const int64_t* src_idx;  // [n] source row per row, or null for 0..n-1
  int64_t n, L, H, D;
  int64_t cache_layer;     // elements between layers of the cache (slots * H * D)
  int64_t src_layer, src_row, src_head;  // source strides (D is contiguous)
};

template <typename C, typename S>
void scatter_rows(C* cache, const S* src, const Scatter& sc) {
  at::parallel_for(0, sc.L * sc.n, row_grain(sc.H * sc.D), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t l = j / sc.n, i = j % sc.n;
      const S* row = src + l * sc.src_layer + (sc.src_idx ? sc.src_idx[i] : i) * sc.src_row;
      C* out = cache + l * sc.cache_layer + sc.dst[i] * sc.H * sc.D;
      for (int64_t h = 0; h < sc.H; ++h) copy_row(out + h * sc.D, row + h * sc.src_head, sc.D);
    }
  });
}

// cache [(L,) NB, BS, H, D] contiguous <- src [(L,) n, H, D] with D contiguous.
void scatter(at::Tensor& cache, const at::Tensor& src_in, Scatter sc) {
  const at::Tensor src = rows_contig(src_in);
  const int64_t nd = src.dim();
  sc.src_layer = nd == 4 ? src.stride(0) : 0;
  sc.src_row = src.stride(nd - 3);
  sc.src_head = src.stride(nd - 2);
  dispatch_float(cache, "kv cache", [&](auto ctag) {
    using C = decltype(ctag);
    dispatch_float(src, "kv rows", [&](auto stag) {
      using S = decltype(stag);
      scatter_rows(ptr<C>(cache), ptr<S>(src), sc);
    });
  });
}

}  // namespace

void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots_in) {
  check_cpu(k_cache, "write_kv");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "write_kv: caches must be contiguous [NB, BS, Hkv, D], got ", k_cache.sizes());
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "write_kv: k/v must be [T, ", k_cache.size(2), ", ", k_cache.size(3), "], got ", k.sizes());
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == k.size(0), "write_kv: ", slots.numel(), " slots for ", k.size(0), " rows");
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  check_slots(ptr<int64_t>(slots), slots.numel(), n_slots, "write_kv: slot");
  const Scatter sc{ptr<int64_t>(slots), nullptr, k.size(0), 1, k.size(1), k.size(2), 0, 0, 0, 0};
  scatter(k_cache, k, sc);
  scatter(v_cache, v, sc);
}

void kv_commit(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_scratch, const at::Tensor& v_scratch,
               const at::Tensor& src_rows_in, const at::Tensor& dst_slots_in) {
  check_cpu(k_cache, "kv_commit");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "kv_commit: caches must be contiguous [L, NB, BS, Hkv, D], got ", k_cache.sizes());
  const int64_t L = k_cache.size(0), H = k_cache.size(3), D = k_cache.size(4);
  TORCH_CHECK(k_scratch.dim() == 4 && k_scratch.sizes() == v_scratch.sizes() && k_scratch.size(0) == L &&
                  k_scratch.size(2) == H && k_scratch.size(3) == D,
              "kv_commit: scratch must be [", L, ", S, ", H, ", ", D, "], got ", k_scratch.sizes());
  const at::Tensor src = src_rows_in.to(at::kLong).contiguous(), dst = dst_slots_in.to(at::kLong).contiguous();
  TORCH_CHECK(src.numel() == dst.numel(), "kv_commit: ", src.numel(), " source rows for ", dst.numel(), " slots");
  const int64_t n_slots = k_cache.size(1) * k_cache.size(2);
  check_slots(ptr<int64_t>(src), src.numel(), k_scratch.size(1), "kv_commit: scratch row");
  check_slots(ptr<int64_t>(dst), dst.numel(), n_slots, "kv_commit: slot");
  const Scatter sc{ptr<int64_t>(dst), ptr<int64_t>(src), dst.numel(), L, H, D, n_slots * H * D, 0, 0, 0};
  scatter(k_cache, k_scratch, sc);
  scatter(v_cache, v_scratch, sc);
}

}  // namespace firp
