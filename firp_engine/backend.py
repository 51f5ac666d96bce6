"""A backend: which implementation runs each op, and the device the model lives on.

A `Backend` is an object, made once per model (`LLM` holds one through its `Transformer`):
two models with different backends run side by side in one process. Its table is fixed
when it is made and never changes per call:
  - `Backend.create(name)` imports `firp_engine/backends/<name>.py`, whose import registers
    the backend's kernels in `ops.KERNELS`; an op it has no kernel for runs the torch
    reference, and the backend lists it in `fallbacks` and in one warning.
  - `backend.for_model(cfg, dtype)` asks each kernel once whether it runs the model's shapes
    and dtype (head dims, GQA groups ...): the kernels' own input checks answer, on a
    one-token input, so the limits are written down once, beside the kernels. An op refused
    joins `fallbacks`, in one more warning. Later, a kernel given an input it cannot run
    raises; nothing is swapped for the reference behind the caller's back.
"""

from __future__ import annotations

import importlib
import os
import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch

from firp_engine import ops
from firp_engine.config import ModelConfig
from firp_engine.errors import FirpError, FirpWarning

BACKENDS = ("torch", "cpu", "triton", "cuda")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for cost-curve caches and every benchmark table."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# The packed weight layout belongs to the kernel that reads it: these two run together.
LINEAR_OPS = ("pack_linear", "linear")
# The ops one decoder layer runs: a backend's C++ layer loop (`layer_stack`) calls its own
# kernels for all of them, so it is used only when none of them falls back.
LAYER_OPS = (
    "rms_norm",
    "add_rms_norm",
    "rope",
    "silu_mul",
    "linear",
    "write_kv",
    "paged_decode_attention",
    "tree_attention",
)


class Backend:
    """name, device, CPU ISA path (cpu backend), the ops that run the torch reference
    (`fallbacks`), and `op(name)` / `call(name, ...)` to run an op."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        kernels: dict[str, Callable],
        isa: str | None = None,
        stack: Callable | None = None,
    ):
        if not all(op in kernels for op in LINEAR_OPS):
            kernels = {op: fn for op, fn in kernels.items() if op not in LINEAR_OPS}
        self.name = name
        self.device = device
        self.isa = isa
        self.fallbacks = tuple(op for op in ops.REFERENCES if op not in kernels)
        self._kernels = kernels
        self._impls = {op: kernels.get(op, ref) for op, ref in ops.REFERENCES.items()}
        self._stack = stack if not set(LAYER_OPS) & set(self.fallbacks) else None

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device}, fallbacks={self.fallbacks})"

    @classmethod
    def create(cls, name: str | None = None) -> Backend:
        """The backend `name`; None reads $FIRP_BACKEND, else `cpu` when the C++ extension
        is built, else `torch`. Raises FirpError (one line) for an unknown or unusable one."""
        name = name or os.environ.get("FIRP_BACKEND") or _default_name()
        base = name.partition("@")[0]  # "cpu@avx2": the cpu backend on one SIMD path
        if base not in BACKENDS or (name != base and base != "cpu"):
            raise FirpError(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})")
        device = _device(base)
        module = _import(base)
        isa, stack = module.variant(name) if hasattr(module, "variant") else (None, None)
        kernels = ops.REFERENCES if name == "torch" else ops.KERNELS.get(name, {})
        backend = cls(name, device, dict(kernels), isa, stack)
        if backend.fallbacks:
            missing = ", ".join(backend.fallbacks)
            _warn(f"backend '{name}' has no kernel for {missing}: the torch reference runs them")
        return backend

    def for_model(self, cfg: ModelConfig, dtype: torch.dtype) -> Backend:
        """This backend, less the kernels that refuse this model's shapes or dtype (each is
        called once on a one-token input; its own checks decide). Self when none refuses."""
        if self.name == "torch":
            return self  # the references run any shape
        refused = {}
        for op, probe in _probes(cfg, dtype, self.device, self.op).items():
            if op in self._kernels:
                try:
                    probe()
                except (RuntimeError, ValueError) as e:
                    refused[op] = str(e).strip().splitlines()[0]
        if not refused:
            return self
        why = "; ".join(reason if op in reason else f"{op}: {reason}" for op, reason in refused.items())
        _warn(f"backend '{self.name}' refuses this model ({why}): the torch reference runs those ops")
        kept = {op: fn for op, fn in self._kernels.items() if op not in refused}
        return Backend(self.name, self.device, kept, self.isa, self._stack)

    def layer_stack(self, model: Any) -> Any | None:
        """The backend's layer loop for `model` (one call runs a range of layers, bit-identical
        to `Transformer.run_layer` on this backend's kernels), or None: then Python loops."""
        return self._stack(model) if self._stack is not None else None

    def op(self, name: str) -> Callable:
        """The implementation this backend runs for op `name` (kernel or reference)."""
        return self._impls[name]

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        # With autograd on (training), the reference: its torch ops have gradients, the
        # kernels have none. Inference runs under no_grad/inference_mode and gets the kernels.
        fn = ops.REFERENCES[name] if torch.is_grad_enabled() else self._impls[name]
        return fn(*args, **kwargs)


def available_backends() -> list[str]:
    """Names whose backend can be made here (torch always; cpu also as cpu@<path> for each
    SIMD path this machine runs)."""
    out = []
    for name in BACKENDS:
        try:
            _device(name)
            module = _import(name)
        except FirpError:
            continue
        out += [name] + [n for n in getattr(module, "NAMES", ()) if n != name]
    return out


def _default_name() -> str:
    try:
        _import("cpu")
    except FirpError:
        return "torch"
    return "cpu"


def _device(name: str) -> torch.device:
    if name in ("torch", "cpu"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")  # Triton's interpreter: slow, for tests
    raise FirpError(
        f"backend '{name}' needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)"
    )


def _import(name: str):
    """The backend's module (importing it registers its kernels); None for torch."""
    if name == "torch":
        return None
    try:
        return importlib.import_module(f"firp_engine.backends.{name}")
    except (ImportError, OSError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FirpError(f"backend '{name}' is not available here: {reason}") from None


def _warn(message: str) -> None:
    warnings.warn(message, FirpWarning, stacklevel=3)


def _probes(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, op: Callable[[str], Callable]
) -> dict[str, Callable[[], object]]:
    """One call per op on a two-token input with the model's shapes and layouts: a pool of
    one block of two slots, k as rope returns it (contiguous) and v as a view into the qkv
    projection's rows (strided), the k projection's weight for the linear pair."""
    d, hk, hd = cfg.hidden_size, cfg.n_kv_heads, cfg.head_dim

    def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dt, device=device)

    def pool(*lead: int) -> torch.Tensor:
        return zeros(*lead, 1, 2, hk, hd)

    x, w, q, k = zeros(2, d), zeros(d), zeros(2, cfg.n_heads, hd), zeros(2, hk, hd)
    v = zeros(2, (cfg.n_heads + 2 * hk) * hd)[:, -hk * hd :].view(2, hk, hd)
    slots = torch.arange(2, device=device)
    page, n_keys = zeros(1, 1, dt=torch.int32), zeros(1, dt=torch.int32) + 2
    causal = torch.tensor([[1], [3]], device=device)  # int64 bits: row i sees rows <= i
    angle = zeros(2, hd // 2, dt=torch.float32)
    w_k = zeros(hk * hd, d)
    return {
        "rms_norm": lambda: op("rms_norm")(x, w, 1e-5),
        "add_rms_norm": lambda: op("add_rms_norm")(x, x.clone(), w, 1e-5),
        "rope": lambda: op("rope")(q, k, slots, angle, angle),
        "silu_mul": lambda: op("silu_mul")(zeros(2, 2 * cfg.intermediate_size)),
        "linear": lambda: op("linear")(x, w_k, op("pack_linear")(w_k)),
        "write_kv": lambda: op("write_kv")(pool(), pool(), k, v, slots),
        "paged_decode_attention": lambda: op("paged_decode_attention")(
            q[:1], pool(), pool(), page, n_keys, 1.0
        ),
        "tree_attention": lambda: op("tree_attention")(q, pool(), pool(), page[0], 1, k, v, causal, 1.0),
        "firp_project": lambda: op("firp_project")(x, zeros(1, d, d), None),
        "kv_commit": lambda: op("kv_commit")(pool(1), pool(1), k[None], k[None], slots, slots),
        "top_lse": lambda: op("top_lse")(zeros(2, cfg.vocab_size, dt=torch.float32), 2),
    }
