"""``gguf --outtype q2_k / auto`` end to end on a one-layer checkpoint, the llama.cpp runtime flag on
generate / eval / verify, and the bad inputs of issue 9 (refused before any work, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tiny import make_checkpoint, tiny_hparams


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The ggml grid fits are many small torch ops: on a busy 2-core machine two OpenMP threads wait on each
    other (measured 20x slower than one)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder, _, _ = make_checkpoint(tmp_path_factory.mktemp("stock") / "llada", "llada", seed=2,
                                   hp=tiny_hparams("llada", d_model=256, n_layers=1, d_ff=512))
    return folder


@pytest.fixture(scope="module")
def q2k(ckpt, tmp_path_factory):
    """(path, --json summary) of a q2_k file written by the CLI."""
    from qdllm_export.cli import main

    out = tmp_path_factory.mktemp("q2k") / "m.gguf"
    with pytest.raises(SystemExit) as e:
        main(["gguf", str(ckpt), str(out), "--outtype", "q2_k", "--calib-samples", "2", "--seq-len", "32", "--json"])
    assert e.value.code in (0, None)
    return out


def _refused(res, *needles, usage=False):
    code, _, err = res
    assert code == 2, err
    assert "Traceback" not in err and (usage or len(err.strip().splitlines()) == 1), err
    for n in needles:
        assert n in err, err


def test_q2_k_file_from_the_cli(q2k, cli):
    code, out, err = cli("inspect", q2k, "--json")
    assert code == 0, err
    info = json.loads(out)
    types = {r["name"]: r["type"] for r in info["tensors"]}
    assert {t for n, t in types.items() if n.startswith("blk.") and "norm" not in n} == {"Q2_K"}
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q4_K", "Q6_K")
    assert info["llama_cpp_runs"] and info["bits_per_weight_linear"] == pytest.approx(2.625)


def test_runtime_flag_on_verify_eval_generate(q2k, ckpt, cli):
    pytest.importorskip("llama_cpp")
    code, out, err = cli("verify", ckpt, q2k, "--runtime", "llama.cpp", "--json", "--seq-len", "32", "--n-seq", "1",
                         "--gen-length", "4")
    assert code == 0, err
    rep = json.loads(out)["files"][0]
    assert rep["format"] == "llamacpp" and "tolerance_note" in rep and "llama.cpp" in rep["tolerance_note"]
    assert rep["generation"] and rep["min_argmax_agree"] >= 0.85
    code, out, err = cli("eval", q2k, "--runtime", "llama.cpp", "--seq-len", "32", "--max-windows", "2", "--mc", "1", "--json")
    assert code == 0, err
    nll_llama = json.loads(out)["nll"]
    code, out, err = cli("eval", q2k, "--seq-len", "32", "--max-windows", "2", "--mc", "1", "--json")
    assert code == 0 and abs(json.loads(out)["nll"] - nll_llama) < 0.05, err  # same masks, two engines
    code, out, err = cli("generate", q2k, "--runtime", "llama.cpp", "--prompt-ids", "1,2,3", "--gen-length", "4", "--json")
    assert code == 0 and len(json.loads(out)["tokens"]) == 4, err


def test_auto_meets_its_budget(ckpt, tmp_path, cli):
    code, out, err = cli("gguf", ckpt, tmp_path / "a.gguf", "--outtype", "auto", "--bpw", "3.0", "--calib-samples", "2",
                         "--seq-len", "32", "--no-true-sequential", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert 2.3 < info["bits_per_weight_linear"] <= 3.0 + 1e-6
    assert info["llama_cpp_runs"] and info["qdllm"]["true_sequential"] is False and info["qdllm"]["bpw"] == 3.0
    assert len(json.loads(info["qdllm"]["type_counts.json"])) >= 2  # a mix


@pytest.mark.parametrize("args,needles,usage", [
    (["--outtype", "q7_k"], ["--outtype", "supported: planes, q2_k, q3_k"], True),
    (["--outtype", "q2_0"], ["gguf-py 0.19"], True),
    (["--outtype", "auto"], ["--outtype auto needs a budget: --bpw"], False),
    (["--outtype", "auto", "--bpw", "1.5"], ["cannot be met", "nearest reachable budget is --bpw 2.313"], False),
    (["--outtype", "auto", "--bpw", "9.5"], ["nearest reachable budget is --bpw 8.5"], False),
    (["--outtype", "q2_k", "--bpw", "2.5"], ["--bpw is the budget of --outtype auto"], False),
    (["--rounding", "rtn"], ["--rounding: not used with --outtype planes"], False),
    (["--outtype", "q2_k", "--method", "rtn"], ["--method: not used with --outtype q2_k"], False),
    (["--outtype", "q4_k", "--rounding", "nearest"], ["--rounding"], True),
], ids=["unknown-type", "q2_0", "auto-no-budget", "budget-low", "budget-high", "bpw-fixed", "rounding-planes",
        "method-stock", "rounding-name"])
def test_gguf_bad_input(ckpt, tmp_path, cli, args, needles, usage):
    _refused(cli("gguf", ckpt, tmp_path / "m.gguf", *args), *needles, usage=usage)
    assert list(tmp_path.iterdir()) == []  # no partial output


def test_foreign_imatrix_refused(ckpt, tmp_path, cli):
    from formats.imatrix import Imatrix, write_imatrix

    other = {f"blk.{i}.{r}.weight": 128 for i in range(2) for r in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    im = Imatrix({n: np.ones((1, w), np.float32) for n, w in other.items()}, {n: np.ones(1, np.float32) for n in other})
    path = write_imatrix(tmp_path / "other.imatrix.gguf", im)
    out = tmp_path / "out"
    out.mkdir()
    _refused(cli("gguf", ckpt, out / "m.gguf", "--outtype", "q2_k", "--imatrix", path),
             "entry blk.0.attn_q.weight has 128 columns", "made for another model")
    assert list(out.iterdir()) == []


def test_runtime_llama_cpp_refusals(tmp_path, cli, ckpt):
    from formats.gguf import write_gguf
    from tests.test_gguf import quantized_source

    src, tok = quantized_source(tmp_path, "llada")
    planes = write_gguf(tmp_path / "planes.gguf", src, tokenizer=tok)
    for verb in (["generate", planes, "--prompt-ids", "1,2"], ["eval", planes], ["verify", ckpt, planes]):
        _refused(cli(*verb, "--runtime", "llama.cpp"), "llama.cpp cannot run", "--outtype q2_k")
    _refused(cli("generate", ckpt, "--prompt-ids", "1,2", "--runtime", "llama.cpp"), "runs .gguf files only")
    _refused(cli("generate", planes, "--prompt-ids", "1,2", "--runtime", "vulkan"), "--runtime", usage=True)


def test_imatrix_verb_then_gguf_with_it(ckpt, tmp_path, cli):
    """`imatrix` writes a file `gguf --imatrix` takes as the importance (no calibration of its own)."""
    imat = tmp_path / "m.imatrix.gguf"
    code, out, err = cli("imatrix", ckpt, imat, "--calib-samples", "2", "--seq-len", "32", "--json")
    assert code == 0 and json.loads(out)["entries"] == 8, err  # 7 linears + output
    code, out, err = cli("gguf", ckpt, tmp_path / "m.gguf", "--outtype", "q3_k", "--imatrix", imat, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["qdllm"]["calibration"] == "imatrix" and info["bits_per_weight_linear"] == pytest.approx(3.4375)
    _refused(cli("gguf", ckpt, tmp_path / "n.gguf", "--outtype", "q3_k", "--imatrix", imat, "--calib-samples", "4"),
             "--calib-samples: not used with --imatrix")


def test_imatrix_of_another_model_of_the_same_shapes_refused(ckpt, tmp_path, cli):
    """Issue 15: an imatrix made from another model with the same tensor names and widths was taken. The file records
    its model's fingerprint; `gguf --imatrix` refuses a mismatch naming both models and writes nothing. A file without
    one (llama-imatrix writes none) is still taken, checked by names and widths."""
    from formats.imatrix import read_imatrix, write_imatrix

    other, _, _ = make_checkpoint(tmp_path / "other", "llada", seed=9, hp=tiny_hparams("llada", d_model=256, n_layers=1, d_ff=512))
    imat = tmp_path / "other.imatrix.gguf"
    code, out, err = cli("imatrix", other, imat, "--calib-samples", "2", "--seq-len", "32", "--json")
    assert code == 0 and len(json.loads(out)["model_fingerprint"]) == 16, err
    dest = tmp_path / "out"
    dest.mkdir()
    _refused(cli("gguf", ckpt, dest / "m.gguf", "--outtype", "q2_k", "--imatrix", imat),
             f"was made from {other} (fingerprint", f"not from {ckpt} (fingerprint", "run `qdllm-export imatrix` on")
    assert list(dest.iterdir()) == []
    im = read_imatrix(imat)
    im.model = im.fingerprint = ""
    plain = write_imatrix(tmp_path / "plain.imatrix.gguf", im)
    code, out, err = cli("gguf", ckpt, dest / "m.gguf", "--outtype", "q2_k", "--imatrix", plain, "--json")
    assert code == 0 and json.loads(out)["qdllm"]["calibration"] == "imatrix", err


def test_fallback_for_widths_the_block_does_not_divide(tmp_path, cli):
    """d_model 384: the 256-wide k-quant blocks do not divide the rows of attn_q..ffn_up, token_embd, output;
    they fall back as llama-quantize does (q2_k -> IQ4_NL, q4_k -> Q5_0, q6_k -> Q8_0), the summary lists
    them, and llama.cpp runs the file."""
    folder, _, _ = make_checkpoint(tmp_path / "ck", "llada", seed=3, hp=tiny_hparams("llada", d_model=384, n_layers=1, d_ff=512))
    out = tmp_path / "m.gguf"
    code, text, err = cli("gguf", folder, out, "--outtype", "q2_k", "--rounding", "rtn", "--json")
    assert code == 0, err
    assert json.loads(text)["qdllm"]["calibration"] == "none"  # rtn reads no text (issue 15: it said "mcs")
    fb = json.loads(text)["fallbacks"]
    assert fb == {"token_embd.weight": "Q5_0", "output.weight": "Q8_0",
                  **{f"blk.0.{r}.weight": "IQ4_NL" for r in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}}
    code, text, err = cli("gguf", folder, tmp_path / "n.gguf", "--outtype", "q2_k", "--rounding", "rtn")
    assert code == 0 and "fallback: blk.0.attn_q.weight is IQ4_NL" in text, err
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return
    from formats.gguf_read import read_gguf
    from runtime_ref.forward import forward
    from runtime_ref.llamacpp import LlamaCppBackend

    m = read_gguf(out)
    ids = np.random.default_rng(0).integers(0, m.hparams.n_vocab - 1, (1, 32))
    ours, theirs = forward(m.tensors, ids), LlamaCppBackend(out, threads=1).raw_logits(ids)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 0.1
