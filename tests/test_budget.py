"""The tree budget from the machine (firp/budget.py): cost curves, the steady-state model
of tokens per step, and the choice it makes on flat and steep curves."""

import json
import time
from pathlib import Path

import pytest
from spec_helpers import make_llm, random_head, tiny_checkpoint

from firp_engine.firp import budget
from firp_engine.firp.drafter import FirpDrafter
from firp_engine.spec.tree import default_acc

ROWS = budget.ROWS
FLAT = {r: 1.0 for r in ROWS}  # a GPU-like machine: 64 rows cost one
STEEP = {r: float(r) for r in ROWS}  # every row costs a full step


def test_cost_at_interpolates_and_extrapolates():
    curve = {1: 1.0, 2: 2.0, 4: 3.0, 8: 5.0, 16: 9.0, 32: 17.0, 64: 33.0}
    assert budget.cost_at(curve, 1) == 1.0 and budget.cost_at(curve, 3) == 2.5
    assert budget.cost_at(curve, 6) == 4.0 and budget.cost_at(curve, 96) == 49.0


def test_plan_follows_the_curve():
    acc = default_acc(3)
    b_flat, pol_flat, s_flat = budget.plan(acc, 3, FLAT)
    b_steep, pol_steep, s_steep = budget.plan(acc, 3, STEEP)
    assert b_flat >= 16 and pol_flat == "all" and s_flat > 1.5  # free rows: a big tree
    assert b_steep <= 2 and pol_steep == "top:1" and s_steep < 1.0  # costly rows: (almost) none


def test_step_cost_charges_pseudo_rows_their_share_of_the_layers():
    assert budget.step_cost(STEEP, 4, 6) == 10.0  # share 1: every row a full row
    assert budget.step_cost(STEEP, 4, 6, share=1 / 3) == pytest.approx(6.0)
    assert budget.step_cost(STEEP, 4, 6, share=0.0) == 4.0
    # pseudo rows that cost little make spawning nodes worth it: the plan spawns more
    acc = default_acc(3)
    half = {r: 1.0 + 0.5 * (r - 1) for r in ROWS}
    (_, pol_full, s_full), (_, pol_cheap, s_cheap) = budget.plan(acc, 3, half), budget.plan(acc, 3, half, 0.1)
    assert s_cheap > s_full and int(pol_cheap.partition(":")[2] or 99) >= int(
        pol_full.partition(":")[2] or 99
    )


def test_steady_rate_counts_fallback_trees():
    """Only the root spawning means deeper accepted nodes lead to shorter fallback chains,
    so fewer tokens per step than every node spawning (same budget), for fewer rows."""
    acc = default_acc(3)
    tau_top, cost_top = budget.steady_rate(acc, 3, 10, ("top", 1), STEEP)
    tau_all, cost_all = budget.steady_rate(acc, 3, 10, ("all", 0), STEEP)
    tree_tau = 1 + sum(n.value for n in budget.DraftTree.build(acc, 10).nodes[1:])
    assert tau_top < tau_all == pytest.approx(tree_tau)
    assert cost_top < cost_all == pytest.approx(10 + 10 * 3)


def test_curve_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "CACHE", tmp_path)
    monkeypatch.setattr(budget, "machine_busy", lambda: None)  # the test run's own load aside
    monkeypatch.setattr(budget, "_MEASURED", {})
    llm = make_llm(tiny_checkpoint(vocab=97, n_layers=2, d=32, seed=0, head_scale=0.5))
    calls = []
    real = budget.measure
    monkeypatch.setattr(budget, "measure", lambda llm: calls.append(1) or real(llm, prefix=32, reps=1))
    curve = budget.cost_curve(llm)
    assert sorted(curve) == list(ROWS) and all(ms > 0 for ms in curve.values())
    assert budget.cost_curve(llm) == curve and len(calls) == 1
    (cached,) = tmp_path.glob("cost_*.json")
    assert json.loads(cached.read_text())["ms"]
    # the drafter's defaults come from the plan; the user's flags override it
    head = random_head(llm, layer=1, k=3, seed=1)
    want, policy, _ = budget.plan(default_acc(3), 3, curve, share=1 / 2)  # pseudo rows: layer 1 of 2
    assert FirpDrafter(llm, head=head).full.tree.n == want
    assert FirpDrafter(llm, head=head, tree_budget=7, pseudo_policy="all").full.tree.n == 7


def test_cost_curves_are_cached_per_weight_format():
    """Native blocks and dense tensors have one fingerprint (the same values) but different
    step costs, so each format measures and caches its own curve."""
    from types import SimpleNamespace

    be = SimpleNamespace(name="cpu", isa="avx2", device="cpu")
    dense, native = (
        SimpleNamespace(backend=be, fingerprint="f", weights=w, dtype="bf16") for w in ("dense", "native")
    )
    assert budget._cache_file(dense) != budget._cache_file(native)
    assert budget._cache_file(dense) == budget._cache_file(SimpleNamespace(**vars(dense)))


def test_a_curve_timed_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    """Timed beside another job, a curve is that job's figure: this process keeps it, the disk
    cache does not; recalibrate measures again."""
    monkeypatch.setattr(budget, "CACHE", tmp_path)
    monkeypatch.setattr(budget, "_MEASURED", {})
    llm = make_llm(tiny_checkpoint(vocab=97, n_layers=2, d=32, seed=0, head_scale=0.5))
    calls = []
    monkeypatch.setattr(budget, "measure", lambda llm: calls.append(1) or {r: float(r) for r in ROWS})
    monkeypatch.setattr(budget, "machine_busy", lambda: 1.5)
    with pytest.warns(budget.FirpWarning, match="busy machine"):
        assert budget.cost_curve(llm)[64] == 64.0
    assert budget.cost_curve(llm)[64] == 64.0 and len(calls) == 1  # measured once per process
    assert not list(tmp_path.glob("cost_*.json"))
    monkeypatch.setattr(budget, "machine_busy", lambda: None)
    budget.cost_curve(llm, recalibrate=True)
    assert len(calls) == 2 and len(list(tmp_path.glob("cost_*.json"))) == 1
    monkeypatch.setattr(budget, "_MEASURED", {})  # a new process reads the disk cache
    assert budget.cost_curve(llm)[64] == 64.0 and len(calls) == 2


def test_machine_busy_sees_another_process_spinning():
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    import subprocess
    import sys

    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"]
    )
    try:
        time.sleep(0.3)  # the child is up and spinning
        busy = budget.machine_busy(0.3)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and busy > 0.6  # one core spinning (this process sleeps meanwhile)
