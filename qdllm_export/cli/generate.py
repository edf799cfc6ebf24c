"""``qdllm-export generate MODEL``: diffusion sampling from any model format."""

from __future__ import annotations

import json
from typing import Optional

import typer

from qdllm_export.cli.app import app, console, progress
from qdllm_export.cli.common import decode, prompt_ids, sample


@app.command()
def generate(
    model: str = typer.Argument(..., help="Checkpoint folder, quantized folder, .gguf, .onnx, or tiny-llada / tiny-dream."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (encoded with the model's tokenizer, BOS first)."),
    prompt_ids_: Optional[str] = typer.Option(None, "--prompt-ids", help="Prompt as comma-separated token ids, e.g. 12,7,99."),
    gen_length: int = typer.Option(64, help="Number of tokens to generate."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: gen-length, one token per step)."),
    block_length: Optional[int] = typer.Option(None, help="LLaDA: semi-autoregressive block length (default 32, or gen-length if smaller)."),
    temperature: float = typer.Option(0.0, help="0 = greedy (deterministic)."),
    remasking: str = typer.Option("low_confidence", help="LLaDA: low_confidence | random."),
    cfg_scale: float = typer.Option(0.0, help="LLaDA: classifier-free guidance scale."),
    alg: str = typer.Option("entropy", help="Dream: origin | maskgit_plus | topk_margin | entropy."),
    alg_temp: Optional[float] = typer.Option(None, help="Dream: temperature of the confidence-based position choice."),
    top_p: Optional[float] = typer.Option(None, help="Dream: nucleus sampling."),
    top_k: Optional[int] = typer.Option(None, help="Dream: top-k sampling."),
    seed: int = typer.Option(0, help="Random seed (stochastic samplers)."),
    dtype: str = typer.Option("float32", help="PyTorch compute dtype for checkpoint folders: float32 | bfloat16 | float16."),
    device: str = typer.Option("cpu", help="PyTorch device for checkpoint folders: cpu | cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object with tokens and text."),
) -> None:
    """Generate text with the family's diffusion sampler (LLaDA low-confidence remasking / Dream)."""
    from qdllm_export.backends import open_model

    backend = open_model(model, dtype, device)
    ids = prompt_ids(backend, prompt, prompt_ids_)
    opts = dict(gen_length=gen_length, steps=steps, block_length=block_length or min(32, gen_length), temperature=temperature,
                remasking=remasking, cfg_scale=cfg_scale, alg=alg, alg_temp=alg_temp, top_p=top_p, top_k=top_k, seed=seed)
    with progress() as bar:
        task = bar.add_task("denoising", total=steps or gen_length)
        out = sample(backend, ids, opts, progress=lambda done, total: bar.update(task, completed=done, total=total))
    tokens = [int(t) for t in out[0]]
    text = decode(backend, out[0])
    if as_json:
        print(json.dumps({"model": backend.source, "family": backend.hparams.family, "prompt_ids": ids[0].tolist(),
                          "tokens": tokens, "text": text, "options": opts}))
    else:
        prompt_text = decode(backend, ids[0][1:] if backend.hparams.bos_token_id == ids[0][0] else ids[0])
        console.print(f"[dim]{prompt_text or ''}[/]{text if text is not None else tokens}", highlight=False)
