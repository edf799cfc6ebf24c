"""``qdllm-export inspect MODEL``: family, shapes, parameters, dtype, bits per weight, size."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from qdllm_export.cli.app import app, console


@app.command("inspect")
def inspect_(
    model: str = typer.Argument(..., help="Checkpoint folder, quantized folder, .gguf, .onnx, or a bundled model (tiny-llada, tiny-dream, tiny-llada-moe)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    tensors: bool = typer.Option(True, help="List every tensor."),
) -> None:
    """Show what a model file or folder holds."""
    from qdllm_export.backends import describe_model

    info = describe_model(model)
    if as_json:
        print(json.dumps(info))
        return
    hp = info["hparams"]
    console.print(f"[bold]{info['path']}[/]  format={info['format']}  family={info['family']}", soft_wrap=True)
    console.print(", ".join(f"{k}={v}" for k, v in hp.items() if k != "family"))
    if tensors and info.get("tensors"):
        t = Table("tensor", "shape", "type", "bits/weight")
        for row in info["tensors"]:
            bpw = row.get("bits_per_weight")
            t.add_row(row["name"], "x".join(str(s) for s in row["shape"]), str(row["type"]),
                      "-" if bpw is None or bpw != bpw else f"{bpw:.3f}")
        console.print(t)
    summary = Table("parameters", "bits/weight (all)", "bits/weight (quantized linears)", "size")
    q = info.get("bits_per_weight_linear")
    summary.add_row(f"{info['n_params']:,}", f"{info['bits_per_weight']:.3f}", "-" if q is None else f"{q:.3f}",
                    f"{info['size_bytes'] / 2**20:.2f} MiB")
    console.print(summary)
