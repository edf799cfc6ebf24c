"""Fingerprints of what every output type stores for the bundled models: proof that a speed change is exact.

    python bench/fingerprints.py --out before.json [--targets planes q2_k int2 auto] [--device cpu]
    python bench/fingerprints.py --out after.json && python bench/fingerprints.py --compare before.json after.json

Quantizes ``tiny-llada`` and ``tiny-dream`` with each target through the library pipeline (calibration:
32 MCS windows x 128 tokens, the bundled text) and records a SHA-256 of every stored array of every
linear, and the record's bits per weight. ``--compare`` lists the tensors whose bytes differ; none means
the change is bit-identical on these models (and this device).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fingerprint(model: str, target: str, device: str, samples: int, seq_len: int) -> dict[str, str]:
    """Tensor name -> SHA-256 of its stored arrays, for ``target`` on bundled ``model``."""
    from formats.checkpoint import QuantizedCheckpoint
    from qdllm_export.backends import resolve
    from qdllm_export.calib import CalibConfig
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.quant import QuantConfig
    from qdllm_export.targets.ggml import StockSpec, quantize_stock
    from qdllm_export.targets.nbits import NBitsSpec, quantize_nbits

    folder, ccfg = resolve(model), CalibConfig(n_samples=samples, seq_len=seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        if target == "planes":
            quantize_checkpoint(folder, out, QuantConfig(), ccfg, device=device)
        elif target == "int2":
            quantize_nbits(folder, out, NBitsSpec("int2", block_size=128), ccfg, device=device)
        elif target == "auto":
            quantize_stock(folder, out, StockSpec("auto", 2.5), ccfg, device=device)
        else:
            quantize_stock(folder, out, StockSpec(target), ccfg, device=device)
        ck = QuantizedCheckpoint(out)
        res = {}
        for name in sorted(ck.quantized):
            h = hashlib.sha256()
            for k, arr in sorted(ck.get(name).arrays().items()):
                h.update(k.encode() + np.ascontiguousarray(arr).tobytes())
            res[name] = h.hexdigest()[:16]
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path)
    ap.add_argument("--models", nargs="+", default=["tiny-llada", "tiny-dream"])
    ap.add_argument("--targets", nargs="+", default=["planes", "q2_k", "int2", "auto"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    if a.compare:
        x, y = (json.loads(p.read_text()) for p in a.compare)
        for key in sorted(set(x) & set(y)):
            diff = [n for n in x[key] if x[key][n] != y[key].get(n)]
            print(f"{key}: {'identical' if not diff else f'{len(diff)} of {len(x[key])} differ: ' + ', '.join(diff)}")
        return
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    for m in a.models:
        for t in a.targets:
            res[f"{m}/{t}"] = fingerprint(m, t, a.device, a.samples, a.seq_len)
            a.out.write_text(json.dumps(res, indent=1))
            print(f"{m}/{t}: {len(res[f'{m}/{t}'])} tensors", flush=True)


if __name__ == "__main__":
    main()
