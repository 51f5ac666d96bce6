"""Small-budget sweep of the FIRP head's entry layer l and offset count k.

Trains one head per setting on the same self-distilled sequences (same seed, same budget)
and validates each on the same held-out slice: top-1/top-5 per offset against the
model's own greedy token, and the mean tokens a greedy chain of drafts would keep. One
context pass per sequence (K/V of every layer >= min(l), h at every l, teacher top-n) is
cached on disk and shared by every setting, so a setting costs only its pseudo passes.

Phase 1: every layer at one k. Phase 2: the other k values at the best layer (by chain).

    python benchmarks/sweep_layers.py --samples 300 --val 40 --layers 6,10,15,20,24 --ks 2,3,4,5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firp_engine.firp import train as T  # noqa: E402
from firp_engine.firp.context import ContextStore  # noqa: E402
from firp_engine.firp.objective import FIRP  # noqa: E402
from firp_engine.firp.train_cli import load_data  # noqa: E402
from firp_engine.loading import load  # noqa: E402
from firp_engine.model import Transformer  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def row(layer: int, k: int, val: dict, state: T.TrainState, val_s: float) -> dict:
    return {
        "layer": layer,
        "k": k,
        **{x: val[x] for x in ("top1", "top5", "chain_accepted", "groups", "acc")},
        "steps": state.step,
        "final_train_loss": state.history[-1]["loss"] if state.history else None,
        "train_wall_s": round(state.wall_s, 1),
        "train_cpu_s": round(state.cpu_s, 1),
        "val_wall_s": round(val_s, 1),
    }


def show(r: dict) -> str:
    pct = lambda xs: "/".join(f"{100 * x:.1f}" for x in xs)
    return (
        f"l={r['layer']:2d} k={r['k']}  top1 {pct(r['top1']):<22} top5 {pct(r['top5']):<22} "
        f"chain {r['chain_accepted']:.3f}  loss {r['final_train_loss']}  train {r['train_wall_s']:.0f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", default="6,10,15,20,24")
    ap.add_argument("--k", type=int, default=3, help="k of phase 1")
    ap.add_argument("--ks", default="2,3,4,5", help="k values of phase 2, at the best layer")
    ap.add_argument("--samples", type=int, default=300, help="training sequences")
    ap.add_argument("--val", type=int, default=40, help="held-out sequences")
    ap.add_argument("--val-positions", type=int, default=32, help="groups per held-out sequence")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--positions-per-seq", type=int, default=32)
    ap.add_argument("--batch-positions", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "ctx_cache"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    ap.add_argument(
        "--warm", action="store_true", help="only fill the context cache (run it alongside on the other core)"
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start, c_start = time.monotonic(), time.process_time()
    ckpt = load(args.model)
    model = Transformer(ckpt, "fp32")
    if args.warm:  # whatever exists so far, held-out slice first
        from firp_engine.firp import data

        train_set = data.load_selfdistill("train", args.data_dir)[: args.samples]
        val_set = data.load_selfdistill("validation", args.data_dir)[: args.val]
    else:
        train_set, val_set, desc = load_data(args.samples, args.val, args.data_dir)
    layers = ints(args.layers)
    base = T.TrainConfig(
        layer=layers[0],
        k=args.k,
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        batch_positions=args.batch_positions,
        positions_per_seq=args.positions_per_seq,
        seed=args.seed,
        val_positions=args.val_positions,
        ckpt_every=0,
    )
    store = ContextStore(model, layers, base.n_top, base.max_len, False, args.cache_dir, ckpt.fingerprint())
    if args.warm:  # in the order the runs read them, so a sweep started alongside finds them ready
        order = T.epoch_order(len(train_set), args.seed, 0)
        for ex in T.progress_bar(val_set + [train_set[i] for i in order], "context passes", True):
            store.get(ex)
        print(store.stats())
        return
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
        "(2-core AMD EPYC CPU, shared with other jobs)",
        "model": Path(ckpt.source).name,
        "data": desc,
        "settings": {**vars(args), "train_config": dataclasses.asdict(base)},
        "runs": [],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def run(layer: int, k: int) -> dict:
        cfg = dataclasses.replace(base, layer=layer, k=k)
        head, state = T.train(model, FIRP, train_set, cfg, store, progress=True)
        t0 = time.monotonic()
        val = T.validate(model, FIRP, head, val_set, cfg, store, progress=True)
        r = row(layer, k, val, state, time.monotonic() - t0)
        out["runs"].append(r)
        out["context_passes"] = store.stats()
        out["total_wall_s"] = round(time.monotonic() - t_start, 1)
        out["total_cpu_s"] = round(time.process_time() - c_start, 1)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(show(r), flush=True)
        return r

    phase1 = [run(layer, args.k) for layer in layers]
    best = max(phase1, key=lambda r: r["chain_accepted"])["layer"]
    phase2 = [run(best, k) for k in ints(args.ks) if k != args.k]
    at_best = [r for r in phase1 if r["layer"] == best] + phase2
    out["best_layer"] = best
    out["best"] = max(at_best, key=lambda r: r["chain_accepted"])
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(show(r) for r in out["runs"]))
    print(f"best layer {best}; total {out['total_wall_s']:.0f}s wall, {out['total_cpu_s']:.0f}s CPU")


if __name__ == "__main__":
    main()
