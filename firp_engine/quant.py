"""GGUF quantized weights kept as their blocks, and the torch references of the native GEMM.

A `QuantWeight` is one matrix [N, K] as GGUF stores it: each row is K/32 blocks of 32
weights, bytes in GGUF order. The kinds (w = the weight, q its stored integer):
    Q4_0  18 bytes: fp16 d, 16 bytes of nibbles          w = d * (q - 8), q in 0..15
    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes of nibbles  w = d * q + m,   q in 0..15
    Q8_0  34 bytes: fp16 d, 32 int8                      w = d * q
Byte j of the nibbles holds weight j (low nibble) and weight j + 16 (high nibble).

The native GEMM (the cpu kernel in csrc/cpu/quant.cpp) has two definitions, by `act`:
  "float": x stays fp32/bf16; `dequant_linear`, x @ the dequantized weights in fp32 (the
           kernel: one FMA chain per output over k in order, as the dense fp32 kernel).
  "q8":    `linear_q8`: each row of x is quantized to 8-bit blocks of 32, so that a block's
           dot product is an exact integer. Per output (m, n), over the blocks b in order,
           in fp32 with one rounding per fma:
    dx[m, b] = amax_b / 127, xq = round_half_even(x * (127 / amax_b))   (0 where amax_b = 0)
    acc = fma(float(sum_j q[n, b, j] * xq[m, b, j]), d[n, b] * dx[m, b], acc)
    Q4_1 also: acc = fma(m[n, b], dx[m, b] * float(sum_j xq[m, b, j]), acc)
(Q4_0's "- 8" stays in the integer sum.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 32  # weights per block, every kind
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
ACTS = ("q8", "float")  # how the GEMM treats x (module docstring)


@dataclass
class QuantWeight:
    """A GGUF quantized matrix: kind, shape [N, K], blocks uint8 [N, K/32 * block bytes], and
    act, how its GEMM treats the activations ("q8" or "float")."""

    kind: str
    shape: tuple[int, int]
    blocks: torch.Tensor
    act: str = "q8"

    def __post_init__(self) -> None:
        if self.act not in ACTS:
            raise ValueError(f"unknown act {self.act} (have {', '.join(ACTS)})")
        if self.kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported quant kind {self.kind} (have {', '.join(BLOCK_BYTES)})")
        n, k = self.shape
        want = (n, k // BLOCK * BLOCK_BYTES[self.kind])
        if k % BLOCK or self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != want:
            raise ValueError(
                f"{self.kind} [{n}, {k}]: expected uint8 blocks {want}, got "
                f"{self.blocks.dtype} {tuple(self.blocks.shape)}"
            )

    def rows(self, index: torch.Tensor) -> QuantWeight:
        """The rows `index` (int64 [R]), e.g. a row reordering or an embedding lookup."""
        return QuantWeight(self.kind, (index.numel(), self.shape[1]), self.blocks[index], self.act)


def cat_rows(ws: list[QuantWeight]) -> QuantWeight:
    """Rows stacked (one GEMM for q, k and v): blocks are per row, so rows concatenate."""
    kinds, ks = {(w.kind, w.act) for w in ws}, {w.shape[1] for w in ws}
    if len(kinds) != 1 or len(ks) != 1:
        raise ValueError(f"cannot stack quantized weights of kinds {kinds} and K {ks}")
    rows = sum(w.shape[0] for w in ws)
    return QuantWeight(ws[0].kind, (rows, ks.pop()), torch.cat([w.blocks for w in ws]), ws[0].act)


def flat_sample(qw: QuantWeight, step: int) -> torch.Tensor:
    """dequantize(qw).flatten()[::step], dequantizing only the rows it reads."""
    n, k = qw.shape
    idx = torch.arange(0, n * k, step)
    return dequantize(qw.rows(idx // k))[torch.arange(idx.numel()), idx % k]


def _half(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian fp16 bytes -> fp32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def unpack(qw: QuantWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> q int32 [N, nb, 32] (signed: Q4_0 already less 8), d fp32 [N, nb], m fp32 [N, nb] or None."""
    n, k = qw.shape
    raw = qw.blocks.view(n, k // BLOCK, BLOCK_BYTES[qw.kind])
    d = _half(raw[..., 0:2])
    if qw.kind == "Q8_0":
        return raw[..., 2:].contiguous().view(torch.int8).int(), d, None
    m = _half(raw[..., 2:4]) if qw.kind == "Q4_1" else None
    nib = raw[..., -16:].int()
    q = torch.cat([nib & 0x0F, nib >> 4], dim=-1)
    return (q - 8 if qw.kind == "Q4_0" else q), d, m


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """-> fp32 [N, K], the same bits as gguf.quants.dequantize (d * q, then + m)."""
    q, d, m = unpack(qw)
    w = d.unsqueeze(-1) * q.float()
    if m is not None:
        w = w + m.unsqueeze(-1)
    return w.reshape(qw.shape)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> xq int32 [M, K/32, 32] in -127..127 and dx fp32 [M, K/32] (each row alone)."""
    xb = x.float().reshape(x.shape[0], -1, BLOCK)
    amax = xb.abs().amax(-1)
    # 127 / amax as a true fp32 division, as the kernel does (torch's scalar / tensor multiplies
    # by a reciprocal, which is off by an ulp at times and then flips a rounding tie)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv.unsqueeze(-1)).clamp(-127, 127).int()
    return xq, amax / 127.0


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 a * b + c rounded once (near enough: exact product in fp64, then two roundings)."""
    return (a.double() * b.double() + c.double()).float()


def linear_q8(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """The native kernel's definition (module docstring): x [M, K] fp32/bf16 -> [M, N] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, qw.shape[1])
    xq, dx = quantize_rows(x2)
    q, d, m = unpack(qw)
    acc = torch.zeros(x2.shape[0], qw.shape[0])
    for b in range(q.shape[1]):  # blocks in order: the kernel's accumulation order
        isum = (xq[:, b] @ q[:, b].T).float()  # exact: |sum| < 2^24
        acc = _fma(isum, dx[:, b, None] * d[None, :, b], acc)
        if m is not None:
            acc = _fma(m[None, :, b], (dx[:, b] * xq[:, b].sum(-1).float())[:, None], acc)
    return acc.to(x.dtype).reshape(*lead, qw.shape[0])


def dequant_linear(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """act "float" and the plain reference: x [..., K] @ dequantize(qw).T in fp32 -> [..., N]
    in x's dtype."""
    return F.linear(x.float(), dequantize(qw)).to(x.dtype)


def reference_linear(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """The definition the kernel computes for qw's act."""
    return linear_q8(x, qw) if qw.act == "q8" else dequant_linear(x, qw)


def stack_rows(ws: list[torch.Tensor | QuantWeight], dtype: torch.dtype) -> torch.Tensor | QuantWeight:
    """Weights stacked by rows for one GEMM: blocks when all are quantized alike, else dense
    in `dtype` (a file may quantize v differently from q and k)."""
    if all(isinstance(w, QuantWeight) for w in ws) and len({(w.kind, w.act) for w in ws}) == 1:
        return cat_rows(ws)
    return torch.cat([dequantize(w).to(dtype) if isinstance(w, QuantWeight) else w for w in ws])
