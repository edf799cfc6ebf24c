"""Projected GGUF file size of an LLaDA-8B-shaped model, from the qdllm GGUF layout (no weights needed).

    python bench/sizes.py

Counts the bytes of every tensor the writer emits: Q1_0 planes (18 bytes per 128 signs, the row scale
inside), F16 column scales, I8 plane counts, F32 norms, and token_embd / output in their ggml type (the
default of ``gguf``: Q4_K / Q6_K, ``formats.gguf_types.default_embed_types``; or F16, Q8_0). Quant-dLLM at a 2-plane
budget keeps the total plane count at exactly 2 per block whatever ABMP chooses, so the size does not depend
on the weights. GPTQ/RTN add a per-row, per-block mu. Stock outtypes: every linear in the ggml type.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import md_table, write_section  # noqa: E402
from formats.families import HParams  # noqa: E402
from formats.gguf_layout import plane_shapes  # noqa: E402
from formats.tensors import canonical_names, canonical_shape, is_linear  # noqa: E402

BYTES = {"F32": 4.0, "F16": 2.0, "I8": 1.0, "Q1_0": 18 / 128, "Q8_0": 34 / 32, "Q2_K": 84 / 256, "Q3_K": 110 / 256,
         "Q4_K": 144 / 256, "Q5_K": 176 / 256, "Q6_K": 210 / 256, "IQ2_XS": 74 / 256}
HP8B = HParams(family="llada", n_vocab=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=12288,
               rope_theta=500000.0, norm_eps=1e-5, mask_token_id=126336, context_length=4096)


def projected(hp: HParams, planes_per_block: int | None, mu: bool, embed: str, head: str | None = None,
              stock: str | None = None, group: int = 128) -> dict[str, float]:
    """Bytes of a file: linears as planes (``planes_per_block``) or in the ggml type ``stock``; token_embd in
    ``embed``, output in ``head`` (default ``embed``)."""
    lin_bytes = lin_w = other = 0.0
    for name in canonical_names(hp):
        shape = canonical_shape(hp, name)
        n = float(np.prod(shape))
        if is_linear(hp, name):
            if stock is not None:
                lin_bytes += BYTES[stock] * n
            else:
                nb = shape[1] // group
                parts = plane_shapes(shape[0], shape[1], group, np.full(nb, planes_per_block, np.uint8), mu)
                lin_bytes += sum(BYTES[t] * np.prod(s) for t, s in parts.values())
            lin_w += n
        elif len(shape) == 2:
            other += BYTES[(head or embed) if name == "output.weight" else embed] * n
        else:
            other += 4 * n
    n_params = sum(float(np.prod(canonical_shape(hp, n))) for n in canonical_names(hp))
    total = lin_bytes + other
    return {"linear_bpw": 8 * lin_bytes / lin_w, "file_gb": total / 1e9, "file_bpw": 8 * total / n_params}


def main() -> None:
    from formats.gguf_types import default_embed_types

    rows = []
    fp16 = sum(2.0 * np.prod(canonical_shape(HP8B, n)) for n in canonical_names(HP8B)) / 1e9
    rows.append(["bf16 checkpoint (reference)", "-", "16", "16", f"{fp16:.2f}"])

    def row(label: str, embed: str, head: str, **kw) -> None:
        p = projected(HP8B, embed=embed.upper(), head=head.upper(), **kw)
        rows.append([label, f"{embed} / {head}", f"{p['linear_bpw']:.3f}", f"{p['file_bpw']:.3f}", f"{p['file_gb']:.2f}"])

    e, h = default_embed_types("planes")
    row("**Quant-dLLM 2 planes (ABMP mean 2), the default `gguf` output**", e, h, planes_per_block=2, mu=False)
    for embed, head in (("f16", "f16"), ("q8_0", "q8_0")):
        row("Quant-dLLM 2 planes", embed, head, planes_per_block=2, mu=False)
    row("GPTQ/RTN 2-bit as planes (+mu)", e, h, planes_per_block=2, mu=True)
    row("GPTQ 3-bit as planes (+mu)", e, h, planes_per_block=3, mu=True)
    for t in ("q2_k", "iq2_xs", "q3_k", "q4_k"):
        row(f"stock `--outtype {t}` (llama.cpp runs it)", *default_embed_types(t), planes_per_block=None, mu=False,
            stock=t.upper())
    body = ("## Projected GGUF size of LLaDA-8B (`bench/sizes.py`)\n\n"
            "Computed from the writer's layout for the published LLaDA-8B shapes (32 layers, d_model 4096, d_ff 12288, "
            "vocab 126464; 8.02 B parameters); every stored byte counted, metadata (a few MB of tokenizer) excluded. "
            "The default binary-plane file (token_embd Q4_K, output Q6_K, as llama-quantize stores the head) is "
            "under the 3.0 GB target; with F16 embeddings it was 4.04 GB (the paper reports 3.69 GB).\n\n"
            + md_table(["variant", "token_embd / output", "bits/weight linears", "bits/weight whole file",
                        "file size (GB)"], rows))
    print(body)
    write_section("sizes", body)


if __name__ == "__main__":
    main()
