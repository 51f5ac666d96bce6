// top_lse: per row of fp32 logits, the k largest values with their indices and the
// logsumexp, in two passes over the row instead of torch's topk + logsumexp (three, with
// their own dispatch): what a FIRP drafter needs from its pseudo rows each step (candidates
// and their softmax probabilities, firp/dynamic.py). On 3 rows of 49k logits, 2 threads,
// torch takes ~0.16 ms, about 5 % of a one-row decode step of the default model.
//
// Pass 1 keeps a sorted list of the k best; a block of 64 values whose vector max does not
// beat the list's last is skipped, which after the first blocks is nearly every block. Ties
// keep the lower index first (a value equal to the k-th best does not enter). Pass 2 sums
// exp(x - max) with the vector exp2. The sum's order differs from torch's, so lse matches
// the reference to rounding, not to the bit: the drafter only ranks candidates with it.
// NaN logits are skipped (torch would give NaN): the LM head gives none.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_ops.h"

namespace firp {
namespace {

using namespace simd;
constexpr float LOG2E = 1.4426950408889634f;
constexpr int64_t BLOCK = 64;

inline float block_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= W) {
    vf v = load(x);
    for (i = W; i + W <= n; i += W) v = max(v, load(x + i));
    m = hmax(v);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// The k best of row x[0:n] into val/idx (largest first); returns how many (min(k, n)).
int64_t top_row(const float* x, int64_t n, int64_t k, float* val, int64_t* idx) {
  int64_t have = 0;
  float last = -std::numeric_limits<float>::infinity();  // the k-th best once full
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t e = std::min(n, b + BLOCK);
    if (have == k && !(block_max(x + b, e - b) > last)) continue;
    for (int64_t i = b; i < e; ++i) {
      const float v = x[i];
      if ((have == k && !(v > last)) || std::isnan(v)) continue;  // NaN never enters
      int64_t j = std::min(have, k - 1);  // full: the k-th goes; insert after every value >= v
      for (; j > 0 && val[j - 1] < v; --j) val[j] = val[j - 1], idx[j] = idx[j - 1];
      val[j] = v, idx[j] = i;
      have = std::min(have + 1, k);
      if (have == k) last = val[k - 1];
    }
  }
  return have;
}

float sum_exp(const float* x, int64_t n, float m) {
  const vf shift = set1(m * LOG2E), l2e = set1(LOG2E);
  vf acc = zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = add(acc, exp2(sub(mul(load(x + i), l2e), shift)));
  float s = hsum(acc);
  for (; i < n; ++i) s += std::exp2(x[i] * LOG2E - m * LOG2E);
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> top_lse(const at::Tensor& x_in, int64_t k) {
  check_cpu(x_in, "top_lse");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "top_lse: expected fp32 [R, V], got ",
              x_in.scalar_type(), " ", x_in.sizes());
  const int64_t R = x_in.size(0), V = x_in.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "top_lse: k must be in [1, ", V, "], got ", k);
  const at::Tensor x = x_in.contiguous();
  at::Tensor val = at::empty({R, k}, x.options());
  at::Tensor idx = at::empty({R, k}, x.options().dtype(at::kLong));
  at::Tensor lse = at::empty({R}, x.options());
  const float* xp = ptr<float>(x);
  float *vp = ptr<float>(val), *lp = ptr<float>(lse);
  int64_t* ip = ptr<int64_t>(idx);
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * V;
      const int64_t got = top_row(row, V, k, vp + r * k, ip + r * k);
      if (got == 0) {  // every value NaN
        for (int64_t j = 0; j < k; ++j) vp[r * k + j] = NAN, ip[r * k + j] = j;
        lp[r] = NAN;
        continue;
      }
      for (int64_t j = got; j < k; ++j) vp[r * k + j] = -INFINITY, ip[r * k + j] = -1;  // NaNs in the row
      const float m = vp[r * k];
      lp[r] = std::isinf(m) ? m : m + std::log(sum_exp(row, V, m));
    }
  });
  return {val, idx, lse};
}

}  // namespace firp
