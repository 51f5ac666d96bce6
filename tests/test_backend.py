"""Backends as objects: one per model, a fixed table of ops, fallbacks reported once, a
clear error for a backend that cannot run here, and only the run-dtype weights kept."""

from __future__ import annotations

import gc
import json
import warnings
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import write_tiny_llama

from firp_engine import generate, ops
from firp_engine.backend import Backend, available_backends
from firp_engine.cli import main
from firp_engine.config import ModelConfig
from firp_engine.errors import FirpError, FirpWarning
from firp_engine.generate import LLM
from firp_engine.loading import load

needs_cpu = pytest.mark.skipif("cpu" not in available_backends(), reason="C++ extension not built")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


def firp_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FirpWarning)]


# ---------------------------------------------------------------- choosing a backend


def test_unknown_backend_is_one_line():
    with pytest.raises(FirpError, match=r"unknown backend 'bogus' \(choose from torch, cpu, triton, cuda\)"):
        Backend.create("bogus")


def test_default_backend(monkeypatch):
    monkeypatch.setenv("FIRP_BACKEND", "torch")
    assert Backend.create().name == "torch"
    monkeypatch.delenv("FIRP_BACKEND")
    assert Backend.create().name == ("cpu" if "cpu" in available_backends() else "torch")


@needs_cpu
def test_device_and_isa():
    from firp_engine.backends import cpu as cpu_module

    cpu, ref = Backend.create("cpu"), Backend.create("torch")
    assert cpu.device == ref.device == torch.device("cpu")
    assert cpu.isa == cpu_module.ISA == cpu_module.MODULES[cpu.isa].cpu_isa and ref.isa is None
    assert cpu.fallbacks == ref.fallbacks == ()


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_backend_without_gpu_is_one_line(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest allows triton's interpreter
    with pytest.raises(FirpError) as e:
        Backend.create(name)
    assert str(e.value) == (
        f"backend '{name}' needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)"
    )


@no_gpu
def test_llm_cuda_without_gpu_fails_before_loading(tmp_path):
    with pytest.raises(FirpError, match="needs a CUDA GPU"):  # not "model not found"
        LLM(str(tmp_path / "absent.gguf"), backend="cuda")


@no_gpu
def test_cli_cuda_without_gpu_is_one_line(capsys, tiny):
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny), "--backend", "cuda", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("firp: error: backend 'cuda' needs a CUDA GPU"), err


# ---------------------------------------------------------------- fallbacks: reported, never per call


@needs_cpu
def test_missing_kernel_is_listed_once_and_runs_the_reference(monkeypatch):
    monkeypatch.delitem(ops.KERNELS["cpu"], "rope")
    monkeypatch.delitem(ops.KERNELS["cpu"], "linear")  # pack_linear's layout is linear's: both go
    with pytest.warns(FirpWarning) as record:
        b = Backend.create("cpu")
    assert firp_warnings(record) == [
        "backend 'cpu' has no kernel for rope, pack_linear, linear: the torch reference runs them"
    ]
    assert b.fallbacks == ("rope", "pack_linear", "linear")
    assert b.op("rope") is ops.rope and b.op("pack_linear") is ops.pack_linear
    assert b.op("rms_norm") is ops.KERNELS["cpu"]["rms_norm"]


def config(head_dim: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=50, hidden_size=4 * head_dim, intermediate_size=64, n_layers=1,
        n_heads=4, n_kv_heads=2, head_dim=head_dim,
    )  # fmt: skip


# A head dim each backend's attention kernels are not built for.
REFUSED_HEAD_DIM = {"cpu": 12, "cuda": 96}


@pytest.mark.parametrize("name", [n for n in REFUSED_HEAD_DIM if n in available_backends()])
def test_ops_refusing_the_model_move_to_fallbacks(name):
    b, hd = Backend.create(name), REFUSED_HEAD_DIM[name]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert b.for_model(config(64), torch.bfloat16) is b  # every kernel runs these shapes
    assert firp_warnings(record) == []
    with pytest.warns(FirpWarning) as record:
        narrowed = b.for_model(config(hd), torch.float32)
    (msg,) = firp_warnings(record)
    assert "paged_decode_attention" in msg and "tree_attention" in msg and f"head_dim {hd}" in msg
    assert narrowed.fallbacks == b.fallbacks + ("paged_decode_attention", "tree_attention")
    assert narrowed.op("tree_attention") is ops.tree_attention
    assert narrowed.op("rms_norm") is b.op("rms_norm") and "tree_attention" not in b.fallbacks
    # the kernel itself still refuses such inputs: nothing swaps it for the reference per call
    q, cache = torch.zeros(1, 4, hd, device=b.device), torch.zeros(1, 16, 2, hd, device=b.device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=b.device)
    lens = torch.ones(1, dtype=torch.int32, device=b.device)
    with pytest.raises(RuntimeError, match="head_dim"):
        b.op("paged_decode_attention")(q, cache, cache, table, lens, 1.0)


@needs_cpu
def test_a_model_the_kernels_refuse_runs_on_the_reference(tmp_path):
    ckpt = load(write_tiny_llama(tmp_path / "m", hidden_size=48))  # head_dim 12
    with pytest.warns(FirpWarning, match="head_dim 12"):
        fast = LLM(ckpt, backend="cpu")
    assert fast.backend.fallbacks == ("paged_decode_attention", "tree_attention")
    ref = LLM(ckpt, backend="torch")
    a, b = (llm.generate("The quick brown fox", chat=False, max_new_tokens=6)[0] for llm in (fast, ref))
    assert a.new_ids == b.new_ids


def test_call_runs_the_reference_under_autograd():
    seen = []
    b = Backend("torch", torch.device("cpu"), {"silu_mul": lambda gate_up, out=None: seen.append(1)})
    x = torch.randn(2, 8)
    with torch.no_grad():
        b.call("silu_mul", x)
    assert seen == [1]
    torch.testing.assert_close(b.call("silu_mul", x), ops.silu_mul(x))  # training: gradients
    assert seen == [1]


# ---------------------------------------------------------------- two models, two backends


def counted(table: dict, owner: str, counts: Counter, monkeypatch) -> None:
    for op, fn in list(table.items()):

        def wrapper(*args, _fn=fn, _op=op, **kwargs):
            counts[owner, _op] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(table, op, wrapper)


@needs_cpu
class CountedStack:
    """A layer stack that counts its calls as the cpu backend's."""

    def __init__(self, inner, counts: Counter) -> None:
        self.inner, self.counts = inner, counts

    def decode(self, *args):
        self.counts["cpu", "stack.decode"] += 1
        return self.inner.decode(*args)

    def spans(self, *args):
        self.counts["cpu", "stack.spans"] += 1
        return self.inner.spans(*args)


def test_two_llms_with_different_backends_run_their_own_kernels(tiny, monkeypatch):
    counts: Counter = Counter()
    counted(ops.REFERENCES, "torch", counts, monkeypatch)
    counted(ops.KERNELS["cpu"], "cpu", counts, monkeypatch)
    ckpt = load(tiny)
    ref = LLM(ckpt, backend="torch")
    fast = LLM(ckpt, backend="cpu")  # made second: it must not change the first one's kernels
    fast.model.stack = CountedStack(fast.model.stack, counts)  # the cpu layer loop runs in C++
    assert (ref.backend.name, fast.backend.name) == ("torch", "cpu")
    assert ref.fingerprint == fast.fingerprint == ckpt.fingerprint() and ref.source == tiny
    results = {}
    for llm in (ref, fast, ref):
        counts.clear()
        results[llm.backend.name] = llm.generate("The quick brown fox", chat=False, max_new_tokens=6)[0]
        owners = {owner for owner, _ in counts}
        assert owners == {llm.backend.name}, counts
        ran = {op for _, op in counts}
        if llm is fast:  # layers in C++ (their kernels are the cpu ones: tests/test_layers.py)
            assert {"linear", "rms_norm", "stack.spans", "stack.decode"} <= ran
        else:
            assert {"linear", "rms_norm", "rope", "tree_attention", "paged_decode_attention"} <= ran
    assert results["torch"].new_ids == results["cpu"].new_ids


# ---------------------------------------------------------------- memory


def test_only_run_dtype_weights_stay_alive(tiny, monkeypatch):
    held = {}

    def tracked_load(model, weights="dense"):
        ckpt = load(model, weights)
        held["ckpt"] = weakref.ref(ckpt)
        held["weight"] = weakref.ref(ckpt.weights["model.layers.0.mlp.down_proj.weight"])
        return ckpt

    monkeypatch.setattr(generate, "load", tracked_load)
    llm = LLM(str(tiny), dtype="bf16", backend="torch")
    gc.collect()
    assert held["ckpt"]() is None and held["weight"]() is None
    assert not hasattr(llm, "ckpt")
    assert llm.model.embed.dtype == llm.model.layers[0].w_down.weight.dtype == torch.bfloat16
    # the torch backend packs nothing: the weights are the parameters, 2 bytes each
    assert llm.model.weight_bytes() == 2 * llm.config.n_params()


@needs_cpu
def test_cpu_backend_holds_each_weight_once(tiny):
    """The cpu GEMM reads its packed copy: the original is dropped (the tied LM head's is the
    embedding, kept), and reading it or running the layer under autograd is refused."""
    llm = LLM(str(tiny), dtype="bf16", backend="cpu")
    ref = LLM(str(tiny), dtype="bf16", backend="torch")
    lin = llm.model.layers[0].w_down
    assert lin._weight is None and lin.packed.dtype == torch.bfloat16
    with pytest.raises(FirpError, match="packed copy"):
        lin.weight  # noqa: B018
    x = torch.randn(3, lin._shape.shape[1], dtype=torch.bfloat16)
    with pytest.raises(FirpError, match="torch backend"):
        lin(x)  # autograd on: the reference would need the original
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref.model.layers[0].w_down(x), atol=2e-2, rtol=2e-2)
    m = llm.model
    assert (m.lm_head._weight is m.embed) == llm.config.tie_embeddings
    # held: the embedding, the norms and one packed copy per linear, nothing else
    linears = [m.lm_head] + [x for lw in m.layers for x in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    norms = [m.norm] + [n for lw in m.layers for n in (lw.attn_norm, lw.ffn_norm)]
    held = [m.embed, *norms, *(lin.packed for lin in linears)]
    assert m.weight_bytes() == sum(2 * t.numel() for t in held)


def test_info_reports_backend_and_memory(capsys, tiny):
    capsys.readouterr()
    assert main(["info", "--model", str(tiny), "--backend", "torch", "--dtype", "fp32"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["backend"], info["device"], info["cpu_isa"], info["fallbacks"]) == ("torch", "cpu", None, [])
    assert info["threads"] == torch.get_num_threads()
    mem = info["memory_MiB"]
    assert mem["weights"] == round(4 * info["parameters"] / 2**20, 1)
    assert mem["resident"] > mem["weights"] > 0 and mem["kv_pool"] > 0


def test_the_repo_shadows_no_hugging_face_kernels_package():
    """transformers >= 5.25 imports Hugging Face's `kernels`: a module of that name on the
    path of a run from the repo root (or of a benchmark script) would shadow it."""
    root = Path(__file__).resolve().parents[1]
    for folder in (root, root / "benchmarks", root / "tests"):
        assert not (folder / "kernels" / "__init__.py").exists()
        assert not (folder / "kernels.py").exists()
