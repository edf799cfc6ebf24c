"""Bad GGUF input: every defect is a FormatError / QdllmError naming the file, never a raw traceback."""

from __future__ import annotations

import shutil
import signal
import time

import numpy as np
import pytest

from formats.errors import FormatError, QdllmError
from formats.gguf import read_gguf, write_gguf
from formats.gguf_container import parse_gguf
from tests.test_gguf import quantized_source


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("valid")
    src, tok = quantized_source(tmp, "llada")
    return write_gguf(tmp / "good.gguf", src, tokenizer=tok, qdllm_meta={"method": "random", "bits": 2.0})


def rewrite(src, dst, *, drop=(), add=None, replace=None, meta=None, arch=None):
    """Copy a GGUF file with gguf-py, dropping / adding / replacing tensors or metadata values."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), arch or r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        val = (meta or {}).get(k, f.contents())
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, val, f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(k, val, f.types[0])
    for t in r.tensors:  # a replacement is an array (same ggml type) or (array, new ggml type)
        if t.name not in drop:
            new = (replace or {}).get(t.name, np.array(t.data))
            arr, typ = new if isinstance(new, tuple) else (new, t.tensor_type)
            w.add_tensor(t.name, arr, raw_dtype=typ)
    for name, (arr, typ) in (add or {}).items():
        w.add_tensor(name, arr, raw_dtype=typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def read_all(path):
    m = read_gguf(path)
    for n in m.tensors.names():
        m.tensors.get(n)
    return m


def test_rewrite_helper_keeps_file_valid(valid, tmp_path):
    m = read_all(rewrite(valid, tmp_path / "same.gguf"))
    assert m.qdllm_meta["method"] == "random"


def test_truncated_at_several_points(valid, tmp_path):
    data = valid.read_bytes()
    header_end = min(t.offset for t in parse_gguf(valid)[2].values())
    for cut in (0, 3, 10, 23, 40, 500, header_end // 2, header_end - 1, header_end + 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=f"cut{cut}.gguf.*(truncated|corrupt)"):
            read_all(p)


def test_wrong_magic_and_version(valid, tmp_path):
    data = bytearray(valid.read_bytes())
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + data[4:])
    with pytest.raises(FormatError, match="magic.gguf: not a GGUF file"):
        read_gguf(p)
    data[4:8] = (7).to_bytes(4, "little")
    p = tmp_path / "version.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="version.gguf: GGUF version 7"):
        read_gguf(p)
    with pytest.raises(QdllmError, match="nothere.gguf"):
        read_gguf(tmp_path / "nothere.gguf")


def test_unknown_qdllm_format_version(valid, tmp_path):
    p = rewrite(valid, tmp_path / "v2.gguf", meta={"qdllm.format_version": 2})
    with pytest.raises(FormatError, match="v2.gguf: qdllm format version 2 is unknown"):
        read_gguf(p)


def test_missing_tensors(valid, tmp_path):
    for name in ("blk.1.ffn_norm.weight", "output.weight", "blk.0.attn_q.weight.qdllm.cscale0",
                 "blk.1.ffn_down.weight.qdllm.plane1"):
        p = rewrite(valid, tmp_path / "missing.gguf", drop=(name,))
        with pytest.raises(FormatError, match=f"missing.gguf: tensor '{name}' is missing"):
            read_gguf(p)
        p.unlink()


def test_extra_tensors(valid, tmp_path):
    import gguf

    T = gguf.GGMLQuantizationType
    for name, arr, typ in (("rope_freqs.weight", np.ones(16, np.float32), T.F32),
                           ("blk.0.attn_q.weight.qdllm.plane9", np.zeros((128, 18), np.uint8), T.Q1_0),
                           ("blk.2.attn_norm.weight", np.ones(256, np.float32), T.F32)):
        p = rewrite(valid, tmp_path / "extra.gguf", add={name: (arr, typ)})
        with pytest.raises(FormatError, match=f"extra.gguf: unexpected tensor.*{name}"):
            read_gguf(p)
        p.unlink()


def test_plane_tensors_with_wrong_shape(valid, tmp_path):
    import gguf

    r = gguf.GGUFReader(valid)
    data = {t.name: np.array(t.data) for t in r.tensors}
    cases = {
        "blk.0.attn_q.weight.qdllm.plane0": data["blk.0.attn_q.weight.qdllm.plane0"][:-1],
        "blk.0.ffn_down.weight.qdllm.cscale1": np.concatenate([data["blk.0.ffn_down.weight.qdllm.cscale1"]] * 2),
        "blk.0.ffn_down.weight.qdllm.nplanes": np.array([1, 1, 1], np.int8),
        "blk.0.attn_q.weight.qdllm.mu": np.zeros((256, 3), np.float16),
        "blk.1.attn_norm.weight": np.ones(255, np.float32),
    }
    for name, arr in cases.items():
        if name not in data:
            continue
        p = rewrite(valid, tmp_path / "shape.gguf", replace={name: arr})
        with pytest.raises(FormatError, match=f"shape.gguf: tensor {name} has ne"):
            read_gguf(p)
        p.unlink()
    # plane counts that disagree with the plane tensors present, or are out of range
    kj = data["blk.0.ffn_down.weight.qdllm.nplanes"]
    for bad in (np.minimum(kj + 1, 8).astype(np.int8), np.full_like(kj, 9)):
        p = rewrite(valid, tmp_path / "kj.gguf", replace={"blk.0.ffn_down.weight.qdllm.nplanes": bad})
        with pytest.raises(FormatError, match="kj.gguf"):
            read_gguf(p)
        p.unlink()


def test_bad_values_found_on_get(valid, tmp_path):
    import gguf

    r = gguf.GGUFReader(valid)
    cs = np.array(next(t.data for t in r.tensors if t.name == "blk.1.ffn_gate.weight.qdllm.cscale0"))
    cs[0, 0] = np.nan
    emb = np.array(next(t.data for t in r.tensors if t.name == "token_embd.weight"))
    emb[3, 3] = np.inf
    p = rewrite(valid, tmp_path / "nan.gguf", replace={"blk.1.ffn_gate.weight.qdllm.cscale0": cs, "token_embd.weight": emb})
    m = read_gguf(p)
    with pytest.raises(FormatError, match="nan.gguf: tensor blk.1.ffn_gate.weight.*NaN"):
        m.tensors.get("blk.1.ffn_gate.weight")
    with pytest.raises(FormatError, match="nan.gguf: tensor token_embd.weight.*NaN or inf"):
        m.tensors.get("token_embd.weight")


def test_metadata_errors(valid, tmp_path):
    cases = [({"llada.block_count": 3}, "block_count|missing"),
             ({"llada.attention.head_count_kv": 3}, "head counts"),
             ({"tokenizer.ggml.mask_token_id": 100000}, "mask token id"),
             ({"diffusion.shift_logits": True}, "shift_logits")]
    for meta, msg in cases:
        p = rewrite(valid, tmp_path / "meta.gguf", meta=meta)
        with pytest.raises(FormatError, match=f"meta.gguf.*({msg})"):
            read_gguf(p)
        p.unlink()
    p = rewrite(valid, tmp_path / "arch.gguf", arch="llama")
    with pytest.raises(FormatError, match="arch.gguf: architecture 'llama'"):
        read_gguf(p)


def test_fuzz_only_qdllm_errors(tmp_path):
    """Random corruptions / truncations of a small valid file: only QdllmError, no hang (bounded)."""
    from dataclasses import replace

    from formats.tensors import DictTensors

    rng = np.random.default_rng(12345)
    src, tok = quantized_source(tmp_path, "dream")
    hp1 = replace(src.hparams, n_layers=1)
    one_layer = DictTensors(hp1, {n: src.get(n) for n in src.names() if not n.startswith("blk.1.")})
    good = write_gguf(tmp_path / "fuzz-good.gguf", one_layer, tokenizer=tok)
    data = good.read_bytes()
    header_end = min(t.offset for t in parse_gguf(good)[2].values())
    ti_start = data.rfind(b"token_embd.weight", 0, header_end) - 8  # the tensor-info records
    p = tmp_path / "fuzz.gguf"

    def alarm(*_):
        raise TimeoutError("read_gguf hung on a corrupt file")

    old = signal.signal(signal.SIGALRM, alarm)
    t0, n_iter, outcomes = time.time(), 0, {"ok": 0, "error": 0}
    try:
        while n_iter < 400 and time.time() - t0 < 25:
            buf = bytearray(data)
            kind = rng.integers(0, 4)
            if kind == 0:  # truncate
                buf = buf[: rng.integers(0, len(buf))]
            else:
                for _ in range(rng.integers(1, 4)):
                    r = rng.random()  # half in the tensor infos, 40% in the metadata, 10% anywhere
                    pos = int(rng.integers(ti_start if r < 0.5 else 0, header_end if r < 0.9 else len(buf)))
                    if kind == 1:
                        buf[pos] ^= 1 << int(rng.integers(0, 8))
                    elif kind == 2:
                        buf[pos] = int(rng.integers(0, 256))
                    else:  # a huge length / count
                        buf[pos : pos + 8] = int(rng.integers(0, 2**63)).to_bytes(8, "little")[: len(buf[pos : pos + 8])]
            p.write_bytes(bytes(buf))
            signal.alarm(10)
            try:
                read_all(p)
                outcomes["ok"] += 1
            except QdllmError as e:
                assert "fuzz.gguf" in str(e), str(e)
                outcomes["error"] += 1
            finally:
                signal.alarm(0)
            n_iter += 1
    finally:
        signal.signal(signal.SIGALRM, old)
        shutil.copy(p, tmp_path / "last-fuzz-case.gguf")
    assert n_iter >= 50 and outcomes["error"] > 0, outcomes
