#!/usr/bin/env python3
"""Train a bundled tiny LLaDA or Dream model with the masked-diffusion objective, reproducibly.

The model is the project's own PyTorch implementation (``qdllm_export.models``), parameters named as
in the published checkpoints, and is saved with ``save_checkpoint`` in the official layout
(``config.json``, ``model.safetensors`` in bfloat16, ``tokenizer.json``).

Objective (``shared/research/models.md`` section 3, LLaDA GUIDELINES.md): for a window ``x`` of
``L`` tokens, ``t ~ U(0, 1)`` per row, ``p_mask = (1 - eps) t + eps``, every position masked
independently with probability ``p_mask``; ``loss = sum_masked CE(logits, x) / p_mask / (B * L)``.
Every window starts with ``<|bos|>``, which is never masked. LLaDA scores position ``i`` with logits
row ``i``; Dream with row ``i - 1`` (its raw logits are shifted right by one,
``cat([l[:, :1], l[:, :-1]])``, as Dream's own training and sampling code does).

Validation NLL (nats/token) is the same estimator, an upper bound on the true NLL, on fixed windows
of the held-out works with a fixed seed and ``t`` stratified over the rows; divided by the number of
scored tokens (the window length minus the bos).

Inputs come from ``scripts/prepare_corpus.py``: ``<corpus>/train/*.txt``, ``<corpus>/val/*.txt``
and ``<corpus>/tokenizer.json``. Training stops after ``--steps`` steps, or else when ``--minutes``
of wall-clock time (periodic evaluations included) have passed; with a time budget the cosine
schedule follows elapsed time, and the log prints the step count to pass as ``--steps`` for a re-run.
The checkpoint kept is the one with the best validation NLL (``--keep best``) or the last one.

Example::

    python scripts/prepare_corpus.py
    python scripts/train_tiny.py --family llada --out qdllm_export/data/tiny-llada --minutes 7 --seed 0
    python scripts/train_tiny.py --family dream --out qdllm_export/data/tiny-dream --minutes 7 --seed 0
    python scripts/train_tiny.py --family llada-moe --out qdllm_export/data/tiny-llada-moe --minutes 6 --seed 0

A mixture (``llada-moe``) adds the Switch-Transformer load-balancing term ``--aux-loss * E * sum_e f_e P_e``
(``f_e``: share of routed slots that go to expert ``e``, ``P_e``: its mean router probability), per layer,
so that every expert is trained and reached by calibration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from formats.families import FAMILIES, HParams  # noqa: E402
from formats.tokenizer import SPECIAL_TOKENS  # noqa: E402

FAMILY_DEFAULTS = {
    "llada": {"n_kv_heads": None, "rope_theta": 500000.0, "norm_eps": 1e-5},
    "dream": {"n_kv_heads": 2, "rope_theta": 1e6, "norm_eps": 1e-6},
    "llada-moe": {"n_kv_heads": None, "rope_theta": 50000.0, "norm_eps": 1e-5},
}
DEFAULT_PROMPT = "ANTONY.\nFriends, Romans, countrymen, lend me your ears;\n"  # Julius Caesar: a held-out work


class Log:
    def __init__(self, path: Path | None):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a") if path else None

    def __call__(self, *parts) -> None:
        msg = " ".join(str(p) for p in parts)
        print(msg, flush=True)
        if self.f:
            self.f.write(msg + "\n")
            self.f.flush()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--out", required=True, type=Path, help="model folder to write (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--corpus", type=Path, default=ROOT / ".work" / "corpus", help="output folder of prepare_corpus.py")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: <corpus>/tokenizer.json)")
    ap.add_argument("--log", type=Path, help="also append the log to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget (evaluations included)")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of --minutes")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on error)")
    # model
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-kv-heads", type=int, help="default: n_heads (llada, MHA) / 2 (dream, GQA)")
    ap.add_argument("--d-ff", type=int, default=768)
    ap.add_argument("--n-expert", type=int, default=8, help="llada-moe: experts per layer")
    ap.add_argument("--n-expert-used", type=int, default=2, help="llada-moe: experts each token is routed to")
    ap.add_argument("--d-ff-exp", type=int, default=256, help="llada-moe: one expert's hidden size")
    ap.add_argument("--aux-loss", type=float, default=0.01, help="llada-moe: load-balancing loss weight")
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--rope-theta", type=float, help="default: 500000 (llada) / 1e6 (dream)")
    ap.add_argument("--norm-eps", type=float, help="default: 1e-5 (llada) / 1e-6 (dream)")
    ap.add_argument("--init-std", type=float, default=0.02)
    # optimisation
    ap.add_argument("--seq-len", type=int, default=256, help="window length, bos included")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=300, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--mask-eps", type=float, default=1e-3, help="p_mask = (1 - eps) t + eps")
    ap.add_argument("--var-len-frac", type=float, default=0.05,
                    help="fraction of batches cut to a random length U[2, seq_len] (LLaDA pre-training: 1%%), so that "
                         "the model also sees short sequences such as a prompt + 64 generated tokens")
    # evaluation / logging
    ap.add_argument("--eval-every", type=float, help="seconds between validations (default 20); steps with --steps (default 500)")
    ap.add_argument("--eval-repeats", type=int, default=4, help="mask draws per validation window")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=0, help="cap on validation windows (0: all)")
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--keep", choices=("best", "last"), default="best")
    # greedy sample
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32, help="LLaDA semi-autoregressive block")
    args = ap.parse_args(argv)
    d = FAMILY_DEFAULTS[args.family]
    for k in ("n_kv_heads", "rope_theta", "norm_eps"):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    if args.n_kv_heads is None:  # LLaDA: plain multi-head attention
        args.n_kv_heads = args.n_heads
    if args.d_model % args.n_heads or args.n_heads % args.n_kv_heads:
        ap.error(f"d_model {args.d_model}, n_heads {args.n_heads}, n_kv_heads {args.n_kv_heads} do not divide")
    if args.tokenizer is None:
        args.tokenizer = args.corpus / "tokenizer.json"
    if args.eval_every is None:
        args.eval_every = 500 if args.steps else 20.0
    return args


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def load_split(corpus: Path, split: str, tok, eos: int) -> torch.Tensor:
    """Token stream of a split: every work's tokens followed by eos, works in name order."""
    files = sorted((corpus / split).glob("*.txt"))
    if not files:
        raise SystemExit(f"{corpus / split}: no *.txt; run scripts/prepare_corpus.py first")
    ids: list[int] = []
    for f in files:
        ids += tok.encode(f.read_text()).ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def fixed_windows(stream: torch.Tensor, n_body: int, bos: int, cap: int = 0) -> torch.Tensor:
    """Non-overlapping windows ``[bos] + n_body tokens`` covering the stream (tail dropped)."""
    n = stream.numel() // n_body
    w = stream[: n * n_body].view(n, n_body)
    if cap and n > cap:
        w = w[torch.linspace(0, n - 1, cap).long()]
    return torch.cat([torch.full((w.shape[0], 1), bos, dtype=torch.long), w], dim=1)


# ----------------------------------------------------------------------------------------------
# objective
# ----------------------------------------------------------------------------------------------


def masked_diffusion_terms(model: nn.Module, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, *, mask_id: int,
                           eps: float, shift: bool) -> torch.Tensor:
    """``CE / p_mask`` at masked positions, 0 elsewhere, ``[B, L]`` float32.

    ``t [B]`` is the diffusion time of each row, ``u [B, L]`` uniform draws: position j is masked when
    ``u < p_mask``. Position 0 (bos) is never masked.
    """
    p = (1.0 - eps) * t + eps  # [B]
    masked = u < p[:, None]
    masked[:, 0] = False
    noisy = torch.where(masked, torch.full_like(x, mask_id), x)
    logits = model(noisy)
    if shift:  # Dream: raw row i scores token i + 1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), x.flatten(), reduction="none").view_as(x)
    return ce * masked / p[:, None]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, args, hp: HParams, device, autocast) -> float:
    """Validation NLL upper bound, nats per scored token; deterministic (fixed seed, stratified t)."""
    model.eval()
    g = torch.Generator().manual_seed(args.eval_seed)
    n, L = windows.shape
    total, count = 0.0, 0
    for _ in range(args.eval_repeats):
        u0 = torch.rand((), generator=g).item()
        t_all = (u0 + torch.arange(n, dtype=torch.float64) / n) % 1.0
        t_all = t_all[torch.randperm(n, generator=g)].float()
        u_all = torch.rand((n, L), generator=g)
        for s in range(0, n, args.eval_batch):
            x = windows[s : s + args.eval_batch].to(device)
            with autocast():
                terms = masked_diffusion_terms(model, x, t_all[s : s + args.eval_batch].to(device),
                                               u_all[s : s + args.eval_batch].to(device), mask_id=hp.mask_token_id,
                                               eps=args.mask_eps, shift=hp.spec.shift_logits)
            total += terms.double().sum().item()
            count += x.shape[0] * (L - 1)
    model.train()
    return total / count


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """N(0, std) for embeddings and linears, output projections of each block scaled by 1/sqrt(2 n_layers),
    zero biases, unit norm weights."""
    resid = {id(m) for blk in model.blocks for role, m in blk.linears().items() if role == "attn_output" or role.startswith("ffn_down")}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            s = std / math.sqrt(2 * n_layers) if id(m) in resid else std
            nn.init.normal_(m.weight, 0.0, s)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif hasattr(m, "weight") and m.weight is not None and m.weight.ndim == 1:
            nn.init.ones_(m.weight)


def router_probs(model: nn.Module) -> list[torch.Tensor]:
    """Hooks that keep each MoE layer's router probabilities ``[T, E]`` float32 of the last forward (empty for a dense
    model): read by :func:`balance_loss`."""
    kept: list[torch.Tensor] = []
    for blk in model.blocks:
        gate = getattr(blk.mlp, "gate", None)
        if gate is not None:
            gate.register_forward_hook(lambda m, i, o: kept.append(torch.softmax(o.float().reshape(-1, o.shape[-1]), -1)))
    return kept


def balance_loss(probs: list[torch.Tensor], k: int) -> torch.Tensor:
    """Switch-Transformer load balance, summed over layers: ``E * sum_e f_e P_e`` (1 when uniform)."""
    total = torch.zeros((), device=probs[0].device)
    for p in probs:
        E = p.shape[-1]
        f = torch.bincount(p.topk(k, dim=-1).indices.reshape(-1), minlength=E).float() / (p.shape[0] * k)
        total = total + E * (f * p.mean(0)).sum()
    return total


def lr_at(progress: float, step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cos)


def greedy_sample(model, hp: HParams, tok, ids: dict[str, int], args, device) -> list[tuple[str, str]]:
    """Greedy generations with the official samplers (``runtime_ref.sampler``), as (label, text)."""
    from runtime_ref.sampler import dream_generate, llada_generate

    model.eval()
    shift = hp.spec.shift_logits

    @torch.no_grad()
    def logits_fn(x: np.ndarray) -> np.ndarray:
        lg = model(torch.from_numpy(x).to(device)).float()
        if shift:
            lg = torch.cat([lg[:, :1], lg[:, :-1]], dim=1)
        return lg.cpu().numpy()

    prompt = np.array([[ids["bos"]] + tok.encode(args.prompt).ids], dtype=np.int64)
    Lp, G = prompt.shape[1], args.gen_length
    runs = []
    if not hp.spec.shift_logits:  # llada, llada-moe
        out = llada_generate(logits_fn, prompt, mask_id=hp.mask_token_id, steps=G, gen_length=G,
                             block_length=args.block_length, temperature=0.0, remasking="low_confidence")
        runs.append((f"llada low_confidence, steps={G}, gen_length={G}, block_length={args.block_length}, temperature 0", out))
    else:
        for alg in ("entropy", "maskgit_plus"):
            out = dream_generate(logits_fn, prompt, mask_id=hp.mask_token_id, max_new_tokens=G, steps=G, alg=alg,
                                 temperature=0.0)
            runs.append((f"dream alg={alg}, steps={G}, max_new_tokens={G}, temperature 0", out))
    return [(label, tok.decode(out[0, Lp:].tolist(), skip_special_tokens=False)) for label, out in runs]


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    log = Log(args.log)
    from tokenizers import Tokenizer

    from qdllm_export.models import build_model, load_model, save_checkpoint

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    tok = Tokenizer.from_file(str(args.tokenizer))
    V = tok.get_vocab_size()
    eos, bos, mask = (tok.token_to_id(s) for s in SPECIAL_TOKENS)
    if (eos, bos, mask) != (V - 3, V - 2, V - 1):
        raise SystemExit(f"{args.tokenizer}: specials must be the last three ids, got eos {eos} bos {bos} mask {mask}")
    ids = {"eos": eos, "bos": bos, "mask": mask}
    hp = HParams(family=args.family, n_vocab=V, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                 n_kv_heads=args.n_kv_heads, d_ff=args.d_ff, rope_theta=args.rope_theta, norm_eps=args.norm_eps,
                 mask_token_id=mask, context_length=args.context_length, bos_token_id=bos, eos_token_id=eos,
                 **(dict(n_expert=args.n_expert, n_expert_used=args.n_expert_used, d_ff_exp=args.d_ff_exp)
                    if args.family == "llada-moe" else {}))

    log(f"# train_tiny {args.family}: {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    log(f"# args {json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})}")
    log(f"# host {platform.node()} python {platform.python_version()} torch {torch.__version__} device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else f" ({os.cpu_count()} cpus)"))
    log(f"# hparams {json.dumps(hp.to_dict())}")

    train = load_split(args.corpus, "train", tok, eos).to(device)
    val_windows = fixed_windows(load_split(args.corpus, "val", tok, eos), args.seq_len - 1, bos, args.eval_windows)
    g_cpu = torch.Generator().manual_seed(args.seed + 1)
    trn_windows = fixed_windows(train.cpu()[torch.randint(0, max(1, train.numel() - 400_000), (), generator=g_cpu):]
                                [:val_windows.shape[0] * (args.seq_len - 1)], args.seq_len - 1, bos, args.eval_windows)
    log(f"# data: train {train.numel()} tokens, val {val_windows.shape[0]} windows x {args.seq_len} "
        f"(train-subset eval {trn_windows.shape[0]} windows)")

    model = build_model(hp, torch.float32, device)
    init_weights(model, args.init_std, hp.n_layers)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"# parameters {n_params:,} ({n_params * 2 / 1e6:.2f} MB in bf16)")
    probs = router_probs(model)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(args.beta1, args.beta2), **({"fused": True} if cuda else {}))
    fwd = model
    if args.compile:
        try:
            fwd = torch.compile(model)
        except Exception as e:  # pragma: no cover
            log(f"# torch.compile failed ({e}); eager")

    g = torch.Generator(device=device).manual_seed(args.seed)
    B, L = args.batch, args.seq_len
    body = torch.arange(L - 1, device=device)
    bos_col = torch.full((B, 1), bos, dtype=torch.long, device=device)
    g_len = torch.Generator().manual_seed(args.seed + 2)
    budget = args.minutes * 60.0
    best = (float("inf"), -1, None)
    hist = []

    def do_eval(step: int, elapsed: float) -> None:
        nonlocal best
        v = evaluate(model, val_windows, args, hp, device, autocast)  # eager: no recompiles for eval shapes
        tr = evaluate(model, trn_windows, args, hp, device, autocast)
        hist.append({"step": step, "elapsed_s": round(elapsed, 1), "val_nll": v, "train_subset_nll": tr})
        mark = ""
        if v < best[0]:
            best = (v, step, {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()})
            mark = " *"
        log(f"eval step {step:6d} t {elapsed:7.1f}s  val_nll {v:.4f}  train_subset_nll {tr:.4f}  ppl<= {math.exp(v):.1f}{mark}")

    t0 = time.time()
    last_eval = 0.0
    step, run_loss, run_n, t_last = 0, 0.0, 0, time.time()
    model.train()
    while True:
        elapsed = time.time() - t0
        if args.steps:
            if step >= args.steps:
                break
            progress = step / args.steps
        else:
            if elapsed >= budget:
                break
            progress = elapsed / budget
        lr = lr_at(progress, step, args)
        for grp in opt.param_groups:
            grp["lr"] = lr
        offs = torch.randint(0, train.numel() - (L - 1), (B,), device=device, generator=g)
        x = torch.cat([bos_col, train[offs[:, None] + body]], dim=1)
        t = torch.rand(B, device=device, generator=g)
        u = torch.rand(B, L, device=device, generator=g)
        net = fwd
        if torch.rand((), generator=g_len).item() < args.var_len_frac:
            n = int(torch.randint(2, L + 1, (), generator=g_len))
            x, u, net = x[:, :n], u[:, :n], model  # eager: no recompile for odd shapes
        probs.clear()  # evaluations ran the hooks too
        try:
            with autocast():
                terms = masked_diffusion_terms(net, x, t, u, mask_id=mask, eps=args.mask_eps, shift=hp.spec.shift_logits)
            loss = terms.sum() / (B * x.shape[1])
            if probs:
                loss = loss + args.aux_loss * balance_loss(probs, hp.n_expert_used)
        except Exception as e:
            if fwd is model:
                raise
            log(f"# compiled model failed ({type(e).__name__}: {e}); falling back to eager")
            fwd = model
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        run_loss += loss.detach()
        run_n += 1
        if step <= 5 or step % args.log_every == 0:
            rl = (run_loss / run_n).item()
            dt = (time.time() - t_last) / run_n
            log(f"step {step:6d} t {time.time() - t0:7.1f}s  loss {rl:.4f}  lr {lr:.2e}  gnorm {gn.item():.3f}  "
                f"{dt * 1e3:7.1f} ms/step  {B * L / dt / 1e3:8.1f} ktok/s")
            if not math.isfinite(rl):
                raise SystemExit("loss is not finite")
            run_loss, run_n, t_last = 0.0, 0, time.time()
        since = (step - last_eval) if args.steps else (time.time() - t0 - last_eval)
        if since >= args.eval_every:
            do_eval(step, time.time() - t0)
            last_eval = step if args.steps else time.time() - t0
    train_s = time.time() - t0
    if not hist or hist[-1]["step"] != step:
        do_eval(step, train_s)
    log(f"# trained {step} steps in {train_s:.1f}s ({step * B * L / 1e6:.1f}M tokens, "
        f"{step * B * L / train.numel():.1f} epochs); re-run with --steps {step} for the same schedule")
    if args.keep == "best":
        model.load_state_dict(best[2])
        log(f"# keeping the best checkpoint: step {best[1]}, val_nll {best[0]:.4f}")

    save_checkpoint(model, hp, args.out, dtype="bfloat16", tokenizer_json=args.tokenizer,
                    config_extra={"eos_token_id": eos, "pad_token_id": eos, "bos_token_id": bos, "mask_token_id": mask,
                                  **({"vocab_size": V, "embedding_size": V} if hp.family == "llada" else {})})
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    log(f"# saved {args.out}: {json.dumps(sizes)}")

    # Re-read the saved (bf16) checkpoint through the project's reader and evaluate it.
    from formats.tensors import HFTensors

    saved = load_model(HFTensors(args.out), torch.float32, device)
    args.eval_seed += 1  # fresh mask draws: the kept checkpoint was selected on the first seed's estimate
    v_saved = evaluate(saved, val_windows, args, hp, device, autocast)
    log(f"# saved checkpoint (bf16 weights) val_nll {v_saved:.4f} nats/token (ppl<= {math.exp(v_saved):.1f}; "
        f"eval seed {args.eval_seed}, {args.eval_repeats} mask draws x {val_windows.shape[0]} windows)")
    for label, text in greedy_sample(saved, hp, tok, ids, args, device):
        log(f"# greedy sample [{label}]\n# prompt: {args.prompt!r}\n{args.prompt}{text}\n# ----")
    summary = {"family": hp.family, "params": n_params, "steps": step, "train_seconds": round(train_s, 1),
               "best_step": best[1], "best_val_nll": best[0], "saved_val_nll": v_saved, "files": sizes,
               "device": torch.cuda.get_device_name(device) if cuda else "cpu", "history": hist}
    log(f"# summary {json.dumps(summary)}")


if __name__ == "__main__":
    main()
