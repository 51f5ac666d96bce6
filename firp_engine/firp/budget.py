"""The draft tree's size from the machine: a step's cost curve, and the budget it favours.

Speedup = tokens per step / step cost. Both depend on the tree: more nodes accept more
tokens, but every row costs compute once the small-M kernels stop being bandwidth-bound,
which happens at 2 rows on one CPU and at 64 on another. So the default budget is chosen
per machine, from measurement:

1. `cost_curve`: the forward of 1, 2, 4 ... 64 rows of one sequence over a 256-token
   prefix, timed (the fastest of interleaved rounds) relative to 1 row; measured once per machine,
   model, dtype, backend and thread count, and cached in ~/.cache/firp-engine/.
2. `plan`: for each node budget and pseudo-row policy, the expected tokens per step under
   the head's acceptance table, with the fallback trees a non-spawning accepted node leads
   to (a Markov chain over "which tree comes next"), divided by the expected step cost
   from the curve. The best pair wins. The user's --tree-budget / --pseudo-policy override.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

from firp_engine.backend import cpu_model
from firp_engine.errors import FirpWarning
from firp_engine.firp.pseudo import PseudoLayout, spawning
from firp_engine.spec.tree import DraftTree

ROWS = (1, 2, 4, 8, 16, 32, 64)
BUDGETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
POLICIES = (("top", 1), ("top", 2), ("top", 4), ("all", 0))
CACHE = Path(os.environ.get("FIRP_CACHE", Path.home() / ".cache" / "firp-engine"))


def cost_at(curve: dict[int, float], rows: int) -> float:
    """Relative cost of a forward of `rows` rows, interpolated linearly (extrapolated past 64)."""
    pts = sorted(curve.items())
    for (r0, c0), (r1, c1) in zip(pts, pts[1:], strict=False):
        if rows <= r1:
            return c0 + (c1 - c0) * (rows - r0) / (r1 - r0) if rows > r0 else c0
    (r0, c0), (r1, c1) = pts[-2], pts[-1]
    return c1 + (c1 - c0) * (rows - r1) / (r1 - r0)


def step_cost(
    curve: dict[int, float], n_tree: int, n_pseudo: int, share: float = 1.0, head_pass: float = 0.0
) -> float:
    """A step's cost relative to a one-row forward: n_tree rows run every layer, n_pseudo
    pseudo rows only `share` of them (layers [l, L) of L: share = (L - l) / L). The curve
    times full rows, so the pseudo rows are charged that share of their marginal cost.
    head_pass: the relative cost of an LM-head pass of its own for the pseudo rows that draft
    the next tree, which a step pays when it has several pseudo groups (a single group rides
    the step's pass: FirpDrafter.logit_rows); the caller passes it for such steps only."""
    base = cost_at(curve, n_tree)
    return (base + (cost_at(curve, n_tree + n_pseudo) - base) * share) / curve[1] + head_pass


def head_pass(model, n_vocab: int) -> float:
    """An LM-head pass over n_vocab of the model's tokens as a share of a one-row step, which
    streams every weight once: what a pseudo group decoded on its own adds to a step."""
    return model.lm_head.packed.nbytes * n_vocab / model.cfg.vocab_size / model.step_bytes()


def _build_id(isa: str | None) -> str:
    """The kernels' build (a rebuilt extension makes a new curve): size and mtime of the cpu
    module that runs, '' where there is none."""
    if not isa:
        return ""
    import importlib.util

    name = "firp_engine._C" if isa == "scalar" else f"firp_engine._C_{isa}"
    try:
        spec = importlib.util.find_spec(name)
        st = os.stat(spec.origin) if spec and spec.origin else None
    except (ImportError, OSError, ValueError):
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}" if st else ""


def _cache_file(llm) -> Path:
    cpu = cpu_model()
    be = llm.backend
    # weights: native blocks and dense tensors share a fingerprint (the same values) but not a curve
    key = f"{cpu}|{be.name}|{be.isa}|{be.device}|{llm.fingerprint}|{llm.weights}|{llm.dtype}"
    key += f"|{torch.get_num_threads()}|{_build_id(be.isa)}"
    return CACHE / f"cost_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@torch.inference_mode()
def measure(llm, prefix: int = 256, reps: int = 5) -> dict[int, float]:
    """{rows: ms} for one tree forward of that many rows (causal among themselves)."""
    from firp_engine.generate import prefill
    from firp_engine.model import Batch, SeqRows
    from firp_engine.ops import pack_mask

    model, dev = llm.model, llm.model.device
    seq = llm.cache.new_sequence()
    n = min(prefix, llm.max_context - max(ROWS) - 1)
    g = torch.Generator().manual_seed(0)
    prefill(model, seq, torch.randint(0, llm.config.vocab_size, (n,), generator=g).tolist(), 512)
    rows = max(ROWS)
    cfg = model.cfg
    scratch = tuple(
        torch.empty(cfg.n_layers, rows, cfg.n_kv_heads, cfg.head_dim, dtype=model.dtype, device=dev)
        for _ in "kv"
    )
    runs = {}
    for r in ROWS:
        bits = pack_mask(torch.ones(r, r, dtype=torch.bool).tril()).to(dev)
        batch = Batch(torch.arange(n, n + r, device=dev), [SeqRows(seq, 0, r, bits)], "tree", scratch=scratch)
        runs[r] = (batch, model.embed_tokens(list(range(r))))
    times: dict[int, list[float]] = {r: [] for r in ROWS}
    try:
        # Rounds over all row counts, the first a warm-up, and the fastest run of each count:
        # a slow moment of the machine then spoils one run of one count, not the ratio of two
        # counts (the planner reads ratios; a slow one-row figure once flattened a whole curve).
        for rnd in range(reps + 1):
            for r, (batch, x) in runs.items():
                t = time.perf_counter()
                model.logits(model.forward(batch, x))
                if rnd:
                    times[r].append(time.perf_counter() - t)
    finally:
        seq.free()
    return {r: 1e3 * min(ts) for r, ts in times.items()}


def machine_busy(window: float = 0.25) -> float | None:
    """The CPUs (in cores) that other work keeps busy while this process idles for `window`
    seconds, when over half a core; else None. A curve timed beside such work is that work's
    figure, not this machine's. (The load average would count this process's own recent work.)"""

    def busy_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v) - idle, sum(v)

    try:
        b0, t0 = busy_total()
        time.sleep(window)
        b1, t1 = busy_total()
    except (OSError, ValueError, IndexError):
        return None  # not Linux: no check
    cores = (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)
    return cores if cores > 0.5 else None


_MEASURED: dict[Path, dict[int, float]] = {}  # this process's curves (a busy one is not on disk)


def cost_curve(llm, recalibrate: bool = False) -> dict[int, float]:
    """The cached curve {rows: ms} for this machine and model, measured on first use (or
    again with recalibrate). A curve measured on a busy machine serves this process only:
    it is not cached, so the next run on a quiet machine measures again."""
    path = _cache_file(llm)
    if not recalibrate:
        if path in _MEASURED:
            return _MEASURED[path]
        try:
            return {int(r): ms for r, ms in json.loads(path.read_text())["ms"].items()}
        except (OSError, ValueError, KeyError):
            pass
    busy = machine_busy()
    ms = _MEASURED[path] = measure(llm)
    if busy is not None:
        warnings.warn(
            f"the step cost curve was timed on a busy machine ({busy:.1f} cores in use by others): "
            "used for this run "
            "only, not cached (`firp info --recalibrate` on a quiet machine fixes it)",
            FirpWarning,
            stacklevel=2,
        )
        return ms
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"ms": ms, "measured": time.strftime("%Y-%m-%d %H:%M")}))
    except OSError:
        pass  # a read-only home: measure again next time
    return ms


def steady_rate(
    acc: list[list[float]],
    k: int,
    budget: int,
    policy: tuple[str, int],
    curve,
    share: float = 1.0,
    head_pass: float = 0.0,
) -> tuple[float, float]:
    """(expected tokens per step, expected step cost relative to one row) for a static tree
    of `budget` nodes under `policy`, in the steady state of which tree each step uses;
    share, head_pass: as step_cost's."""
    name, top = policy
    full = DraftTree.build(acc, budget)
    trees = {0: full} | {d: DraftTree.chain(min(max(0, k - d), len(acc))) for d in range(1, k + 1)}
    lays = {d: PseudoLayout(t, 1, k, spawning(t, name, top)) for d, t in trees.items()}
    # P(path ends at node j) = value(j) - sum of its children's values; where it ends picks
    # the next tree (delta = levels below its deepest spawning ancestor).
    trans, tokens, cost = {}, {}, {}
    for d, lay in lays.items():
        t = lay.tree
        values = [_chain_value(acc, nd.depth, d) if d else nd.value for nd in t.nodes]
        ends = [values[j] - sum(values[c] for c in t.children[j]) for j in range(t.n)]
        tokens[d] = 1.0 + sum(values[1:])
        cost[d] = step_cost(curve, t.n, lay.n_rows - t.n, share, head_pass if len(lay.spawn) > 1 else 0.0)
        nxt: dict[int, float] = {}
        for j, p in enumerate(ends):
            delta = lay.source[j][1]
            nxt[delta] = nxt.get(delta, 0.0) + p
        trans[d] = nxt
    pi = {0: 1.0}  # the first full tree; iterate to the stationary mix
    for _ in range(50):
        new: dict[int, float] = {}
        for d, p in pi.items():
            for d2, q in trans[d].items():
                new[d2] = new.get(d2, 0.0) + p * q
        pi = new
    return sum(p * tokens[d] for d, p in pi.items()), sum(p * cost[d] for d, p in pi.items())


def _chain_value(acc: list[list[float]], depth: int, delta: int) -> float:
    """A fallback chain drafted from offsets delta+1.. of an ancestor's pseudo rows: its node
    at depth t is accepted with the rank-0 rates of offsets delta+1 .. delta+t."""
    v = 1.0
    for i in range(delta, delta + depth):
        v *= acc[i][0] if i < len(acc) else 0.0
    return v


def plan(
    acc: list[list[float]], k: int, curve: dict[int, float], share: float = 1.0, head_pass: float = 0.0
) -> tuple[int, str, float]:
    """(budget, policy, expected speedup over one-row steps) maximising tokens per cost;
    share, head_pass: as step_cost's. Remembered per (table, k, curve, share, head_pass):
    every `generate` call makes a decoder, and the search builds ~50 layouts (0.15 s)."""
    key = (tuple(map(tuple, acc)), k, tuple(sorted(curve.items())), share, head_pass)
    if key not in _PLANS:
        _PLANS[key] = _search(acc, k, curve, share, head_pass)
    return _PLANS[key]


_PLANS: dict[tuple, tuple[int, str, float]] = {}


def _search(
    acc: list[list[float]], k: int, curve: dict[int, float], share: float, head_pass: float
) -> tuple[int, str, float]:
    best = (1, "top:1", 0.0)
    for b in BUDGETS:
        for name, top in POLICIES:
            tau, cost = steady_rate(acc, k, b, (name, top), curve, share, head_pass)
            if tau / cost > best[2] + 1e-9:
                best = (b, "all" if name == "all" else f"top:{top}", tau / cost)
    return best
