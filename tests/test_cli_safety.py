"""Issue 8, items 3-4: ``--force`` never destroys data, and unwritable outputs get one line, not a traceback.

An output that is, contains or lies inside an input is refused with or without ``--force``; ``--force``
replaces only what qdllm-export wrote (a GGUF/ONNX file recognised by its contents, a quantized checkpoint
folder recognised by its record and holding nothing else)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from formats.checkpoint import QuantizedCheckpointWriter
from formats.errors import QdllmError
from formats.outputs import check_output_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "qdllm_export" / "data" / "tiny-llada"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tmp_path):
    return Path(shutil.copytree(TINY, tmp_path / "model"))


def _refused(result, *needles):
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


# ------------------------------------------------------------------------------ data loss (item 3)
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_quantize_onto_its_own_input_keeps_the_checkpoint(cli, model, force):
    before = _digest(model)
    _refused(cli("quantize", model, model, *force), "the output is the input")
    assert _digest(model) == before


@pytest.mark.parametrize("verb,out", [("quantize", "model/sub"), ("quantize", "."), ("gguf", "model/x.gguf"),
                                      ("onnx", "model/x.onnx")])
def test_output_inside_or_around_an_input_is_refused(cli, model, tmp_path, verb, out):
    before = _digest(model)
    target = tmp_path / out
    _refused(cli(verb, model, target, "--force"), "the input")
    assert _digest(model) == before


def test_output_that_is_the_calibration_file_is_refused(cli, model, tmp_path):
    calib = tmp_path / "calib.gguf"  # named as a GGUF output so that the overlap is what refuses it
    calib.write_text("To be, or not to be. " * 200)
    _refused(cli("gguf", model, calib, "--calib", calib, "--force"), "the output is the input")
    assert calib.read_text().startswith("To be")


def test_force_onto_a_users_folder_keeps_their_files(cli, model, tmp_path):
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        _refused(cli("quantize", model, user, *force), "did not write")
        assert (user / "notes.txt").read_text() == "mine"


def test_force_onto_a_users_file_keeps_it(cli, model, tmp_path):
    for name in ("notes.gguf", "notes.onnx"):
        f = tmp_path / name
        f.write_bytes(b"keep")
        _refused(cli("gguf" if name.endswith("gguf") else "onnx", model, f, "--outtype", "f16", "--force"),
                 "not a file qdllm-export wrote")
        assert f.read_bytes() == b"keep"


def test_force_replaces_our_own_gguf_only(cli, model, tmp_path):
    out = tmp_path / "m.gguf"
    assert cli("gguf", model, out, "--outtype", "f32")[0] == 0
    _refused(cli("gguf", model, out, "--outtype", "f16"), "already exists", "--force")
    size_f32 = out.stat().st_size
    code, _, err = cli("gguf", model, out, "--outtype", "f16", "--force")
    assert code == 0, err
    assert out.stat().st_size < 0.6 * size_f32  # replaced by the f16 file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]  # no temporaries left


def test_force_onto_our_onnx_refuses_a_foreign_data_file_beside_it(tmp_path):
    out = tmp_path / "m.onnx"
    from formats.onnx import write_onnx
    from formats.tensors import HFTensors

    write_onnx(out, HFTensors(TINY), outtype="f16")
    check_output_file(out, True)  # our own inline file: may be replaced
    (tmp_path / "m.onnx.data").write_bytes(b"someone else's")
    for force in (False, True):
        with pytest.raises(QdllmError, match="m.onnx.data: exists and is not the external data"):
            check_output_file(out, force)
    with pytest.raises(QdllmError, match="m.onnx.data"):
        write_onnx(out, HFTensors(TINY), outtype="f16", overwrite=True)
    assert (tmp_path / "m.onnx.data").read_bytes() == b"someone else's"


def test_checkpoint_writer_refuses_a_folder_with_foreign_files(tmp_path):
    """The library refuses too, not only the CLI: a folder holding a user's file is never removed."""
    out = tmp_path / "q"
    out.mkdir()
    (out / "qdllm_quant.json").write_text('{"format_version": 1, "files": ["qdllm_quant.json"]}')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QdllmError, match="notes.txt, which qdllm-export did not write"):
        QuantizedCheckpointWriter(out, TINY, n_shards=1, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left


def test_checkpoint_writer_leaves_a_similarly_named_folder_alone(tmp_path):
    """The temporary folder has a fresh name: a user's ``OUT.partial`` is never cleared."""
    (tmp_path / "q.partial").mkdir()
    (tmp_path / "q.partial" / "keep.txt").write_text("mine")
    w = QuantizedCheckpointWriter(tmp_path / "q", TINY, n_shards=1)
    w.abort()
    assert (tmp_path / "q.partial" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ one line for OS errors (item 4)
def test_force_onto_a_directory_is_one_line(cli, model, tmp_path):
    d = tmp_path / "out.gguf"
    d.mkdir()
    _refused(cli("gguf", model, d, "--outtype", "f16", "--force"), "is a folder")


def _readonly_run(folder: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with ``folder`` read-only: chmod for a normal user, a read-only bind mount for root."""
    cmd = [sys.executable, "-m", "qdllm_export", *args]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        finally:
            folder.chmod(0o755)
    if not shutil.which("unshare"):
        pytest.skip("root without unshare: cannot make a read-only folder")
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,ro,bind "{folder}" && exec "$@"'
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], cwd=ROOT, capture_output=True, text=True)
    if "mount" in r.stderr and r.returncode != 2:
        pytest.skip(f"no mount namespace here: {r.stderr.strip()[:200]}")
    return r


@pytest.mark.parametrize("verb,out", [("gguf", "m.gguf"), ("quantize", "q")])
def test_read_only_output_folder_is_one_line(tmp_path, verb, out):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = _readonly_run(ro, [verb, str(TINY), str(ro / out)])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write there" in r.stderr and str(ro) in r.stderr
    assert list(ro.iterdir()) == []


def test_os_error_during_writing_is_one_line(cli, model, tmp_path, monkeypatch):
    """A disk that fills up after the checks passed: one line naming the file, exit 1."""
    import formats.gguf

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(formats.gguf, "write_gguf", full)
    code, _, err = cli("gguf", model, tmp_path / "m.gguf", "--outtype", "f16")
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"error: {tmp_path / 'm.gguf'}: No space left on device"


# ------------------------------------------------------------------------------ issue 15: what a new user still hits
@pytest.mark.parametrize("verb,name,want", [("onnx", "cross.gguf", ".onnx"), ("gguf", "m.onnx", ".gguf"),
                                            ("gguf", "m", ".gguf"), ("imatrix", "m.imatrix", ".gguf")])
def test_output_extension_must_fit_the_verb(cli, model, tmp_path, verb, name, want):
    """`onnx q/ cross.gguf --force` over a GGUF the tool wrote left ONNX bytes under a .gguf name; now every file
    verb refuses an output whose extension is not its format's, before any work, and the file is untouched."""
    out = tmp_path / name
    if name == "cross.gguf":
        assert cli("gguf", model, out, "--outtype", "f16")[0] == 0
    before = out.read_bytes() if out.exists() else None
    _refused(cli(verb, model, out, "--force"), f"writes {want[1:].upper()}", f"give the output a {want} name")
    assert (out.read_bytes() if out.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model"] + ([name] if before is not None else []))


@pytest.mark.parametrize("verb,out", [("quantize", "new/q"), ("gguf", "new/m.gguf"), ("onnx", "new/m.onnx"),
                                      ("imatrix", "new/m.imatrix.gguf")])
def test_missing_parent_folder_is_refused_by_every_verb(cli, model, tmp_path, verb, out):
    """One rule for every output, files and checkpoint folders alike: its folder must exist (a mistyped path is
    an error, as in llama-quantize), never created; nothing is written."""
    _refused(cli(verb, model, tmp_path / out), f"folder {tmp_path / 'new'} does not exist", "create it first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_outputs_respect_the_umask(cli, model, tmp_path):
    """A quantized checkpoint folder was created 0700 (mkdtemp) while its files were 0644: the folder, its files
    and the GGUF / ONNX files written from it now all follow the umask, as files made with open() and mkdir do."""
    old = os.umask(0o027)
    try:
        assert cli("quantize", model, tmp_path / "q", "--method", "rtn")[0] == 0
        assert cli("gguf", tmp_path / "q", tmp_path / "q.gguf")[0] == 0
        assert cli("onnx", tmp_path / "q", tmp_path / "q.onnx")[0] == 0
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "q") == 0o750
    assert {mode(f) for f in (tmp_path / "q").iterdir()} == {0o640}
    assert mode(tmp_path / "q.gguf") == mode(tmp_path / "q.onnx") == 0o640
