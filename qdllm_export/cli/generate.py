"""``qdllm-export generate MODEL``: diffusion sampling from any model format."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.markup import escape

from qdllm_export.backends import RUNTIMES
from qdllm_export.cli import checks
from qdllm_export.cli.app import app, console, progress
from qdllm_export.cli.common import decode, prompt_ids
from runtime_ref.sampler import DREAM_ALGS, LLADA_REMASKING


@app.command()
def generate(
    model: str = typer.Argument(..., help="Checkpoint folder, quantized folder, .gguf, .onnx, or a bundled model (tiny-llada, tiny-dream, tiny-llada-moe)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (encoded with the model's tokenizer, BOS first)."),
    prompt_ids_: Optional[str] = typer.Option(None, "--prompt-ids", help="Prompt as comma-separated token ids, e.g. 12,7,99."),
    gen_length: int = typer.Option(64, min=1, help="Number of tokens to generate."),
    steps: Optional[int] = typer.Option(None, min=1, help="Denoising steps (default: gen-length, one token per step)."),
    block_length: Optional[int] = typer.Option(None, min=1, help="LLaDA: semi-autoregressive block length (default 32 when it divides gen-length, else gen-length)."),
    temperature: float = typer.Option(0.0, callback=checks.between(0.0), help="0 = greedy (deterministic)."),
    remasking: Optional[str] = typer.Option(None, callback=checks.one_of(*LLADA_REMASKING), help="LLaDA: low_confidence (default) | random."),
    cfg_scale: Optional[float] = typer.Option(None, callback=checks.between(0.0), help="LLaDA: classifier-free guidance scale (default 0: none)."),
    alg: Optional[str] = typer.Option(None, callback=checks.one_of(*DREAM_ALGS), help="Dream: origin | maskgit_plus | topk_margin | entropy (default)."),
    alg_temp: Optional[float] = typer.Option(None, callback=checks.between(0.0), help="Dream: temperature of the confidence-based position choice."),
    top_p: Optional[float] = typer.Option(None, callback=checks.between(0.0, 1.0, low_open=True), help="Dream: nucleus sampling, in (0, 1]."),
    top_k: Optional[int] = typer.Option(None, min=1, help="Dream: top-k sampling."),
    seed: int = typer.Option(0, min=0, help="Random seed (stochastic samplers)."),
    dtype: Optional[str] = typer.Option(None, callback=checks.one_of(*checks.TORCH_DTYPES), help="PyTorch compute dtype for checkpoint folders: float32 (default) | bfloat16 | float16."),
    device: Optional[str] = typer.Option(None, callback=checks.device_option, help="PyTorch device for checkpoint folders: cpu (default) | cuda."),
    runtime: Optional[str] = typer.Option(None, callback=checks.one_of(*RUNTIMES), help="Engine of a .gguf file: numpy (default, qdllm's reference forward) | llama.cpp (stock llama.cpp through llama-cpp-python)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object with tokens and text."),
) -> None:
    """Generate text with the family's diffusion sampler (LLaDA low-confidence remasking / Dream)."""
    from qdllm_export.backends import read_header
    from runtime_ref.sampler import sample

    checks.not_both("--prompt", prompt, "--prompt-ids", prompt_ids_)
    head = read_header(model, runtime)
    hp = head.hparams
    checks.torch_only(head.kind, head.model, {"--dtype": dtype, "--device": device})
    checks.family_options(hp, head.model, {"--block-length": block_length, "--remasking": remasking,
                                            "--cfg-scale": cfg_scale, "--alg": alg, "--alg-temp": alg_temp,
                                            "--top-p": top_p, "--top-k": top_k})
    ids = prompt_ids(head, prompt, prompt_ids_)
    n = ids.shape[1]
    checks.fits_context(hp, head.model, "--gen-length", n + gen_length,
                        f"the prompt ({n} token{'s' * (n != 1)}) + {gen_length} new tokens", most=hp.context_length - n)
    if hp.spec.sampler_kind == "llada":
        block_length, steps = checks.llada_blocks(gen_length, block_length, steps)
    opts = dict(gen_length=gen_length, steps=steps or gen_length, block_length=block_length, temperature=temperature,
                remasking=remasking or "low_confidence", cfg_scale=cfg_scale or 0.0, alg=alg or "entropy",
                alg_temp=alg_temp, top_p=top_p, top_k=top_k, seed=seed)
    backend = head.open(dtype or "float32", device or "cpu")
    with progress() as bar:
        task = bar.add_task("denoising", total=opts["steps"])
        out = sample(backend, ids, opts, progress=lambda done, total: bar.update(task, completed=done, total=total))
    tokens = [int(t) for t in out[0]]
    text = decode(backend, out[0])
    if as_json:
        print(json.dumps({"model": backend.source, "family": hp.family, "prompt_ids": ids[0].tolist(),
                          "tokens": tokens, "text": text, "options": opts}))
    else:
        prompt_text = decode(backend, ids[0][1:] if hp.bos_token_id == ids[0][0] else ids[0])
        console.print(f"[dim]{escape(prompt_text or '')}[/]{escape(text) if text is not None else tokens}")
