"""An attacker's inputs: files that name code, model directories that ship code, pickles in every
place a file is read, and two writers racing for one output name. Nothing may run, nothing may be
replaced, and every refusal is one ``error:`` line with a ``hint:``.

Code-running cases run cmrtool in a subprocess (``python -m cmrtool``, from the attacker's
directory), so that a regression kills or changes that process, not the test runner; the payloads
only create a marker file, whose absence is the proof.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, SAMPLES
from safetensors.torch import load_file, save_file

MLP_ST = SAMPLES / "digits_mlp.safetensors"
CALIB = SAMPLES / "calib.safetensors"
OWN = "cmrtool.testing.models:digits_mlp"


def _cmrtool(cwd: Path, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # cmrtool itself; never the attacker's directory
    return subprocess.run(
        [sys.executable, "-m", "cmrtool", *map(str, args), "--threads", "1"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _clean_error(r: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and text in errors[0], r.stderr
    assert sum(ln.startswith("hint: ") for ln in r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A reduced safetensors file of the digits MLP (cmrtool's own factory)."""
    from cmrtool import api

    d = tmp_path_factory.mktemp("reduced")
    api.compile(MLP_ST, d / "r.safetensors", calib=CALIB, keep=0.5, arch=OWN)
    return d / "r.safetensors"


def _with_arch(src: Path, dest: Path, arch: str) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta["cmrtool_arch"] = arch
    save_file(load_file(str(src)), str(dest), metadata=meta)
    return dest


_PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from cmrtool.testing.models import digits_mlp as build
"""


@pytest.mark.parametrize("command", ["inspect", "verify", "bench"])
def test_metadata_naming_code_is_refused_with_the_arch_that_trusts_it(command, reduced, tmp_path, cli, monkeypatch):
    evil = _with_arch(reduced, tmp_path / "evil.safetensors", "evilmod:build")
    (tmp_path / "evilmod.py").write_text(_PAYLOAD.format(marker=str(tmp_path / "RAN")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, as under python -m: only the check stops it
    args = {
        "inspect": ["inspect", evil],
        "verify": ["verify", SAMPLES / "digits_mlp.pt", evil, "--data", CALIB],
        "bench": ["bench", evil, "--data", CALIB, "--repeats", "1", "--warmup", "0"],
    }[command]
    r = cli(*args)
    assert r.code == 1 and "names code to run (evilmod:build)" in r.err and "pass --arch evilmod:build" in r.err, r.err
    assert "Traceback" not in r.err and not (tmp_path / "RAN").exists()


def test_an_explicit_arch_is_trusted_and_found_in_the_current_directory(reduced, tmp_path, cli, monkeypatch):
    evil = _with_arch(reduced, tmp_path / "evil.safetensors", "evilmod2:build")
    (tmp_path / "evilmod2.py").write_text(_PAYLOAD.format(marker=str(tmp_path / "RAN")))
    monkeypatch.chdir(tmp_path)
    r = cli("inspect", evil, "--arch", "evilmod2:build", "--json")
    assert r.code == 0, r.err
    assert (tmp_path / "RAN").exists() and r.json()["sites"]


def test_load_reduced_refuses_foreign_code_and_accepts_cmrtools_own(reduced, tmp_path, monkeypatch):
    from cmrtool import load_reduced
    from cmrtool.errors import InputError

    evil = _with_arch(reduced, tmp_path / "evil.safetensors", "evilmod:build")
    (tmp_path / "evilmod.py").write_text(_PAYLOAD.format(marker=str(tmp_path / "RAN")))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="names code to run") as e:
        load_reduced(evil)
    assert e.value.hint == "if you trust that code, pass --arch evilmod:build" and not (tmp_path / "RAN").exists()
    assert load_reduced(reduced).plan is not None  # cmrtool.testing.models is cmrtool's own


def test_python_m_imports_nothing_beside_the_files_and_never_calls_named_code(reduced, tmp_path):
    """``python -m`` puts the current directory first on sys.path: a typer.py or helpers.py there
    must not shadow anything cmrtool imports; metadata naming os:abort used to kill the process."""
    for name in ("typer", "helpers", "safetensors"):
        (tmp_path / f"{name}.py").write_text(f"import pathlib; pathlib.Path({str(tmp_path / name)!r} + '.RAN').write_text('x')\n")
    aborting = _with_arch(reduced, tmp_path / "abort.safetensors", "os:abort")
    r = _cmrtool(tmp_path, "inspect", aborting)
    _clean_error(r, 1, "names code to run (os:abort)")
    assert not list(tmp_path.glob("*.RAN"))


def _remote_code_dir(root: Path, model_type: str) -> Path:
    d = root / f"remote-{model_type}"
    d.mkdir()
    if model_type == "llama":
        from test_bad_inputs import _tiny_llama

        _tiny_llama(d / "base")
        for f in (d / "base").iterdir():
            f.rename(d / f.name)
        (d / "base").rmdir()
        config = json.loads((d / "config.json").read_text())
    else:
        config = {"model_type": model_type, "architectures": ["EvilModel"]}
        save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    for mod in ("configuration_evil", "modeling_evil"):
        (d / f"{mod}.py").write_text(f"import pathlib; pathlib.Path({str(root / 'RAN')!r}).write_text('x')\n")
    return d


def _on_a_pty(cwd: Path, *args: object, answer: bytes = b"y\n", timeout: float = 120) -> tuple[int, str]:
    """Run cmrtool with stdin/stdout/stderr on a pseudo-terminal, answering 'y' to any prompt."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "cmrtool", *map(str, args), "--threads", "1"],
                            cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    os.write(master, answer)  # typed ahead: a prompt would read it
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if b"[y/N]" in out:
                os.write(master, answer)
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=30)
    os.close(master)
    return code, out.decode(errors="replace")


def test_remote_code_never_runs_and_is_never_offered_on_a_terminal(tmp_path):
    pytest.importorskip("transformers")
    unknown = _remote_code_dir(tmp_path, "evil_custom")
    code, out = _on_a_pty(tmp_path, "inspect", unknown)
    assert code == 1 and "never runs code from a model directory" in out and "Traceback" not in out, out
    assert "[y/N]" not in out and "trust_remote_code" not in out
    from cmrtool.backends import load_model

    known = _remote_code_dir(tmp_path, "llama")  # a built-in model_type: transformers' own class, no prompt
    assert load_model(known).sites and not (tmp_path / "RAN").exists()


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _pickle_files(tmp: Path) -> dict[str, tuple[list, str]]:
    """name → (argv, text of the error); every file carries a pickle that would mkdir ``PWNED``."""
    pwned = str(tmp / "PWNED")
    payload = pickle.dumps(_Marker(pwned))
    files: dict[str, tuple[list, str]] = {}
    # TorchScript: an archive whose data.pkl is the payload
    ts = tmp / "ts.pt"
    with zipfile.ZipFile(SAMPLES / "digits_mlp.pt") as src, zipfile.ZipFile(ts, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, payload if item.filename.endswith("data.pkl") else src.read(item))
    files["torchscript data.pkl"] = (["inspect", ts], "not a readable TorchScript archive")
    # a torch.save pickle as the model, and as data
    tsv = tmp / "saved.pt"
    torch.save({"x": _Marker(pwned)}, tsv)
    files["torch.save model"] = (["inspect", tsv], "torch.save pickle")
    files["torch.save data"] = (["score", SAMPLES / "digits_mlp.pt", "--calib", tsv], "cannot read data file")
    # numpy: object arrays need allow_pickle, which cmrtool never passes
    npy = tmp / "obj.npy"
    np.save(npy, np.array([_Marker(pwned), 1], dtype=object), allow_pickle=True)
    files["npy object array"] = (["score", SAMPLES / "digits_mlp.pt", "--calib", npy], "Python objects")
    npz = tmp / "obj.npz"
    np.savez(npz, input=np.array([_Marker(pwned), 1], dtype=object))
    files["npz object array"] = (["score", SAMPLES / "digits_mlp.pt", "--calib", npz], "")
    # safetensors metadata holding a pickle instead of the plan
    st = tmp / "meta.safetensors"
    save_file(load_file(str(MLP_ST)), str(st), metadata={"cmrtool_plan": payload.decode("latin-1"), "cmrtool_arch": OWN})
    files["safetensors metadata"] = (["inspect", st], "plan")
    # a Hugging Face directory with pickled weights only
    hf = tmp / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "pytorch_model.bin").write_bytes(payload)
    files["pytorch_model.bin"] = (["inspect", hf], "only pytorch_model.bin")
    # scores given as a pickle
    files["scores"] = (["compile", SAMPLES / "digits_mlp.pt", "--scores", tsv, "--keep", "0.5", "-o", tmp / "r.pt"], "")
    return files


def test_no_pickle_is_ever_unpickled(tmp_path, cli):
    files = _pickle_files(tmp_path)
    for name, (args, text) in files.items():
        r = cli(*args)
        assert r.code == 1, (name, r.err)
        errors = [ln for ln in r.err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and text in errors[0] and "Traceback" not in r.err, (name, r.err)
        assert not (tmp_path / "PWNED").exists(), name
    assert not (tmp_path / "r.pt").exists()


def test_two_concurrent_compiles_to_one_output_one_wins(tmp_path):
    out = tmp_path / "r.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "cmrtool", "compile", str(SAMPLES / "digits_mlp.pt"), "--calib", str(CALIB), "--threads", "1", "-q", "--json", "-o", str(out)]
    procs = [subprocess.Popen(argv + ["--keep", k], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in ("0.5", "0.25")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 2)
    assert "already exists" in loser[2] and "Traceback" not in loser[2]
    from cmrtool.backends.torchscript.model import TorchScriptModel

    kept = [len(sp.kept) for sp in TorchScriptModel(out).plan.sites]
    assert kept == [len(s["kept"]) if isinstance(s.get("kept"), list) else s["kept"] for s in json.loads(winner[1])["sites"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pt"]


@pytest.mark.parametrize("renameat2", [True, False])
def test_a_directory_that_appears_meanwhile_is_never_replaced(tmp_path, monkeypatch, renameat2):
    import cmrtool.io.noreplace as nr
    from cmrtool.errors import UsageError
    from cmrtool.io.files import atomic_dir

    if not renameat2:
        monkeypatch.setattr(nr, "_renameat2", lambda src, dest: False)  # the mkdir-claim fallback
    dest = tmp_path / "out"
    with pytest.raises(UsageError, match="already exists"):
        with atomic_dir(dest) as tmp:
            (tmp / "mine").write_text("mine")
            dest.mkdir()  # another writer got there first (an empty directory would be replaced by rename)
    assert list(dest.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(tmp_path / "fresh") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "fresh" / "f").read_text() == "x"
