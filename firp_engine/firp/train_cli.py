"""`firp train-head`: load the model and the self-distillation data, train a FIRP head (or,
with --method medusa, Medusa-1 heads) with the loop of train.py, validate it and save it
with its command, settings and figures.

    firp train-head --layer 10 --k 3 --samples 600 --epochs 1 --out runs/h10k3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from firp_engine.baselines.medusa_train import MEDUSA
from firp_engine.errors import FirpError
from firp_engine.firp import data
from firp_engine.firp.context import ContextStore, Example
from firp_engine.firp.objective import FIRP
from firp_engine.firp.train import TrainConfig, check_config, epoch_order, progress_bar, train, validate
from firp_engine.firp.vocab import token_order
from firp_engine.generate import LLM

OBJECTIVES = {o.kind: o for o in (FIRP, MEDUSA)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(layer=0, k=0)
    p.add_argument("--method", choices=list(OBJECTIVES), default="firp", help="draft head kind")
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="FIRP (required): pseudo rows enter after this many layers; "
        f"Medusa: the cached layer its final states are rebuilt from (default {MEDUSA.default_layer})",
    )
    p.add_argument("--k", type=int, required=True, help="future offsets predicted")
    p.add_argument("--samples", type=int, default=0, help="training sequences (0 = all)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--out", required=True, help="head path, without suffix (.safetensors + .json)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear warmup (then cosine)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-positions", type=int, default=d.batch_positions, help="groups per step")
    p.add_argument("--positions-per-seq", type=int, default=d.positions_per_seq)
    p.add_argument("--prompt-frac", type=float, default=d.prompt_frac)
    p.add_argument("--offset-weights", default="", help="comma-separated loss weight per offset")
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=d.hidden_weight,
        help="FIRP: add this x the relative error of each pseudo state against the real layer-l "
        "state of the token it stands for (0 = KL only, the paper's objective)",
    )
    p.add_argument(
        "--root-embedding",
        action="store_true",
        help="FIRP: each pseudo state also sees the input embedding of the node's own token (a head variant)",
    )
    p.add_argument("--n-top", type=int, default=d.n_top, help="teacher ids in the KL")
    p.add_argument(
        "--loss", default=d.loss, choices=["tail", "top"], help="KL over top-n + tail, or renormalised top-n"
    )
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--val", type=int, default=64, help="held-out sequences to validate on (0 = skip)")
    p.add_argument("--val-positions", type=int, default=d.val_positions, help="groups per held-out sequence")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="training time limit")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--run-dir", default=None, help="checkpoints (default: runs/<name of --out>)")
    p.add_argument(
        "--cache-dir",
        default="runs/ctx_cache",
        help="per-sequence context passes (K/V, teacher top-n) kept between epochs and runs ('' = off)",
    )
    p.add_argument(
        "--data-dir",
        action="append",
        help="folder of self-distillation shards, repeatable: read in order, a record id seen before "
        "is skipped (default: data/selfdistill, the committed data; name it too to add another)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    p.add_argument(
        "--precompute",
        action="store_true",
        help="only fill --cache-dir with context passes, in the order training reads them "
        "(run alongside a training run with the same settings to use a second core)",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 leaves other cores to a --precompute run)"
    )
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace, layer: int) -> TrainConfig:
    weights = [float(x) for x in args.offset_weights.split(",") if x.strip()]
    return TrainConfig(
        layer=layer,
        k=args.k,
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        batch_positions=args.batch_positions,
        positions_per_seq=args.positions_per_seq,
        prompt_frac=args.prompt_frac,
        n_top=args.n_top,
        loss=args.loss,
        offset_weights=weights,
        hidden_weight=args.hidden_weight,
        root_embedding=args.root_embedding,
        max_len=args.max_len,
        seed=args.seed,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        ckpt_every=args.ckpt_every,
        val_positions=args.val_positions,
    )


def load_data(
    n_train: int, n_val: int, data_dir: str | list[str] | None = None
) -> tuple[list[Example], list[Example], dict]:
    """The first n_train / n_val self-distilled sequences (0 = all train) and their description."""
    train_set = data.load_selfdistill("train", data_dir)
    val_set = data.load_selfdistill("validation", data_dir) if n_val else []
    if not train_set:
        raise FirpError("no self-distilled training data (see firp_engine/firp/data.py)")
    train_set = train_set[:n_train] if n_train else train_set
    val_set = val_set[:n_val]
    desc = {
        "source": "ShareGPT prompts; targets are the model's own logits (self-distillation)",
        "folders": data.describe(data_dir),
        "train_sequences": len(train_set),
        "train_reply_tokens": sum(len(r) for _, r in train_set),
        "val_sequences": len(val_set),
    }
    return train_set, val_set, desc


def precompute(
    store: ContextStore, train_set: list[Example], val_set: list[Example], cfg: TrainConfig, progress: bool
) -> dict:
    if store.dir is None:
        raise FirpError("--precompute needs a --cache-dir")
    for idx in progress_bar(epoch_order(len(train_set), cfg.seed, 0), "context passes", progress):
        store.get(train_set[idx], [cfg.layer])
    for ex in progress_bar(val_set, "context passes, held out", progress):
        store.get(ex, [cfg.layer])
    print(json.dumps(store.stats()))
    return store.stats()


def run(args: argparse.Namespace) -> dict:
    """Train, validate and save a head as the parsed `firp train-head` arguments say."""
    objective = OBJECTIVES[args.method]
    layer = args.layer if args.layer is not None else objective.default_layer
    if layer is None:
        raise FirpError(f"--layer is required for {objective.kind} heads")
    for flag, on in (("--hidden-weight", args.hidden_weight), ("--root-embedding", args.root_embedding)):
        if on and objective.kind != "firp":
            raise FirpError(f"{flag} applies to FIRP heads only (Medusa heads have no pseudo states)")
    cfg = config_from_args(args, layer)
    # The torch backend: training needs the references (autograd), and the cached context
    # passes stay comparable across runs. No KV pool: training attends on its own.
    llm = LLM(args.model, args.dtype, backend="torch", kv_blocks=1, threads=args.threads)
    model, fingerprint = llm.model, llm.fingerprint
    check_config(model, cfg)
    train_set, val_set, desc = load_data(args.samples, args.val, args.data_dir)
    store = ContextStore(
        model, [cfg.layer], cfg.n_top, cfg.max_len, cfg.prompt_frac > 0, args.cache_dir, fingerprint
    )
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".safetensors") else out
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / out.name
    progress = not args.no_progress
    if args.precompute:
        return precompute(store, train_set, val_set, cfg, progress)
    ckpt_path = run_dir / "checkpoint.pt"
    head, state = train(model, objective, train_set, cfg, store, ckpt_path, args.resume, progress)
    t0, c0 = time.monotonic(), time.process_time()
    val = validate(model, objective, head, val_set, cfg, store, progress) if val_set else {}
    argv = list(getattr(args, "argv", None) or sys.argv[1:])  # as typed, for the head's JSON
    argv = argv[1:] if argv[:1] == ["train-head"] else argv
    meta = {
        "fingerprint": fingerprint,
        "model": llm.source.name,
        "dtype": args.dtype,
        "command": "firp train-head " + shlex.join(argv),
        "train_config": asdict(cfg),
        "data": desc,
        "steps": state.step,
        "threads": args.threads,
        "train_wall_s": round(state.wall_s, 1),  # this invocation (a resumed run counts its last part)
        "train_cpu_s": round(state.cpu_s, 1),
        "validation_wall_s": round(time.monotonic() - t0, 1),
        "validation_cpu_s": round(time.process_time() - c0, 1),
        "context_passes": store.stats(),
        "trainable_params": head.n_params(),
        "final_train_loss": state.history[-1]["loss"] if state.history else None,
        "validation": {k: v for k, v in val.items() if k != "acc"},
        "acc": val.get("acc"),
    }
    if objective.kind == "firp":  # the draft vocabulary's order (firp/vocab.py), from these replies
        head.vocab_order = token_order((r for _, r in train_set), model.cfg.vocab_size)
        meta["vocab_order"] = {"counted_on": "the training replies"}
    head.save(out, meta)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "history.json").write_text(json.dumps(state.history) + "\n")
    print(json.dumps({"out": str(out), "train_wall_s": meta["train_wall_s"], **meta["validation"]}))
    return meta
