"""Shared by the speculative-decoding tests: tiny random models, prompts, a dense reference
forward, the greedy comparison with its near-tie allowance, and a chi-square p-value."""

import pytest
import torch
import torch.nn.functional as F

from firp_engine import generate
from firp_engine.config import ModelConfig
from firp_engine.firp.head import FirpHead
from firp_engine.generate import LLM
from firp_engine.loading import Checkpoint

# ---------------------------------------------------------------- tiny models


class StubTokenizer:
    eos_ids: list[int] = []  # no EOS: every run goes to max_new_tokens
    chat_template = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab for c in text]

    def decode(self, ids, skip_special: bool = False) -> str:
        return " ".join(map(str, ids))


def tiny_checkpoint(vocab: int, n_layers: int, d: int, seed: int, head_scale: float) -> Checkpoint:
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, n_layers=n_layers,
        n_heads=4, n_kv_heads=2, head_dim=d // 4, max_position=512,
    )  # fmt: skip

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    w = {
        "model.embed_tokens.weight": rnd(vocab, d),
        "model.norm.weight": 1 + 0.1 * rnd(d),
        "lm_head.weight": rnd(vocab, d, std=head_scale),
    }
    shapes = {
        "self_attn.q_proj": (d, d), "self_attn.k_proj": (d // 2, d), "self_attn.v_proj": (d // 2, d),
        "self_attn.o_proj": (d, d), "mlp.gate_proj": (2 * d, d), "mlp.up_proj": (2 * d, d),
        "mlp.down_proj": (d, 2 * d),
    }  # fmt: skip
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rnd(d)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rnd(d)
        for name, (n_out, n_in) in shapes.items():
            w[p + name + ".weight"] = rnd(n_out, n_in, std=n_in**-0.5)
    return Checkpoint(cfg, w, StubTokenizer(vocab), f"tiny-{seed}")


def make_llm(ckpt: Checkpoint, backend: str = "torch") -> LLM:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "load", lambda model, weights="dense": ckpt)
        return LLM("tiny", backend=backend, max_context=512, kv_blocks=400)


def has_cpu_kernels() -> bool:
    try:
        import firp_engine._C  # noqa: F401
    except ImportError:
        return False
    return True


# The backends every lossless test runs on: the torch reference and our C++ kernels.
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not has_cpu_kernels(), reason="C++ extension not built")),
]


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def random_head(llm: LLM, layer: int, k: int, seed: int, noise: float = 0.3) -> FirpHead:
    d = llm.config.hidden_size
    head = FirpHead(d, k, layer, {"fingerprint": llm.fingerprint})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.add_(torch.randn(k, d, d, generator=g) * noise * d**-0.5)
        head.bias.add_(torch.randn(k, d, generator=g) * noise)
    return head


# ---------------------------------------------------------------- a dense reference


def causal_attend(i, q, k, v):
    """Plain causal attention over the rows given: q [T, H, D], k/v [T, Hkv, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    )
    return o.transpose(0, 1)


@torch.no_grad()
def dense_logits(model, ids: list[int], head: FirpHead | None = None) -> torch.Tensor:
    """Logits of a plain causal forward of ids; with a head, the last row's k pseudo rows
    join at head.layer as the next positions (what a pseudo group sees). [T (+k), V]."""
    h = model.embed_tokens(torch.tensor(ids))
    pos = torch.arange(len(ids))
    lo = head.layer if head is not None else model.cfg.n_layers
    for i in range(lo):
        h = model.run_layer(i, h, pos, causal_attend)
    if head is not None:
        h = torch.cat([h, head(h[-1:])])
        pos = torch.arange(len(ids) + head.k)
        for i in range(lo, model.cfg.n_layers):
            h = model.run_layer(i, h, pos, causal_attend)
    return model.logits(h)


def assert_same_or_near_tie(model, prompt: list[int], ours: list[int], ref: list[int]) -> None:
    """Equal, or the first divergence is at a near-tie of the reference (top-2 gap < 1e-3)."""
    div = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None)
    if div is None:
        assert len(ours) == len(ref)
        return
    top2 = torch.topk(dense_logits(model, prompt + ref[:div])[-1], 2).values
    assert (top2[0] - top2[1]).item() < 1e-3, f"diverged at token {div} without a near-tie"


def chi2_pvalue(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson chi-square p-value; cells expecting < 5 counts are pooled into one."""
    n = observed.sum().item()
    exp = expected_p.double() * n
    small = exp < 5
    obs_c = torch.cat([observed[~small].double(), observed[small].double().sum().view(1)])
    exp_c = torch.cat([exp[~small], exp[small].sum().view(1)])
    if exp_c[-1] == 0:
        if obs_c[-1] > 0:
            return 0.0  # a token the model can never produce
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    df = obs_c.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()
