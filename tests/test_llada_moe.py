"""LLaDA-MoE (``llada-moe``): the family table, the PyTorch model, the NumPy forward, GGUF files llama.cpp runs.

Tiny random mixtures built in-process (4 experts, 2 used); parity is against an independent computation:
PyTorch vs NumPy, our GGUF reader vs the checkpoint, stock llama.cpp vs our NumPy forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from formats.errors import QdllmError
from formats.gguf import read_gguf, write_gguf
from formats.tensors import HFTensors
from formats.tokenizer import load_tokenizer
from runtime_ref.forward import forward
from tests.tiny import make_checkpoint, moe_hparams


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    folder, hp, _ = make_checkpoint(tmp_path_factory.mktemp("moe") / "ck", "llada-moe", hp=moe_hparams(), seed=1)
    return folder


def _ids(hp, t=40, seed=0):
    ids = np.random.default_rng(seed).integers(0, hp.n_vocab - 1, (2, t))
    ids[:, t // 2 :: 3] = hp.mask_token_id
    return ids


def test_table_names_and_config_round_trip(moe_ckpt):
    src = HFTensors(moe_ckpt)
    hp = src.hparams
    assert (hp.family, hp.n_expert, hp.n_expert_used, hp.d_ff_exp) == ("llada-moe", 4, 2, 128)
    hf = hp.spec.hf_names(hp)
    assert hf["blk.1.ffn_down_exps.3.weight"] == "model.layers.1.mlp.experts.3.down_proj.weight"
    assert hf["blk.0.ffn_gate_inp.weight"] == "model.layers.0.mlp.gate.weight"
    assert hf["blk.0.attn_q_norm.weight"] == "model.layers.0.self_attn.q_norm.weight"
    cfg = json.loads((moe_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LLaDAMoEModelLM"] and cfg["num_experts"] == 4 and cfg["norm_topk_prob"] is False


@pytest.mark.parametrize("change,needle", [
    ({"num_experts_per_tok": 5}, "0 < num_experts_per_tok <= num_experts"),
    ({"num_experts_per_tok": 0}, "0 < num_experts_per_tok <= num_experts"),
    ({"norm_topk_prob": True}, "norm_topk_prob=true is not supported"),
    ({"shared_expert_intermediate_size": 256}, "shared experts"),
    ({"moe_layer_freq": [0, 1]}, "every layer must be a mixture of experts"),
    ({"moe_router_score_function": "sigmoid"}, "softmax"),
    ({"num_experts": None}, "'num_experts' or 'num_local_experts' is missing"),
])
def test_inconsistent_config_is_one_clear_error(tmp_path, moe_ckpt, change, needle):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(moe_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QdllmError, match="config.json") as e:
        HFTensors(folder)
    assert needle in str(e.value)


def test_missing_expert_tensor_is_named(tmp_path):
    from formats.safetensors_io import Checkpoint, write_checkpoint

    folder, hp, w = make_checkpoint(tmp_path / "ck", "llada-moe", hp=moe_hparams(n_layers=1), seed=2)
    del w["model.layers.0.mlp.experts.2.up_proj.weight"]
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    write_checkpoint(folder, w, 1)
    with pytest.raises(QdllmError, match=r"'model.layers.0.mlp.experts.2.up_proj.weight' is missing"):
        HFTensors(folder)
    assert Checkpoint(folder)  # the folder itself is readable: the error is the family's


def test_pytorch_numpy_parity_and_routed_inputs(moe_ckpt):
    """The PyTorch model and the NumPy forward agree; each expert's forward hook sees exactly its routed tokens."""
    from qdllm_export.models import load_model
    from runtime_ref.forward import moe

    src = HFTensors(moe_ckpt)
    hp = src.hparams
    model = load_model(src)
    ids = _ids(hp)
    seen: dict[int, int] = {}
    blk = model.blocks[0]
    hooks = [e.gate_proj.register_forward_hook(lambda m, inp, out, x=x: seen.__setitem__(x, seen.get(x, 0) + inp[0].shape[0]))
             for x, e in enumerate(blk.mlp.experts)]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    for h in hooks:
        h.remove()
    counts = blk.mlp.last_counts.tolist()
    assert sum(counts) == ids.size * hp.n_expert_used and all(c > 0 for c in counts)
    assert [seen.get(x, 0) for x in range(hp.n_expert)] == counts
    ours = forward(src, ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # NumPy's routing of the same MoE input (layer 0 after attention, from the embedding) picks the same experts
    from qdllm_export.models.layers import rope_tables

    hidden: list = []
    forward(src, ids, hidden=hidden)
    with torch.no_grad():
        x0 = torch.from_numpy(hidden[0])
        c, s = rope_tables(ids.shape[1], hp.head_dim, hp.rope_theta)
        mid = x0 + blk.self_attn(blk.input_layernorm(x0), c, s, None)
        hin = blk.post_attention_layernorm(mid).numpy()
    got: list = []
    moe(src, 0, hin, got)
    assert got[0].tolist() == counts


def _write(tmp_path, folder, outtype):
    return write_gguf(tmp_path / f"m-{outtype}.gguf", HFTensors(folder), tokenizer=load_tokenizer(folder), outtype=outtype)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_stacks_experts_and_reads_back(tmp_path, moe_ckpt, outtype):
    import gguf

    src = HFTensors(moe_ckpt)
    hp = src.hparams
    path = _write(tmp_path, moe_ckpt, outtype)
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    assert "blk.0.ffn_gate_exps.3.weight" not in t
    assert [int(v) for v in t["blk.1.ffn_down_exps.weight"].shape] == [hp.d_ff_exp, hp.d_model, hp.n_expert]  # ggml ne
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # the router stays in float32
    fields = {f.name: f.parts[f.data[0]][0] for f in r.fields.values() if f.name.startswith("llada-moe.expert")}
    assert fields == {"llada-moe.expert_count": 4, "llada-moe.expert_used_count": 2,
                      "llada-moe.expert_feed_forward_length": 128}
    m = read_gguf(path)
    want = src.get("blk.1.ffn_down_exps.3.weight")
    got = m.tensors.get("blk.1.ffn_down_exps.3.weight")
    tol = 0 if outtype == "f32" else 1e-3 * np.abs(want).max()
    assert np.abs(got - want).max() <= tol
    assert m.tensor_types()["blk.1.ffn_down_exps.3.weight"] == outtype.upper()


@pytest.mark.parametrize("outtype,tol", [("f32", 1e-5), ("f16", 2e-3)])
def test_llama_cpp_runs_our_llada_moe(tmp_path, moe_ckpt, outtype, tol):
    pytest.importorskip("llama_cpp")
    from tests.test_llamacpp import compare, llama_logits

    path = _write(tmp_path, moe_ckpt, outtype)
    hp = read_gguf(path).hparams
    ids = _ids(hp, 48)[0]
    ours = forward(read_gguf(path).tensors, ids[None])[0]
    theirs, info = llama_logits(path, ids)
    assert info == {"n_vocab": hp.n_vocab, "mask": hp.mask_token_id, "diffusion": True}
    agree, err = compare(theirs, ours)
    print(f"llada-moe {outtype}: llama.cpp vs NumPy argmax agreement {agree:.4f}, max|diff|/max|logit| {err:.2e}")
    assert agree >= 0.99 and err <= tol


def test_cli_verify_inspect_generate_eval_f16(tmp_path, moe_ckpt, cli):
    out = tmp_path / "m.gguf"
    code, _, err = cli("gguf", moe_ckpt, out, "--outtype", "f16")
    assert code == 0, err
    code, stdout, err = cli("verify", moe_ckpt, out, "--json")
    assert code == 0, err + stdout
    code, stdout, err = cli("inspect", out, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["family"] == "llada-moe" and d["hparams"]["n_expert"] == 4 and d["llama_cpp_runs"]
    code, stdout, err = cli("generate", out, "--prompt", "Shall I", "--gen-length", "8", "--steps", "4")
    assert code == 0, err
    data = tmp_path / "t.txt"
    data.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 6)
    code, stdout, err = cli("eval", out, "--data", data, "--json")
    assert code == 0, err


# ------------------------------------------------------------------------------------------ quantization
def _starved_checkpoint(tmp_path, d: int, seed: int = 3):
    """A one-layer mixture (4 experts of ``d``, 1 used) whose router never picks expert 3: its router row is the
    mean of the other three, so its logit never exceeds theirs (ties go to the lower id) and its Hessian sees no
    calibration token."""
    from formats.safetensors_io import write_checkpoint

    folder, hp, w = make_checkpoint(tmp_path / f"starved{d}", "llada-moe",
                                    hp=moe_hparams(d_model=d, d_ff_exp=d, n_layers=1, n_expert_used=1), seed=seed)
    w["model.layers.0.mlp.gate.weight"][3] = w["model.layers.0.mlp.gate.weight"][:3].mean(0)  # never the top 1
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    write_checkpoint(folder, w, 1)
    return folder


def test_planes_quantize_per_expert_hessians_and_gguf_parity(tmp_path):
    """quantize (GPTQ planes) a mixture with an expert no calibration token reaches: every expert is quantized
    (finite, its own fit), the checkpoint's planes GGUF reproduces the PyTorch model of the stored values."""
    from qdllm_export.calib import CalibConfig
    from qdllm_export.models import load_model
    from qdllm_export.pipeline import quantize_checkpoint
    from qdllm_export.quant import QuantConfig
    from formats.checkpoint import QuantizedCheckpoint

    folder = _starved_checkpoint(tmp_path, 128)
    calib = tmp_path / "calib.txt"
    calib.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 20)
    res, rec = quantize_checkpoint(folder, tmp_path / "q", QuantConfig(method="gptq", bits=2),
                                   CalibConfig(path=str(calib), n_samples=4, seq_len=32))
    names = {r.name for r in res.layers}
    assert {f"blk.0.ffn_{p}_exps.{x}.weight" for p in ("gate", "up", "down") for x in range(4)} <= names
    # the coverage of the expert pass: every token routed to k = 1 expert, expert 3 to none (filled in every batch)
    (cov,) = rec["expert_coverage"]
    assert (cov["block"], cov["tokens"], sum(cov["routed"])) == (0, 4 * 32, 4 * 32)
    assert cov["routed"][3] == 0 and cov["starved_batches"][3] == cov["batches"] >= 1
    from qdllm_export.cli.quantize import coverage_text

    text = coverage_text(rec)
    assert "blk.0 0.00x-" in text and f"blk.0 expert 3 ({cov['batches']} of {cov['batches']} batches)" in text
    assert coverage_text({"tensors": {}}) is None
    assert all(np.isfinite(r.rel_weight_error) and r.rel_weight_error < 1.0 for r in res.layers)
    q = QuantizedCheckpoint(tmp_path / "q")
    path = write_gguf(tmp_path / "q.gguf", q, tokenizer=load_tokenizer(folder), outtype="planes")
    assert read_gguf(path).tensor_types()["blk.0.ffn_up_exps.3.weight"] == "planes"
    ids = _ids(q.hparams, 32)
    with torch.no_grad():
        ref = load_model(q)(torch.from_numpy(ids)).numpy()
    ours = forward(read_gguf(path).tensors, ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # ONNX runs each expert on its routed tokens only (expert 3 on none), through both plane kernels; the file keeps
    # the router and the float tables in f16, hence the looser tolerance (5e-4 of the largest logit measured)
    from formats.onnx import write_onnx
    from runtime_ref.ort import OrtBackend

    for kernel in ("function", "matmulnbits"):
        onnx_path = write_onnx(tmp_path / f"q-{kernel}.onnx", q, tokenizer=load_tokenizer(folder), kernel=kernel,
                               accuracy_level=0)
        got = OrtBackend(onnx_path).raw_logits(ids)
        assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max(), kernel
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99, kernel


def test_one_hessian_pass_per_expert_stage(tmp_path, monkeypatch):
    """The pipeline collects every expert's gate + up Hessian in one calibration pass and every down's in one
    more (not one pass per expert), and each H equals the one a pass for that expert alone gives."""
    import qdllm_export.pipeline as P
    from qdllm_export.calib import CalibConfig
    from qdllm_export.models import hessian_pass, sequential_groups
    from qdllm_export.quant import QuantConfig

    roles = [f"ffn_{p}_exps.{x}" for p in ("gate", "up", "down") for x in range(3)] + ["attn_q", "attn_k", "attn_output"]
    groups = sequential_groups(roles)
    assert groups[:2] == [["attn_q", "attn_k"], ["attn_output"]]
    assert hessian_pass(groups, 1) == ["attn_output"]
    assert hessian_pass(groups, 2) == [f"ffn_{p}_exps.{x}" for x in range(3) for p in ("gate", "up")]
    assert hessian_pass(groups, 3) == ["ffn_gate_exps.1", "ffn_up_exps.1", "ffn_gate_exps.2", "ffn_up_exps.2"]
    assert hessian_pass(groups, 5) == [f"ffn_down_exps.{x}" for x in range(3)]

    passes, real = [], P.collect_hessians

    def spy(block, rs, x, cos, sin, batch):
        Hs = real(block, rs, x, cos, sin, batch)
        passes.append(list(rs))
        if rs[0].startswith("ffn_"):  # the first expert alone, on the same inputs
            alone = [r for r in rs if r.endswith(".1")]
            assert all(torch.equal(Hs[r], H) for r, H in real(block, alone, x, cos, sin, batch).items())
        return Hs

    monkeypatch.setattr(P, "collect_hessians", spy)
    folder = make_checkpoint(tmp_path / "m", "llada-moe", hp=moe_hparams(n_layers=1))[0]
    P.quantize_checkpoint(folder, tmp_path / "q", QuantConfig(method="gptq", bits=2), CalibConfig(n_samples=4, seq_len=32))
    experts = [p for p in passes if p[0].startswith("ffn_")]
    assert [sorted(p) for p in experts] == [sorted(f"ffn_{p}_exps.{x}" for x in range(4) for p in ("gate", "up")),
                                            sorted(f"ffn_down_exps.{x}" for x in range(4))]


def test_equalize_a_mixture_stores_the_scaled_router(tmp_path, cli, monkeypatch):
    """``quantize --equalize`` on a mixture: the ffn_norm scales reach every expert's gate / up and the router, so
    the checkpoint stores the changed norm and router in float32, with ``router[:, j] * norm[j]`` (the router's
    logits) as in the float checkpoint, and names both in the record. One candidate alpha (0.5): every site folds."""
    from formats.checkpoint import QuantizedCheckpoint
    from qdllm_export.quant import equalize

    monkeypatch.setattr(equalize, "ALPHAS", (0.5,))

    folder = make_checkpoint(tmp_path / "m", "llada-moe", hp=moe_hparams(n_layers=1))[0]
    code, _, err = cli("quantize", folder, tmp_path / "q", "--equalize", "--calib-samples", "8", "--seq-len", "32",
                       "--tune-iters", "0")
    assert code == 0, err
    q, src = QuantizedCheckpoint(tmp_path / "q"), HFTensors(folder)
    changed = q.record["equalization"]["changed"]
    assert "blk.0.ffn_norm.weight" in changed and "blk.0.ffn_gate_inp.weight" in changed
    g0, g1 = src.get("blk.0.ffn_norm.weight"), q.get("blk.0.ffn_norm.weight")
    r0, r1 = src.get("blk.0.ffn_gate_inp.weight"), q.get("blk.0.ffn_gate_inp.weight")
    assert not np.allclose(g0, g1)
    np.testing.assert_allclose(r1 * g1[None, :], r0 * g0[None, :], rtol=1e-5, atol=1e-7)


def test_imatrix_stacks_experts_with_their_routed_counts(tmp_path):
    """`imatrix` of a mixture: one entry per stacked expert tensor, a row and a count per expert, counted on the
    routed tokens only as llama-imatrix counts them (no calibration fill: expert 3, never routed, counts 0 and
    weighs evenly); it round-trips through the file and gives `gguf --imatrix` each expert's own row."""
    from formats.imatrix import read_imatrix, write_imatrix
    from qdllm_export.calib import CalibConfig
    from qdllm_export.imatrix import collect_imatrix, model_widths
    from qdllm_export.targets.ggml import StockSpec, stock_target

    folder = _starved_checkpoint(tmp_path, 128)
    calib = tmp_path / "calib.txt"
    calib.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 20)
    ccfg = CalibConfig(path=str(calib), n_samples=4, seq_len=32)
    im = read_imatrix(write_imatrix(tmp_path / "im.gguf", collect_imatrix(folder, ccfg)))
    T = 4 * 32
    assert set(im.in_sum2) == set(model_widths(folder))
    assert "blk.0.ffn_gate_exps.weight" in im.in_sum2 and "blk.0.ffn_gate_exps.0.weight" not in im.in_sum2
    for p, width in (("gate", 128), ("up", 128), ("down", 128)):
        s2, c = im.in_sum2[f"blk.0.ffn_{p}_exps.weight"], im.counts[f"blk.0.ffn_{p}_exps.weight"]
        assert s2.shape == (4, width) and c.tolist()[3] == 0 and c.sum() == T  # k = 1 expert a token
        assert np.all(im.importances(f"blk.0.ffn_{p}_exps.weight")[3] == 1.0)
    np.testing.assert_array_equal(im.in_sum2["blk.0.ffn_gate_exps.weight"], im.in_sum2["blk.0.ffn_up_exps.weight"])
    assert im.counts["blk.0.attn_q.weight"].tolist() == [T]
    target = stock_target(folder, StockSpec("q2_k", None, "gptq", True, str(tmp_path / "im.gguf")), ccfg)
    for x in range(4):
        np.testing.assert_array_equal(target.importance[f"blk.0.ffn_down_exps.{x}.weight"],
                                      im.importance("blk.0.ffn_down_exps.weight", x))


def test_llama_cpp_quantizes_a_mixture_with_our_imatrix(tmp_path, cli):
    """llama.cpp's IQ2_XS (which refuses to run without an imatrix entry of ``n_in * n_expert`` values for a 3-D
    tensor) quantizes our f16 mixture with our imatrix: the stacked entries fit llama.cpp's experts."""
    pytest.importorskip("llama_cpp")
    import gguf

    from bench.llamacpp import llama_file

    folder = _starved_checkpoint(tmp_path, 256)
    calib = tmp_path / "calib.txt"
    calib.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 20)
    for args in (("gguf", folder, tmp_path / "f16.gguf", "--outtype", "f16"),
                 ("imatrix", folder, tmp_path / "im.gguf", "--calib", calib, "--calib-samples", "4", "--seq-len", "32")):
        code, _, err = cli(*args)
        assert code == 0, err
    assert llama_file(tmp_path, tmp_path / "f16.gguf", "iq2_xs", "none", None) is None  # no imatrix: refused
    out = llama_file(tmp_path, tmp_path / "f16.gguf", "iq2_xs", "ours", tmp_path / "im.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "IQ2_XS" and types["blk.0.attn_q.weight"] == "IQ2_XS"


def test_q2_k_file_stacks_one_type_and_runs_in_llama_cpp(tmp_path, cli):
    """gguf --outtype q2_k of a float mixture: the experts of a layer are one 3-D Q2_K tensor llama.cpp runs."""
    pytest.importorskip("llama_cpp")
    import gguf

    from tests.test_llamacpp import compare, llama_logits

    folder = _starved_checkpoint(tmp_path, 256)
    out = tmp_path / "q2k.gguf"
    code, _, err = cli("gguf", folder, out, "--outtype", "q2_k", "--calib-samples", "4", "--seq-len", "32")
    assert code == 0, err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == "Q2_K"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    m = read_gguf(out)
    ids = _ids(m.hparams, 48)[0]
    ours = forward(m.tensors, ids[None])[0]
    theirs, _ = llama_logits(out, ids)
    agree, err = compare(theirs, ours)
    # llama.cpp rounds activations to 8 bits, which can flip the router's top-k where two experts nearly tie:
    # that token's logits then differ by far more than the rounding; every other position must be within
    from qdllm_export.verify import LLAMACPP_MIN_AGREE, LLAMACPP_RTOL

    pos = np.abs(theirs - ours).max(-1) / np.abs(ours).max()  # [T]
    print(f"llada-moe q2_k: llama.cpp vs NumPy argmax agreement {agree:.4f}, max|diff|/max|logit| {err:.2e}, "
          f"positions over the tolerance {int((pos > LLAMACPP_RTOL).sum())} of {pos.size}")

    assert agree >= LLAMACPP_MIN_AGREE and (pos > LLAMACPP_RTOL).sum() <= pos.size // 16
    assert np.median(pos) <= LLAMACPP_RTOL / 2


@pytest.mark.parametrize("router", ["never-expert-3", "plain"])
def test_calibration_fill_of_a_starved_expert(tmp_path, monkeypatch, router):
    """The pipeline's Hessian pass (``collect_hessians``, which stops a batch once every hook has fired) gives a
    starved expert the layer's tokens at the missing share's weight, whether or not any token was routed to it
    (the plain router routes a token to every expert: the pass stops at the last routed call, the fill must not
    come after it):
    its H is ``sum_routed x x^T + (m / N) sum_all x x^T`` (m = fair share - routed). Outputs with the fill on equal
    the plain layer's. FILL_SHARE 1 here: every expert under its fair share is filled."""
    from qdllm_export.block_pass import collect_hessians
    from qdllm_export.models import llada_moe
    from qdllm_export.models.layers import rope_tables
    from qdllm_export.models.llada_moe import LLaDAMoEDecoderLayer

    if router == "plain":
        folder = make_checkpoint(tmp_path / "plain", "llada-moe", seed=3,
                                 hp=moe_hparams(d_model=128, d_ff_exp=128, n_layers=1, n_expert_used=1))[0]
    else:
        folder = _starved_checkpoint(tmp_path, 128)
    src = HFTensors(folder)
    hp = src.hparams
    hf = hp.spec.hf_names(hp)
    layers = [LLaDAMoEDecoderLayer(hp), LLaDAMoEDecoderLayer(hp)]
    for layer in layers:
        params = dict(layer.named_parameters())
        for name in src.layer_names(0):
            with torch.no_grad():
                params[hf[name][len("model.layers.0."):]].copy_(torch.from_numpy(src.get(name)))
    monkeypatch.setattr(llada_moe, "FILL_SHARE", 1.0)
    x_seed = 0 if router == "plain" else 3  # routed counts [7, 13, 7, 5] / [6, 17, 9, 0] of 32 (fair share 8)
    x = torch.from_numpy(np.random.default_rng(x_seed).standard_normal((2, 16, hp.d_model)).astype(np.float32))
    c, s = rope_tables(16, hp.head_dim, hp.rope_theta)
    roles = [f"ffn_gate_exps.{e}" for e in range(hp.n_expert)]
    Hs = collect_hessians(layers[0], roles, x, c, s, batch=2)
    filled = layers[0].mlp.filled
    assert not layers[0].mlp.fill  # on for the Hessian pass only
    with torch.no_grad():
        layers[0].mlp.fill = True
        y_cal, y = layers[0](x, c, s), layers[1](x, c, s)
        h = layers[1].post_attention_layernorm(x + layers[1].self_attn(layers[1].input_layernorm(x), c, s, None))
        idx = llada_moe.route(layers[1].mlp.gate(h.reshape(-1, hp.d_model)), hp.n_expert_used)[1]
    assert torch.equal(y_cal, y)
    h = h.reshape(-1, hp.d_model).double()
    n = h.shape[0]
    fair = n * hp.n_expert_used / hp.n_expert
    counts = layers[0].mlp.last_counts.tolist()
    assert filled == [e for e, k in enumerate(counts) if k < fair] and layers[0].mlp.filled == filled
    assert any(0 < counts[e] for e in filled) and (0 in counts) == (router != "plain")
    for e in range(hp.n_expert):
        routed = h[(idx == e).any(-1)]
        want = routed.T @ routed
        if e in filled:
            want = want + (fair - counts[e]) / n * h.T @ h
        n_vec = len(routed) + (n if e in filled else 0)
        assert torch.allclose(Hs[roles[e]].double(), 2.0 / n_vec * want, rtol=1e-4, atol=1e-6)


def test_auto_gives_a_layers_experts_one_type():
    from qdllm_export.targets.mix import Sensitivity, allocate

    names = ["blk.0.ffn_up_exps.0.weight", "blk.0.ffn_up_exps.1.weight", "blk.0.attn_q.weight"]
    sens = Sensitivity(errors=dict(zip(names, ({"a": 1.0, "b": 0.1}, {"a": 5.0, "b": 0.2}, {"a": 2.0, "b": 0.5}))),
                       bits={n: {"a": 2.0, "b": 4.0} for n in names}, sizes={n: 100 for n in names})
    # per tensor, expert 1 alone would be upgraded first (gain 4.8 / 200); as one unit both experts move together
    assert allocate(sens, 3.4) == {names[0]: "b", names[1]: "b", names[2]: "a"}
    assert allocate(sens, 2.0) == dict.fromkeys(names, "a")


@pytest.mark.parametrize("starved", [False, True])
def test_onnx_routes_in_the_graph(tmp_path, moe_ckpt, starved):
    """ONNX (f32): softmax, TopK and each expert on its routed tokens in the graph (``starved``: an expert no token
    reaches runs on an empty batch); onnxruntime matches the NumPy forward."""
    from formats.onnx import write_onnx
    from runtime_ref.ort import OrtBackend

    folder = _starved_checkpoint(tmp_path, 64) if starved else moe_ckpt
    src = HFTensors(folder)
    path = write_onnx(tmp_path / "m.onnx", src, tokenizer=load_tokenizer(folder), outtype="f32")
    ids = _ids(src.hparams, 32)
    got, ref = OrtBackend(path).raw_logits(ids), forward(src, ids)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bundled_mixture_is_a_trained_llada_moe(cli):
    """tiny-llada-moe resolves by name, has the documented shape, and predicts the held-out text far better than
    chance (ln 2048 = 7.6 nats) and about as well as the dense tiny-llada (docs/tiny-models.md: 3.50 and 3.45
    on the whole validation split)."""
    code, stdout, err = cli("inspect", "tiny-llada-moe", "--json")
    assert code == 0, err
    hp = json.loads(stdout)["hparams"]
    assert (hp["n_expert"], hp["n_expert_used"], hp["d_ff_exp"], hp["n_layers"]) == (8, 2, 256, 4)
    nll = {}
    for m in ("tiny-llada-moe", "tiny-llada"):  # identical windows and masks
        code, stdout, err = cli("eval", m, "--max-windows", "4", "--mc", "2", "--json")
        assert code == 0, err
        nll[m] = json.loads(stdout)["nll"]
    assert nll["tiny-llada-moe"] < 5.0 and abs(nll["tiny-llada-moe"] - nll["tiny-llada"]) < 0.6, nll
