"""The paper's analyses on held-out self-generated text: FIRP vs Medusa vs early exit.

    python benchmarks/analyses.py [--head PATH] [--medusa PATH] [--val 40] [--positions 32]

Writes benchmarks/results/analyses.json and analyses_*.png:

1. accuracy: top-1/3/5 per future offset against the model's own greedy tokens. Offset i
   is token p+i+1 for the newest token p (offset 0, token p+1, is exact for FIRP and
   Medusa: the full model gives it). FIRP: pseudo row i; Medusa: head i. Early exit (no
   training; final norm + LM head on the layer-l residual) in two readings:
     - `early_exit_direct`: the exit at position p itself guesses token p+i+1 (what a
       drafter gets from p's layer-l state alone, FIRP without its projection and refinement);
     - `early_exit_ar`: the exit at position p+i, i.e. with the true tokens up to p+i: what a
       self-speculative early-exit drafter proposes at offset i whenever its earlier drafts
       were right (it must run i more partial forwards, one after the other, to get there).
       Only its chain figure (drafts kept until the first miss) is a like-for-like acceptance.
   `chain_accepted` = mean drafts at offsets 1..k a greedy chain keeps (bonus excluded).
2. refinement: for each offset i, at every depth j = l..L (the residual entering layer j;
   L = after the last layer), the cosine between the pseudo state and the TRUE state of the
   same future position p+i, the top-1 of decoding each (final norm + LM head) and, as a
   yardstick for the cosines, the cosine between the true states at p and p+i.
3. mean accepted tokens per step (bonus included) vs tree node budget, FIRP and Medusa:
   measured by greedy decoding of held-out prompts with the decoders (and checked equal to
   plain greedy), next to the value the acc tables predict (DraftTree.expected_accepted).
4. the l x k sweep of benchmarks/results/sweep.json (benchmarks/sweep_layers.py), if present.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firp_engine.baselines.medusa import MedusaHead, head_logits  # noqa: E402
from firp_engine.firp import data  # noqa: E402
from firp_engine.firp.context import Context, Example, run_context  # noqa: E402
from firp_engine.firp.head import FirpHead, shipped_head  # noqa: E402
from firp_engine.firp.objective import group_attend  # noqa: E402
from firp_engine.firp.train import candidate_positions, rank_metrics  # noqa: E402
from firp_engine.model import Transformer  # noqa: E402
from firp_engine.spec.tree import DraftTree  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def ranks_of(logits: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """logits [N, V], want [N] -> how many tokens score above the wanted one [N]."""
    return (logits > logits.gather(-1, want[:, None])).sum(-1)


def decode_ranks(model: Transformer, h: torch.Tensor, want: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Ranks of `want` [N] under final norm + LM head of the states h [N, d]."""
    return torch.cat(
        [ranks_of(model.logits(h[a : a + chunk]), want[a : a + chunk]) for a in range(0, h.shape[0], chunk)]
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


# ---------------------------------------------------------------- 1 + 2: one pass per sequence


@torch.no_grad()
def sequence_stats(model: Transformer, firp: FirpHead, medusa: MedusaHead, ex: Example, n_pos: int) -> dict:
    """Per-sequence ranks and cosines at up to n_pos evenly spread reply positions."""
    layer, k, n_layers = firp.layer, firp.k, model.cfg.n_layers
    prompt, reply = ex
    ids = torch.tensor((list(prompt) + list(reply))[:1024])
    t, n_prompt = ids.shape[0], min(len(prompt), ids.shape[0])
    hs, ks, vs, x_final = run_context(model, ids, list(range(layer, n_layers)))
    hs[n_layers] = x_final  # depth L: after the last layer, before the final norm
    greedy = torch.cat([model.logits(x_final[a : a + 256]).argmax(-1) for a in range(0, t, 256)])
    empty = torch.zeros(0)
    ctx = Context(t, n_prompt, hs, ks, vs, empty.long(), empty, empty, n_prompt)
    _, pos = candidate_positions(ctx, k, full_groups=True)
    if len(pos) > n_pos:
        pos = pos[torch.linspace(0, len(pos) - 1, n_pos).round().long()]
    if len(pos) == 0:
        return {}
    offs = torch.arange(1, k + 1)
    fut = (pos[:, None] + offs).reshape(-1)  # [G*k] future positions p+i, row-major like pseudo rows
    want = greedy[fut]  # token p+i+1
    # FIRP pseudo rows through layers l..L-1, kept at every depth
    x = firp(hs[layer][pos])
    attend = group_attend(model, [(ctx, pos)], k, layer)
    cos, top1, true_top1, base_cos = [], [], [], []
    for j in range(layer, n_layers + 1):
        cos.append(cosine(x, hs[j][fut]).view(-1, k))
        top1.append((decode_ranks(model, x, want) == 0).view(-1, k))
        true_top1.append((decode_ranks(model, hs[j][fut], want) == 0).view(-1, k))
        base_cos.append(cosine(hs[j][pos].repeat_interleave(k, 0), hs[j][fut]).view(-1, k))
        if j < n_layers:
            x = model.run_layer(j, x.clone(), fut, attend)
    firp_rank = decode_ranks(model, x, want).view(-1, k)
    # Medusa heads on the final normed state of p
    hn = model.final_norm(x_final[pos])
    med_logits = head_logits(model, medusa.to(model.dtype), hn)  # [G, k, V]
    med_rank = ranks_of(med_logits.reshape(-1, med_logits.shape[-1]), want).view(-1, k)
    # early exit: the layer-l residual at p+i (i = 0..k) decoded by final norm + LM head
    rows = (pos[:, None] + torch.arange(0, k + 1)).reshape(-1)  # [G*(k+1)]
    exit_logits = model.logits(hs[layer][rows]).view(len(pos), k + 1, -1)
    tok = greedy[rows].view(len(pos), k + 1)  # token after each row
    ee_ar = ranks_of(exit_logits.reshape(-1, exit_logits.shape[-1]), tok.reshape(-1)).view(len(pos), k + 1)
    ee_direct = (exit_logits[:, :1] > exit_logits[:, 0].gather(-1, tok)[..., None]).sum(-1)  # [G, k+1]
    return {
        "firp": firp_rank,
        "medusa": med_rank,
        "early_exit_ar": ee_ar,
        "early_exit_direct": ee_direct,
        "cos": torch.stack(cos, 1),  # [G, depths, k]
        "top1": torch.stack(top1, 1),
        "true_top1": torch.stack(true_top1, 1),
        "base_cos": torch.stack(base_cos, 1),
    }


def accuracy_table(r: dict, k: int) -> dict:
    """Top-1/3/5 per offset (offset 0 = token p+1) and chain acceptance for each predictor."""

    def tops(rank: torch.Tensor) -> dict:
        return {f"top{n}": [round((rank[:, i] < n).float().mean().item(), 4) for i in range(rank.shape[1])]
                for n in (1, 3, 5)}  # fmt: skip

    out = {}
    for name in ("firp", "medusa"):
        m = rank_metrics(r[name], 8)
        out[name] = {"offsets": list(range(1, k + 1)), **tops(r[name]), "chain_accepted": m["chain_accepted"],
                     "acc": m["acc"]}  # fmt: skip
    for name in ("early_exit_ar", "early_exit_direct"):
        chain = torch.cumprod((r[name][:, 1:] == 0).float(), 1).sum(1).mean().item()
        out[name] = {"offsets": list(range(k + 1)), **tops(r[name]), "chain_accepted": round(chain, 4)}
    return out


def refinement_table(r: dict, layer: int, n_layers: int) -> dict:
    def mean(x: torch.Tensor) -> list[list[float]]:  # [G, depths, k] -> [k][depths]
        return [[round(v, 4) for v in row] for row in x.float().mean(0).T.tolist()]

    return {
        "depths": list(range(layer, n_layers + 1)),
        "note": "depth j = the residual entering layer j (j = L: after the last layer); rows = offsets 1..k",
        "cos_pseudo_vs_true": mean(r["cos"]),
        "cos_true_p_vs_true_future": mean(r["base_cos"]),
        "top1_pseudo_decoded": mean(r["top1"]),
        "top1_true_state_decoded": mean(r["true_top1"]),
    }


# ---------------------------------------------------------------- 3: acceptance vs budget


def acceptance_vs_budget(args, firp: FirpHead, medusa: MedusaHead, prompts: list[list[int]]) -> dict:
    from firp_engine.generate import LLM

    llm = LLM(args.model, dtype=args.decode_dtype, max_context=2048)
    run = lambda method, **kw: llm.generate([""] * len(prompts), prompt_ids=prompts, method=method,  # noqa: E731
                                            max_new_tokens=args.decode_tokens, **kw)  # fmt: skip
    t0 = time.perf_counter()
    ar = run("ar")
    out = {"dtype": args.decode_dtype, "backend": llm.backend.name, "prompts": len(prompts),
           "max_new_tokens": args.decode_tokens, "ar_decode_s": round(sum(r.decode_s for r in ar), 2),
           "rows": []}  # fmt: skip
    for budget in args.budgets:
        for name, head in (("firp", firp), ("medusa", medusa)):
            # FIRP: every node spawns pseudo rows, so the next tree always comes from the
            # accepted node's own (tau at a node budget; the CPU default trades tau for cost)
            policy = {"pseudo_policy": "all"} if name == "firp" else {}
            res = run(name, head=head, tree_budget=budget, **policy)
            steps, toks = sum(r.steps for r in res), sum(r.new_tokens - 1 for r in res)
            acc = head.meta.get("acc")
            est = DraftTree.build(acc, budget).expected_accepted() if acc else None
            row = {
                "method": name,
                "budget": budget,
                "mean_accepted": round(toks / steps, 4),
                "estimated_from_acc": round(est, 4) if est else None,
                "decode_s": round(sum(r.decode_s for r in res), 2),
                "same_as_ar": sum(r.new_ids == a.new_ids for r, a in zip(res, ar, strict=True)),
            }
            out["rows"].append(row)
            print(f"  {name:6s} budget {budget:2d}: {row['mean_accepted']:.3f} accepted/step "
                  f"(est {row['estimated_from_acc']}), {row['same_as_ar']}/{len(prompts)} == ar, "
                  f"{row['decode_s']:.1f}s", flush=True)  # fmt: skip
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------- plots


def plot_all(res: dict, sweep: dict | None, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)

    acc = res["accuracy"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, n in zip(axes, ("top1", "top3", "top5"), strict=True):
        for name, style in (
            ("firp", "o-"),
            ("medusa", "s-"),
            ("early_exit_ar", "^--"),
            ("early_exit_direct", "v:"),
        ):
            ax.plot(acc[name]["offsets"], acc[name][n], style, label=name)
        ax.set_xticks(acc["early_exit_ar"]["offsets"])
        ax.set_title(f"{n} vs the model's greedy token")
        ax.set_xlabel("offset i (token p+i+1)")
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    save(fig, "analyses_accuracy.png")

    ref = res["refinement"]
    k = len(ref["cos_pseudo_vs_true"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i in range(k):
        axes[0].plot(
            ref["depths"], ref["cos_pseudo_vs_true"][i], "o-", label=f"pseudo vs true, offset {i + 1}"
        )
        axes[0].plot(
            ref["depths"],
            ref["cos_true_p_vs_true_future"][i],
            ":",
            color=f"C{i}",
            label=f"true p vs p+{i + 1}",
        )
        axes[1].plot(ref["depths"], ref["top1_pseudo_decoded"][i], "o-", label=f"pseudo, offset {i + 1}")
        axes[1].plot(
            ref["depths"],
            ref["top1_true_state_decoded"][i],
            ":",
            color=f"C{i}",
            label=f"true state p+{i + 1}",
        )
    axes[0].set(title="cosine to the true future state", xlabel="depth (layer entered)")
    axes[1].set(title="top-1 when decoded at this depth", xlabel="depth (layer entered)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    save(fig, "analyses_refinement.png")

    if "acceptance" in res:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for i, name in enumerate(("firp", "medusa")):
            rows = [r for r in res["acceptance"]["rows"] if r["method"] == name]
            ax.plot(
                [r["budget"] for r in rows],
                [r["mean_accepted"] for r in rows],
                "o-",
                color=f"C{i}",
                label=name,
            )
            ax.plot([r["budget"] for r in rows], [r["estimated_from_acc"] for r in rows], ":", color=f"C{i}",
                    label=f"{name} (acc-table estimate)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set(xlabel="tree nodes", ylabel="tokens per step (bonus incl.)", title="acceptance vs tree budget")
        ax.legend(fontsize=8)
        save(fig, "analyses_acceptance.png")

    if sweep and sweep.get("runs"):
        runs = sweep["runs"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for k_val in sorted({r["k"] for r in runs}):
            rs = sorted((r for r in runs if r["k"] == k_val), key=lambda r: r["layer"])
            if len(rs) > 1:
                axes[0].plot(
                    [r["layer"] for r in rs], [r["chain_accepted"] for r in rs], "o-", label=f"k={k_val}"
                )
        best = sweep.get("best_layer")
        rs = sorted((r for r in runs if r["layer"] == best), key=lambda r: r["k"]) if best is not None else []
        axes[1].plot([r["k"] for r in rs], [r["chain_accepted"] for r in rs], "o-")
        axes[0].set(xlabel="layer l", ylabel="greedy chain drafts kept", title="sweep: layer")
        axes[1].set(xlabel="k", title=f"sweep: k at layer {best}")
        axes[0].legend()
        save(fig, "analyses_sweep.png")
    return written


# ---------------------------------------------------------------- main


def train_info(head) -> dict:
    return {x: head.meta.get(x) for x in ("command", "steps", "train_wall_s", "data")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--head", default=None, help="FIRP head (default: shipped, else runs/analysis_firp)")
    ap.add_argument(
        "--medusa", default=None, help="Medusa head (default: shipped, else runs/analysis_medusa)"
    )
    ap.add_argument("--val", type=int, default=40, help="held-out sequences")
    ap.add_argument("--positions", type=int, default=32, help="positions per held-out sequence")
    ap.add_argument("--budgets", default="4,8,16,32,64")
    ap.add_argument("--decode-prompts", type=int, default=10, help="0 = skip the decoding part")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "analyses.json"))
    args = ap.parse_args()
    args.budgets = [int(x) for x in args.budgets.split(",")]
    torch.set_num_threads(args.threads)
    from firp_engine.loading import load

    ckpt = load(args.model)
    fp = ckpt.fingerprint()
    head_path = args.head or str(shipped_head(fp) or ROOT / "runs" / "analysis_firp")
    med_path = args.medusa or str(shipped_head(fp, "medusa") or ROOT / "runs" / "analysis_medusa")
    firp, medusa = FirpHead.load(head_path, fp), MedusaHead.load(med_path, fp)
    model = Transformer(ckpt, "fp32")
    val = data.load_selfdistill("validation")[: args.val]
    t0, c0 = time.monotonic(), time.process_time()
    parts: list[dict] = []
    for n, ex in enumerate(val):
        s = sequence_stats(model, firp.float().requires_grad_(False), medusa.float().requires_grad_(False),
                           ex, args.positions)  # fmt: skip
        if s:
            parts.append(s)
        print(f"\rheld-out sequence {n + 1}/{len(val)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    r = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    res = {
        "machine": f"{platform.machine()}, {args.threads} torch thread(s) (2-core AMD EPYC CPU, shared)",
        "model": Path(ckpt.source).name,
        "firp_head": {"path": head_path, "layer": firp.layer, "k": firp.k, "params": firp.n_params(),
                      "train": train_info(firp)},
        "medusa_head": {"path": med_path, "k": medusa.k, "params": medusa.n_params(),
                        "lm_head": "the model's, frozen and shared (not counted)",
                        "train": train_info(medusa)},
        "heldout": {"sequences": len(parts), "groups": int(r["firp"].shape[0]),
                    "positions_per_sequence": args.positions,
                    "target": "the engine's own fp32 greedy token (argmax of its logits) at each position"},
        "accuracy": accuracy_table(r, firp.k),
        "refinement": refinement_table(r, firp.layer, model.cfg.n_layers),
        "analysis_wall_s": round(time.monotonic() - t0, 1),
        "analysis_cpu_s": round(time.process_time() - c0, 1),
    }  # fmt: skip
    for name, a in res["accuracy"].items():
        pct = lambda xs: "/".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
        print(
            f"{name:18s} top1 {pct(a['top1']):<20} top5 {pct(a['top5']):<20} chain {a['chain_accepted']:.3f}"
        )
    if args.decode_prompts:
        prompts = [p for p, _ in val[: args.decode_prompts]]
        res["acceptance"] = acceptance_vs_budget(args, firp, medusa, prompts)
    sweep_path = RESULTS / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else None
    res["sweep"] = {"source": str(sweep_path.relative_to(ROOT)), "present": sweep is not None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res["plots"] = plot_all(res, sweep, Path(args.out).parent)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out} and {', '.join(res['plots'])}")


if __name__ == "__main__":
    main()
