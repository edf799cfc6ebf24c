"""Ours vs onnxruntime's own quantizer on its MatMulNBits grid: validation ΔNLL at equal bits and block size.

    python bench/ort_quant.py [--models tiny-llada tiny-dream] [--bits 2 4] [--block-sizes 32 128] [--device cpu]

For each bundled model:

* **FP**: our fp32 ONNX export (linears fp32 ``MatMul``\\ s; ``token_embd`` / ``output`` f16, as in every
  variant), the reference of every ΔNLL;
* **ours**: ``qdllm-export onnx --outtype int2|int4|int8`` (MCS calibration, true-sequential, grid driver)
  at each block size, and ``--outtype auto --bpw B``;
* **onnxruntime**: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` applied to the
  same fp32 export at the same bits and block size: ``DefaultWeightOnlyQuantConfig`` (RTN, asymmetric),
  ``HQQWeightOnlyQuantConfig``, ``GPTQWeightOnlyQuantConfig`` (calibration reader: the same MCS-masked
  windows) and ``KQuantWeightOnlyQuantConfig`` when installed. Its GPTQ / k-quant path writes MatMulNBits
  only at 4 bits; at other bits it stores the quantized weights as floats (their bits per weight are then
  what MatMulNBits would store: fp32 scales, packed zero points);
* **binary planes**: Quant-dLLM at 2 planes per block (``--outtype quantized``), for reference;
* **ours + per-channel scale** (``--channel-scale``): the experiment of issue 10 (see ``ScaledTarget``).

Every file is evaluated by onnxruntime at accuracy level 0 (fp32 compute) on identical masks
(``runtime_ref.likelihood.masked_nll``); ours also at level 4. Writes docs/ort_quant.json, the plot
docs/ort_quant.png and the section "ort-quant" of docs/benchmarks.md. ``compare()`` is the harness
(``tests/test_ort_quant.py`` runs it on a tiny model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import machine, md_table, write_section  # noqa: E402
from qdllm_export.targets.tables import TablesSpec  # noqa: E402
from formats.onnx import write_onnx  # noqa: E402
from formats.tensors import HFTensors, canonical_names, canonical_shape, is_linear  # noqa: E402
from qdllm_export.calib import CalibConfig, apply_mcs, calibration_windows  # noqa: E402

ALGOS = ("rtn", "hqq", "gptq", "kquant")
DOC_JSON, DOC_PNG = ROOT / "docs" / "ort_quant.json", ROOT / "docs" / "ort_quant.png"


@dataclass
class EvalConfig:
    """Held-out windows and Monte-Carlo masks of the ΔNLL (the same for every variant)."""

    seq_len: int = 128
    windows: int = 96
    mc: int = 8
    seed: int = 0


F16_TABLES = TablesSpec("f16", "f16")  # every file of this benchmark holds token_embd / output f16


@dataclass
class Row:
    model: str
    variant: str  # "FP", "ours", "onnxruntime <algo>", "planes"
    label: str
    bits: float | None  # nominal bits (None: FP / auto / planes)
    block_size: int | None
    bits_per_weight: float | None  # stored bits per weight of the linears (None: fp32)
    nll: float = float("nan")
    stderr: float = float("nan")
    delta: float = float("nan")
    delta_acc4: float | None = None  # ours: ΔNLL at accuracy level 4
    seconds: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- files


def fp32_export(folder: Path, path: Path) -> Path:
    """Linears as fp32 MatMul initializers (what onnxruntime's quantizer takes), embeddings and head f16."""
    return write_onnx(path, HFTensors(folder), outtype="f32", embed_type="f16", overwrite=True)


def calibration_ids(folder: Path, ccfg: CalibConfig) -> np.ndarray:
    """The MCS-masked calibration windows ``[N, L]`` int64 our pipeline uses."""
    from formats.tokenizer import load_tokenizer

    hp = HFTensors(folder).hparams
    windows = calibration_windows(load_tokenizer(folder), hp, ccfg)
    if ccfg.mcs:
        windows, _ = apply_mcs(windows, hp.mask_token_id, ccfg.prefix_ratio, ccfg.seed, protect_first=hp.spec.shift_logits)
    return windows


class WindowReader:
    """``CalibrationDataReader`` of ``{"input_ids": [batch, L]}`` over calibration windows."""

    def __init__(self, ids: np.ndarray, batch: int = 8):
        self.ids, self.batch, self.pos = ids, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.ids):
            return None
        out = {"input_ids": self.ids[self.pos:self.pos + self.batch]}
        self.pos += self.batch
        return out

    def __iter__(self):
        return iter(self.get_next, None)


def ort_config(algo: str, bits: int, block_size: int, ids: np.ndarray | None) -> Any:
    """onnxruntime's weight-only config of ``algo`` (None when this onnxruntime lacks it)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    if algo == "rtn":
        return mq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    if algo == "hqq":
        return mq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    if algo == "gptq":
        return mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=WindowReader(ids), percdamp=0.01, block_size=128,
                                            actorder=False)
    if algo == "kquant":
        return mq.KQuantWeightOnlyQuantConfig() if hasattr(mq, "KQuantWeightOnlyQuantConfig") else None
    raise ValueError(f"unknown onnxruntime algorithm {algo!r}; choose from {', '.join(ALGOS)}")


def ort_quantize(fp32: Path, out: Path, algo: str, bits: int, block_size: int, ids: np.ndarray | None = None) -> Path | None:
    """``fp32`` quantized by onnxruntime's ``MatMulNBitsQuantizer`` with ``algo`` into ``out`` (None: unavailable)."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    cfg = ort_config(algo, bits, block_size, ids)
    if cfg is None:
        return None
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    q = mq.MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=block_size, is_symmetric=False, algo_config=cfg)
    if algo in ("gptq", "kquant"):  # their per-node config hard-codes 4 bits: set ours (same keys) for every MatMul
        nodes = {n.name: {"bits": bits, "group_size": block_size, "scheme": "asym"}
                 for n in q.model.model.graph.node if n.op_type == "MatMul" and q.model.get_initializer(n.input[1]) is not None}
        q._generate_q4_node_config = lambda: dict(nodes)
    q.process()
    onnx.save(q.model.model, str(out))
    return out


def ours(folder: Path, out: Path, outtype: str, bpw: float | None, block_size: int, ccfg: CalibConfig, device: str,
         level: int) -> tuple[Path, float]:
    """Our MatMulNBits file at accuracy ``level``; returns (path, stored bits per weight of the linears)."""
    from formats.checkpoint import QuantizedCheckpoint
    from formats.tokenizer import load_tokenizer
    from qdllm_export.targets.nbits import NBitsSpec, quantize_nbits

    ck = out.with_suffix(".q")
    shutil.rmtree(ck, ignore_errors=True)
    _, rec = quantize_nbits(folder, ck, NBitsSpec(outtype, bpw, block_size), ccfg, device=device, tables=F16_TABLES)
    write_onnx(out, QuantizedCheckpoint(ck), accuracy_level=level, tokenizer=load_tokenizer(folder), overwrite=True)
    return out, float(rec["bits_per_weight_linear"])


def relevel(path: Path, out: Path, level: int) -> Path:
    """A copy of a MatMulNBits file with every node at accuracy ``level`` (same weights)."""
    import onnx

    m = onnx.load(str(path))
    for node in m.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    for p in m.metadata_props:
        if p.key == "qdllm.accuracy_level":
            p.value = str(level)
    onnx.save(m, str(out))
    return out


def planes(folder: Path, out: Path, ccfg: CalibConfig, device: str) -> tuple[Path, float]:
    """Quant-dLLM binary planes, 2 planes per block on average (function kernel, exact)."""
    from formats.checkpoint import QuantizedCheckpoint
    from formats.tokenizer import load_tokenizer
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.quant import QuantConfig

    ck = out.with_suffix(".q")
    shutil.rmtree(ck, ignore_errors=True)
    _, rec = quantize_checkpoint(folder, ck, QuantConfig(method="quant-dllm", bits=2), ccfg, device=device, tables=F16_TABLES)
    write_onnx(out, QuantizedCheckpoint(ck), tokenizer=load_tokenizer(folder), overwrite=True)
    return out, float(rec["bits_per_weight_linear"])


def linear_bits_per_weight(path: Path, hp: Any, bits: int, block_size: int) -> tuple[float, str]:
    """Stored bits per weight of an onnxruntime-quantized file's linears: its MatMulNBits initializers, or
    (weights left as float) what MatMulNBits would store: codes, fp32 scales, packed zero points."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    nbytes, n = 0, 0
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            n += attrs["K"] * attrs["N"]
            nbytes += sum(len(inits[i].raw_data) for i in node.input[1:] if i in inits)
    total = sum(int(np.prod(canonical_shape(hp, x))) for x in canonical_names(hp) if is_linear(hp, x))
    if n == total:
        return 8.0 * nbytes / n, ""
    return bits + 32.0 / block_size + bits / block_size, "stored as floats by onnxruntime; bits/w as MatMulNBits would store them"


# ---------------------------------------------------------------------------------------------- evaluation


class SessionLogits:
    """Aligned logits of any ONNX file of ours (quantized by onnxruntime or not) in a plain session."""

    def __init__(self, path: Path, shift: bool, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.shift = shift

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        from runtime_ref.backend import shift_right

        out = self.sess.run(["logits"], {"input_ids": np.asarray(ids, np.int64)})[0]
        return shift_right(out) if self.shift else out


def nll_of(path: Path, hp: Any, windows: np.ndarray, ev: EvalConfig) -> tuple[float, float]:
    from runtime_ref.likelihood import masked_nll

    res = masked_nll(SessionLogits(path, hp.spec.shift_logits), windows, mask_id=hp.mask_token_id, n_mc=ev.mc,
                     seed=ev.seed, protect_first=hp.spec.shift_logits)
    return res.nll, res.stderr


def eval_windows(folder: Path, ev: EvalConfig) -> np.ndarray:
    from formats.tokenizer import load_tokenizer
    from qdllm_export.cli.evaluate import DEFAULT_DATA, text_token_windows

    return text_token_windows(load_tokenizer(folder), DEFAULT_DATA, ev.seq_len, ev.windows)


# ---------------------------------------------------------------------------------------------- harness


def compare(folder: str | Path, work: str | Path, *, model: str = "", bits: tuple[int, ...] = (2, 4),
            block_sizes: tuple[int, ...] = (32, 128), algos: tuple[str, ...] = ALGOS, auto_bpw: tuple[float, ...] = (),
            auto_block: int = 64, with_planes: bool = False, channel_scale: bool = False, ccfg: CalibConfig | None = None,
            ev: EvalConfig | None = None, device: str = "cpu", log: Callable[[Row], None] | None = None,
            skip: set[tuple[str, int | None]] = frozenset()) -> list[Row]:
    """Every variant of the module docstring on the checkpoint at ``folder``; files go to ``work``. ``auto``
    files use ``auto_block`` (int2 at block 32 alone costs 2.56 bits per weight); the per-channel-scale
    experiment runs at the first block size. Variants whose label is in ``skip`` are left out (resuming)."""
    folder, work = Path(folder), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ccfg, ev = ccfg or CalibConfig(), ev or EvalConfig()
    hp = HFTensors(folder).hparams
    model = model or folder.name
    windows = eval_windows(folder, ev)
    rows: list[Row] = []

    def add(row: Row, path: Path, t0: float) -> None:
        row.nll, row.stderr = nll_of(path, hp, windows, ev)
        row.delta = row.nll - rows[0].nll if rows else 0.0
        row.seconds = time.time() - t0
        rows.append(row)
        if log:
            log(row)

    t0 = time.time()
    fp = fp32_export(folder, work / "fp32.onnx")
    add(Row(model, "FP", "FP (fp32 linears)", None, None, None), fp, t0)
    ids = calibration_ids(folder, ccfg) if "gptq" in algos else None
    for bs in block_sizes:
        for b in bits:
            label = f"ours int{b}"
            if (label, bs) not in skip:
                t0 = time.time()
                path, bpw = ours(folder, work / f"ours-int{b}-{bs}.onnx", f"int{b}", None, bs, ccfg, device, 0)
                row = Row(model, "ours", label, b, bs, bpw)
                row.delta_acc4 = nll_of(relevel(path, work / f"ours-int{b}-{bs}-acc4.onnx", 4), hp, windows, ev)[0] - rows[0].nll
                add(row, path, t0)
            label = f"ours int{b} + per-channel scale"
            if channel_scale and bs == block_sizes[0] and (label, bs) not in skip:
                t0 = time.time()
                path, bpw = scaled(folder, work / f"ours-cs-int{b}-{bs}.onnx", b, bs, ccfg, device)
                add(Row(model, "ours + channel scale", label, b, bs, bpw), path, t0)
            for algo in algos:
                label = f"onnxruntime {algo} int{b}"
                if (label, bs) in skip:
                    continue
                t0 = time.time()
                path = ort_quantize(fp, work / f"ort-{algo}-int{b}-{bs}.onnx", algo, b, bs, ids)
                if path is None:
                    continue
                bpw, note = linear_bits_per_weight(path, hp, b, bs)
                add(Row(model, f"onnxruntime {algo}", label, b, bs, bpw, note=note), path, t0)
    for budget in auto_bpw:
        label = f"ours auto --bpw {budget:g}"
        if (label, auto_block) in skip:
            continue
        t0 = time.time()
        path, bpw = ours(folder, work / f"ours-auto-{budget:g}.onnx", "auto", budget, auto_block, ccfg, device, 0)
        add(Row(model, "ours", label, None, auto_block, bpw), path, t0)
    label = "Quant-dLLM binary planes (2 per block)"
    if with_planes and (label, 128) not in skip:
        t0 = time.time()
        path, bpw = planes(folder, work / "planes.onnx", ccfg, device)
        add(Row(model, "planes", label, None, 128, bpw), path, t0)
    return rows


# ---------------------------------------------------------------------------------------------- experiment


def scaled(folder: Path, out: Path, bits: int, block_size: int, ccfg: CalibConfig, device: str) -> tuple[Path, float]:
    """Ours with a per-input-channel scale (``ScaledTarget``), written as the float effective weights (fp32
    MatMuls): its ΔNLL is what the folded file would give, for the experiment only."""
    from formats.tensors import DictTensors
    from formats.tokenizer import load_tokenizer
    from qdllm_export.pipeline import quantize_checkpoint

    target = ScaledTarget(bits, block_size)
    ck = out.with_suffix(".q")
    shutil.rmtree(ck, ignore_errors=True)
    _, rec = quantize_checkpoint(folder, ck, target, ccfg, device=device)
    src = HFTensors(folder)
    tensors = {n: target.effective.get(n, None) if is_linear(src.hparams, n) else src.get(n) for n in canonical_names(src.hparams)}
    write_onnx(out, DictTensors(src.hparams, tensors), outtype="f32", embed_type="f16", tokenizer=load_tokenizer(folder),
               overwrite=True)
    shutil.rmtree(ck, ignore_errors=True)
    return out, float(rec["bits_per_weight_linear"])


class ScaledTarget:
    """The MatMulNBits grid on ``W diag(c)`` with input ``x / c`` (AWQ-style): ``c = diag(H)^(alpha/2)``
    (geometric mean 1), one ``c`` per group of linears sharing an input (q/k/v: foldable into attn_norm;
    gate/up: into ffn_norm; o and down alone: a Mul, or a fold into v / up rows), ``alpha`` in
    ``ALPHAS`` (0 = no scale) chosen per group by the summed output error of a quick fit. The stored
    tensor dequantizes to the effective weight ``W_hat diag(1/c)`` (kept in ``effective``)."""

    ALPHAS = (0.0, 0.25, 0.5, 0.75)
    GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))
    needs_data = True

    def __init__(self, bits: int, block_size: int):
        from qdllm_export.grids.base import GridConfig
        from qdllm_export.grids.nbits import NBitsGrid

        self.grid, self.cfg, self.quick = NBitsGrid(bits, block_size), GridConfig(), GridConfig(rounding="importance")
        self.effective: dict[str, np.ndarray] = {}
        self.alphas: dict[str, float] = {}

    def _scale(self, H: Any, alpha: float) -> Any:
        d = H.diagonal().clamp_min(1e-8) ** (alpha / 2)
        return d / d.log().mean().exp()

    def plan_block(self, i: int, weights: dict[str, Any], Hs: dict[str, Any] | None) -> dict[str, Any]:
        import torch

        from qdllm_export.grids.base import grid_quantize
        from qdllm_export.quant.common import output_error

        weights = {r: w.detach() for r, w in weights.items()}
        plan = {}
        for group in self.GROUPS:
            roles = [r for r in group if r in weights]
            H = Hs[roles[0]]
            errs = []
            for a in self.ALPHAS:
                c = self._scale(H, a)
                err = 0.0
                for r in roles:
                    res = grid_quantize(weights[r] * c, H / c[:, None] / c[None, :], self.grid, self.quick)
                    err += output_error(weights[r], res.w_hat / c, H)[0]
                errs.append(err)
            a = self.ALPHAS[int(np.argmin(errs))]
            for r in roles:
                plan[r] = self._scale(H, a)
                self.alphas[f"blk.{i}.{r}"] = a
        return plan

    def quantize(self, name: str, W: Any, H: Any, plan: Any) -> tuple[Any, Any, dict[str, Any]]:
        from qdllm_export.grids.base import grid_quantize
        from qdllm_export.quant import error_stats

        c = plan
        res = grid_quantize(W * c, H / c[:, None] / c[None, :], self.grid, self.cfg, name=name)
        w_hat = res.w_hat / c
        self.effective[name] = w_hat.cpu().numpy()
        stats = error_stats(W.float(), w_hat, H)
        stats.update(grid=self.grid.name)
        return _Effective(res.stored, w_hat.cpu().numpy()), w_hat, stats

    def record(self) -> dict[str, Any]:
        return {"target": "nbits", "method": "grid-gptq+channel-scale", "alphas": self.alphas}


def _effective_cls() -> type:
    from formats.nbits import NBitsTensor

    class Effective(NBitsTensor):
        """An ``NBitsTensor`` whose ``dequantize()`` is the effective (scale-folded) weight (experiment only)."""

        def dequantize(self) -> np.ndarray:
            return self.meta["effective"]

    return Effective


def _Effective(t: Any, w: np.ndarray) -> Any:
    return _effective_cls()(t.shape, t.bits, t.block_size, t.codes, t.scales, t.zero_points, t.name, {**t.meta, "effective": w})


# ---------------------------------------------------------------------------------------------- report


def plot(rows: list[Row], path: Path) -> None:
    """Bits per weight vs ΔNLL, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    marks = {"ours": ("o", "C3"), "ours + channel scale": ("P", "C1"), "planes": ("*", "k"), "onnxruntime rtn": ("s", "C0"),
             "onnxruntime hqq": ("^", "C2"), "onnxruntime gptq": ("D", "C4"), "onnxruntime kquant": ("v", "C5")}
    for ax, model in zip(axes[0], models):
        for variant, (m, col) in marks.items():
            pts = [(r.bits_per_weight, r.delta, r.block_size) for r in rows if r.model == model and r.variant == variant]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker=m, color=col, label=variant, s=60 if m == "*" else 36)
            for x, y, bs in pts:
                if bs:
                    ax.annotate(f"b{bs}", (x, max(y, 1e-3)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("stored bits per weight of the linears")
        ax.set_ylabel("ΔNLL vs fp32 (nats/token, log)")
        ax.set_title(model)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def whole_bits(model: str, linear: float) -> str:
    """Bits per weight of a whole file of ``model``: linears at ``linear``, f16 tables, f32 norms ("-" for a
    model that is not a bundled name or a folder, e.g. a test's label)."""
    from bench.llamacpp import whole_bits as bits
    from formats.errors import QdllmError

    try:
        return f"{bits(model, linear, (16.0, 16.0)):.3f}"
    except QdllmError:
        return "-"


def markdown(rows: list[Row], args: dict[str, Any], where: str | None = None) -> str:
    table = md_table(["model", "variant", "block", "bits/weight (linears, stored)", "bits/weight (whole file)", "NLL",
                      "ΔNLL (acc. level 0)", "ΔNLL at level 4"],
                     [[r.model, r.label + (" *" if r.note else ""), r.block_size or "-",
                       "32 (fp32)" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}",
                       whole_bits(r.model, 32.0 if r.bits_per_weight is None else r.bits_per_weight),
                       f"{r.nll:.4f} ± {r.stderr:.4f}", f"{r.delta:+.4f}",
                       "-" if r.delta_acc4 is None else f"{r.delta_acc4:+.4f}"] for r in rows])
    return ("## onnxruntime's MatMulNBits grid: ours vs onnxruntime's quantizer (`bench/ort_quant.py`)\n\n"
            f"Machine: {where or machine()}. Calibration: {args['calib_samples']} MCS windows x {args['calib_seq_len']} tokens of the "
            f"bundled train text (ours and onnxruntime's GPTQ alike). Eval: masked-diffusion NLL bound on {args['eval_windows']} "
            f"validation windows x {args['eval_seq_len']} tokens, {args['mc']} masks each, identical for every row; ΔNLL "
            "against our fp32 export (token_embd / output f16 in every file, as in the files `onnx --outtype planes` "
            "writes; the `int*` outtypes' default is int8 tables, docs/onnx-format.md 3b; the whole file's bits count "
            "every tensor, norms f32); all files run in onnxruntime at accuracy "
            "level 0 (fp32 compute) unless the column says level 4. Bits per weight: every stored bit of the linears' "
            "codes, scales (ours fp16, onnxruntime's fp32) and zero points. * = onnxruntime stores these weights as "
            "floats (its GPTQ and k-quant write MatMulNBits only at 4 bits); their bits/weight are what MatMulNBits "
            "would store. In the plot, ΔNLL <= 0.001 is drawn at 0.001 (log scale).\n\n" + table +
            "\n\n![bits per weight vs ΔNLL](ort_quant.png)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llada", "tiny-dream"])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--block-sizes", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS))
    ap.add_argument("--auto-bpw", nargs="*", type=float, default=[2.5, 3.0])
    ap.add_argument("--auto-block", type=int, default=64)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json and run only the missing ones")
    ap.add_argument("--report-only", action="store_true", help="only render --json into docs/benchmarks.md and the PNG")
    ap.add_argument("--no-planes", action="store_true")
    ap.add_argument("--channel-scale", action="store_true", help="also ours with a per-input-channel scale (experiment)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--mc", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / ".out" / "ort_quant")
    ap.add_argument("--json", type=Path, default=DOC_JSON)
    ap.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md and the PNG.")
    a = ap.parse_args(argv)
    from qdllm_export.backends import resolve

    ccfg = CalibConfig(n_samples=a.calib_samples, seq_len=a.calib_seq_len)
    ev = EvalConfig(seq_len=a.eval_seq_len, windows=a.eval_windows, mc=a.mc)
    args = {"calib_samples": a.calib_samples, "calib_seq_len": a.calib_seq_len, "eval_windows": a.eval_windows,
            "eval_seq_len": a.eval_seq_len, "mc": a.mc}
    if a.report_only:
        saved = json.loads(a.json.read_text())
        report([Row(**r) for r in saved["rows"]], saved["settings"], saved["machine"], a.models)
        return
    old = [Row(**r) for r in json.loads(a.json.read_text())["rows"]] if a.resume and a.json.exists() else []
    rows: list[Row] = [r for r in old if r.variant != "FP"]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    where = f"{machine()}; onnxruntime {ort.__version__}"

    def log(r: Row) -> None:
        print(json.dumps(r.__dict__, default=str), flush=True)
        rows.append(r)
        a.json.write_text(json.dumps({"machine": where, "settings": args, "rows": [x.__dict__ for x in rows]},
                                     indent=1, default=str))

    for model in a.models:
        done = {(r.label, r.block_size) for r in old if r.model == model}
        compare(resolve(model), a.work / model, model=model, bits=tuple(a.bits), block_sizes=tuple(a.block_sizes),
                algos=tuple(a.algos), auto_bpw=tuple(a.auto_bpw), auto_block=a.auto_block, with_planes=not a.no_planes,
                channel_scale=a.channel_scale, ccfg=ccfg, ev=ev, device=a.device, log=log, skip=done)
    if not a.no_doc:
        report(rows, args, where, a.models)


def report(rows: list[Row], args: dict[str, Any], where: str, models: list[str]) -> None:
    """The PNG and the "ort-quant" section of docs/benchmarks.md, models in ``models`` order, FP first."""
    order = {m: i for i, m in enumerate(models)}
    rows = sorted(rows, key=lambda r: (order.get(r.model, 99), r.variant != "FP"))
    plot(rows, DOC_PNG)
    write_section("ort-quant", markdown(rows, args, where))


if __name__ == "__main__":
    main()
