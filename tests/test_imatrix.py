"""The imatrix writer: llama.cpp's GGUF imatrix format from MCS-masked activations, read back with gguf-py and
checked against an independent computation (the NumPy forward on the same masked windows); foreign files
refused; llama-quantize accepts ours (when a built ``llama-quantize`` is found)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from formats.errors import QdllmError
from formats.imatrix import Imatrix, check_imatrix, model_fingerprint, read_imatrix, write_imatrix
from formats.tensors import HFTensors, canonical_names, is_linear
from tests.tiny import make_checkpoint, tiny_hparams

REPO = Path(__file__).resolve().parents[1]
LLAMA_QUANTIZE = Path(os.environ.get("QDLLM_LLAMA_QUANTIZE", REPO / ".work" / "llamacpp" / "build" / "bin" / "llama-quantize"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder, hp, _ = make_checkpoint(tmp_path_factory.mktemp("ck") / "llada", "llada",
                                    hp=tiny_hparams("llada", d_model=256, d_ff=512), seed=4)
    return folder, hp


class _Recorder:
    """The NumPy forward's tensor source, summing x^2 of every matmul's input per weight (the reference)."""

    def __init__(self, src):
        self.src, self.hparams, self.rope = src, src.hparams, "neox"
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def names(self):
        return self.src.names()

    def get(self, name):
        return self.src.get(name)

    def matmul(self, name, x):
        x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.sums[name] = self.sums.get(name, 0) + (x2 * x2).sum(0)
        self.rows[name] = self.rows.get(name, 0) + x2.shape[0]
        return x @ np.asarray(self.src.get(name), np.float32).T


def test_imatrix_file_matches_an_independent_computation(model, tmp_path):
    import gguf

    from qdllm_export.calib import CalibConfig, apply_mcs, calibration_windows
    from qdllm_export.imatrix import collect_imatrix
    from formats.tokenizer import load_tokenizer
    from runtime_ref.forward import forward

    folder, _ = model
    hp = HFTensors(folder).hparams  # with the config's special ids (mask, bos)
    ccfg = CalibConfig(n_samples=4, seq_len=32)
    path = write_imatrix(tmp_path / "m.imatrix.gguf", collect_imatrix(folder, ccfg), notes={"model": "tiny"})

    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.type"] == "imatrix" and f["imatrix.chunk_count"] == 4 and f["imatrix.chunk_size"] == 32
    assert isinstance(f["imatrix.datasets"], list) and "general.architecture" not in f
    tensors = {t.name: t for t in r.tensors}
    names = [n for n in canonical_names(hp) if is_linear(hp, n)] + ["output.weight"]
    assert set(tensors) == {n + s for n in names for s in (".in_sum2", ".counts")}

    windows = calibration_windows(load_tokenizer(folder), hp, ccfg)  # the same MCS windows, the NumPy forward
    windows, _ = apply_mcs(windows, hp.mask_token_id, ccfg.prefix_ratio, ccfg.seed, protect_first=hp.spec.shift_logits)
    rec = _Recorder(HFTensors(folder))
    forward(rec, windows, rope="neox")
    for n in names:
        s, c = tensors[n + ".in_sum2"], tensors[n + ".counts"]
        assert s.tensor_type == gguf.GGMLQuantizationType.F32 and list(s.shape) == [rec.sums[n].size, 1]
        assert list(c.shape) == [1, 1] and float(np.array(c.data).ravel()[0]) == rec.rows[n] == 4 * 32
        np.testing.assert_allclose(np.array(s.data).ravel(), rec.sums[n], rtol=1e-4)


def test_foreign_imatrix_refused_naming_the_first_mismatch(model):
    folder, hp = model
    from qdllm_export.imatrix import model_widths

    widths = model_widths(folder)
    good = Imatrix({n: np.ones((1, w), np.float32) for n, w in widths.items()}, {n: np.ones(1, np.float32) for n in widths})
    check_imatrix(good, widths, "im", "m")
    wide = Imatrix({n: np.ones((1, w * 2), np.float32) for n, w in widths.items()}, good.counts)
    with pytest.raises(QdllmError, match=r"entry blk\.0\.attn_q\.weight has 512 columns but m's tensor has 256"):
        check_imatrix(wide, widths, "im", "m")
    fewer = Imatrix({n: v for n, v in good.in_sum2.items() if not n.startswith("blk.1.")}, good.counts)
    with pytest.raises(QdllmError, match=r"no entry for blk\.1\.attn_q\.weight"):
        check_imatrix(fewer, widths, "im", "m")
    more = Imatrix({**good.in_sum2, "blk.9.attn_q.weight": np.ones((1, 256), np.float32)}, good.counts)
    with pytest.raises(QdllmError, match=r"blk\.9\.attn_q\.weight is not a weight of m"):
        check_imatrix(more, widths, "im", "m")


def test_fingerprint_tells_models_of_the_same_shapes_apart(model, tmp_path):
    """Issue 15: names and widths cannot tell two models of one architecture apart; the fingerprint (hparams and
    the first values of a few tensors, rounded to bf16) does, and agrees between copies of one model."""
    folder, hp = model
    other, _, _ = make_checkpoint(tmp_path / "other", "llada", hp=hp, seed=5)
    copy, _, _ = make_checkpoint(tmp_path / "copy", "llada", hp=hp, seed=4, dtype="bfloat16", n_shards=3)
    fp, fp_other, fp_copy = (model_fingerprint(HFTensors(f)) for f in (folder, other, copy))
    assert len(fp) == 16 and fp != fp_other and fp == fp_copy
    widths = {n: hp.d_model for n in ("blk.0.attn_q.weight",)}
    im = Imatrix({"blk.0.attn_q.weight": np.ones((1, hp.d_model), np.float32)}, {"blk.0.attn_q.weight": np.ones(1, np.float32)},
                 model=str(other), fingerprint=fp_other)
    back = read_imatrix(write_imatrix(tmp_path / "o.imatrix.gguf", im))
    assert (back.model, back.fingerprint) == (str(other), fp_other)
    with pytest.raises(QdllmError, match=rf"was made from {other} \(fingerprint {fp_other}\), not from m \(fingerprint {fp}\)"):
        check_imatrix(back, widths, "im", "m", fingerprint=fp)
    check_imatrix(back, widths, "im", "m", fingerprint=fp_other)
    back.fingerprint = ""  # as llama-imatrix writes it: names and widths only
    check_imatrix(back, widths, "im", "m", fingerprint=fp)


def test_read_imatrix_refuses_other_files(tmp_path):
    from formats.gguf import write_gguf

    folder, _, _ = make_checkpoint(tmp_path / "ck", "dream", seed=1)
    path = write_gguf(tmp_path / "m.gguf", HFTensors(folder), outtype="f16")
    with pytest.raises(QdllmError, match="not an imatrix file"):
        read_imatrix(path)


@pytest.mark.skipif(not LLAMA_QUANTIZE.exists(), reason="llama-quantize not built (scripts/build_llama_tools.sh)")
def test_llama_quantize_accepts_ours_and_its_own_checks(model, tmp_path):
    """llama-quantize loads our imatrix and uses every entry; with an imatrix of other widths it stops; with one
    missing layers (names differ) it quantizes those tensors without importance, silently (why we refuse)."""
    from formats.gguf import write_gguf
    from qdllm_export.calib import CalibConfig
    from qdllm_export.imatrix import collect_imatrix

    folder, hp = model
    f16 = write_gguf(tmp_path / "f16.gguf", HFTensors(folder), outtype="f16")
    im = collect_imatrix(folder, CalibConfig(n_samples=2, seq_len=32))

    def run(imat: Imatrix, name: str):
        p = write_imatrix(tmp_path / f"{name}.imatrix.gguf", imat)
        return subprocess.run([str(LLAMA_QUANTIZE), "--imatrix", str(p), str(f16), str(tmp_path / f"{name}.gguf"), "Q2_K", "1"],
                              capture_output=True, text=True, timeout=120)

    ok = run(im, "ours")
    assert ok.returncode == 0, ok.stderr[-2000:]
    log = ok.stdout + ok.stderr
    assert f"loaded {len(im.in_sum2)} importance matrix entries" in log and "did not find weights for blk." not in log
    wide = Imatrix({n: np.tile(v, 2) for n, v in im.in_sum2.items()}, im.counts, chunk_count=2, chunk_size=32)
    bad = run(wide, "wide")
    assert bad.returncode != 0 and "imatrix size" in bad.stdout + bad.stderr
    fewer = Imatrix({n: v for n, v in im.in_sum2.items() if not n.startswith("blk.1.")}, im.counts, chunk_count=2, chunk_size=32)
    silent = run(fewer, "fewer")
    assert silent.returncode == 0 and "did not find weights for blk.1." in silent.stdout + silent.stderr


def test_imatrix_format_and_llama_cpp_runtime_are_torch_free(tmp_path):
    import sys

    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, formats.imatrix as fi, runtime_ref.llamacpp\n"
        "im = fi.Imatrix({'output.weight': np.ones((1, 8), np.float32)}, {'output.weight': np.ones(1, np.float32)}, ['t'], 1, 8)\n"
        f"p = fi.write_imatrix({str(tmp_path / 'a.imatrix.gguf')!r}, im)\n"
        "print(fi.read_imatrix(p).importance('output.weight').sum())\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "8.0", r.stderr
