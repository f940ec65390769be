"""torchrun: two ranks (gloo on loopback) give exactly the single-process statistics, scores and
plan; only rank 0 prints and writes; a failure on one rank stops the job with one error."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, SAMPLES

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.io.data import Dataset

MLP = SAMPLES / "digits_mlp.pt"
CONVNET = SAMPLES / "digits_convnet.pt"
CALIB = SAMPLES / "calib.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, ranks: int | None):
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    cmd = [sys.executable, *launcher, "-m", "cmrtool", *map(str, args), "--threads", "1"]
    env = {**os.environ, "CMRTOOL_DIST_BACKEND": "gloo"}  # loopback, even on a machine with GPUs
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _single_and_torchrun(args, tmp_path, suffix: str):
    """Run ``args`` in one process (output ``one``) and on two ranks (output ``two``)."""
    one = _run([*args, "-o", tmp_path / f"one{suffix}"], None)
    two = _run([*args, "-o", tmp_path / f"two{suffix}"], 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    return one, two


def _our_lines(stderr: str) -> list[str]:
    """cmrtool's own stderr lines (torchrun adds its banner and, on failure, its report)."""
    return [ln for ln in stderr.splitlines() if re.match(r"(error|hint|warning|scoring|wrote)\b", ln)]


@pytest.mark.slow
def test_torchrun_score_equals_single_process(tmp_path):
    # 24-row batches: 22 batches, the last one partial; each rank computes 11 of them.
    one, two = _single_and_torchrun(["score", MLP, "--calib", CALIB, "--keep", "0.25", "--batch-size", "24", "--json"], tmp_path, ".json")
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 printed: one document
    for sa, sb in zip(a["sites"], b["sites"], strict=True):
        assert sa["kept"] == sb["kept"]
        for key in ("scores", "mean", "replacement"):
            assert torch.allclose(torch.tensor(sa[key], dtype=torch.float64), torch.tensor(sb[key], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert a == b  # in fact bit for bit (see cmrtool.distributed)
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "two.json"]
    ours = _our_lines(two.stderr)
    assert [ln.split(":")[0] for ln in ours] == ["scoring (cmr-logit)", f"wrote {tmp_path / 'two.json'}"], two.stderr


@pytest.mark.slow
def test_torchrun_compile_writes_the_single_process_checkpoint(tmp_path):
    # 8-row batches: 64 batches dealt out in two rounds of 16 per rank.
    one, two = _single_and_torchrun(["compile", CONVNET, "--calib", CALIB, "--keep", "0.5", "--batch-size", "8", "--json"], tmp_path, ".pt")
    pa, pb = TorchScriptModel(tmp_path / "one.pt").plan, TorchScriptModel(tmp_path / "two.pt").plan
    assert [s.kept for s in pa.sites] == [s.kept for s in pb.sites]
    assert pa.dumps() == pb.dumps()
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    ra, rb = json.loads(one.stdout), json.loads(two.stdout)
    assert {**ra, "output": None} == {**rb, "output": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.pt", "two.pt"]  # rank 1 wrote nothing
    assert len([ln for ln in _our_lines(two.stderr) if ln.startswith("scoring")]) == 1


@pytest.mark.slow
def test_torchrun_failure_on_one_rank_is_one_error(tmp_path):
    from safetensors.torch import load_file, save_file

    d = load_file(str(CALIB))
    d["input"][500, 0, 3, 3] = float("nan")  # in the batches of rank 1 (batch size 24)
    bad = tmp_path / "bad.safetensors"
    save_file(d, str(bad))
    r = _run(["compile", MLP, "--calib", bad, "--keep", "0.5", "--batch-size", "24", "-o", tmp_path / "r.pt"], 2)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: rank 1: tensor 'input' in {bad} has NaN or Inf (first at sample 500)"], r.stderr
    assert sum(ln.startswith("hint:") for ln in r.stderr.splitlines()) == 1
    # torchrun prints its own report; no frame of our package (cmrtool/<module>.py) may appear in it
    assert not re.search(r'File "[^"]*/cmrtool/(backends/)?[a-z_]+\.py"', r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_ranks_deal_out_every_batch_once(monkeypatch):
    """The dealing of batches to ranks, without processes: every batch of the single-process
    batching is computed by exactly one rank, and never more than one round at a time."""
    import cmrtool.distributed as dist

    data = Dataset(CALIB, ["x"])
    monkeypatch.setattr(dist, "_group", object())  # pretend the group exists
    monkeypatch.setattr(dist, "_exchange", lambda payload: [payload])  # see only this rank's rows
    for world, batch in ((2, 24), (3, 24), (2, 8), (5, 256)):
        computed: list[int] = []
        for me in range(world):
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("RANK", str(me))

            def compute(b, out=computed):
                out.append(b.start)
                return {"s": (len(b), torch.zeros(1), torch.zeros(1))}

            for _ in dist.gather_partials(data, batch, None, compute, [("s", 1)]):
                pass
        assert sorted(computed) == list(range(0, 512, batch)), (world, batch)


def _rank_main(rank: int, port: int, results) -> None:  # runs in a spawned process
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CMRTOOL_DIST_BACKEND="gloo")
    from cmrtool import distributed
    from cmrtool.errors import InputError

    distributed.init()
    try:
        if rank == 1:  # fails before it ever reaches the data, e.g. a file missing on its node
            shown, here = distributed.fail(InputError("data file not found: calib.safetensors", "check the path"))
            results.put((rank, type(shown).__name__, str(shown), here, shown.exit_code))
        else:  # meanwhile rank 0 waits in the first exchange of the statistics
            data = Dataset(CALIB, ["x"])
            list(distributed.gather_partials(data, 256, None, lambda b: {}, []))
            results.put((rank, "no error", "", True, 0))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        shown, here = distributed.fail(e)
        results.put((rank, type(shown).__name__, str(shown), here, getattr(shown, "exit_code", -1)))


@pytest.mark.slow
def test_a_rank_failing_before_the_data_stops_the_rank_waiting_for_it():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == [
        (0, "RemoteError", "rank 1: data file not found: calib.safetensors", True, 1),  # rank 0 prints it
        (1, "InputError", "data file not found: calib.safetensors", False, 1),  # rank 1 stays quiet
    ]
