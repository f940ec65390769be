"""Language-model quality of FFN reduction: perplexity of every compensation mode (issue 14).

Usage::

    python benchmarks/llm_quality.py MODEL_DIR --calib calib.safetensors --eval eval.safetensors \\
        [--keep 0.75,0.5,0.25] [--threads 2] [--ridge 1e-3] [--json results.json]

MODEL_DIR is a Hugging Face causal LM directory; the data files hold ``input_ids`` (n, T) and
optionally ``attention_mask`` (padding is excluded from the perplexity). Modes without ``+seq``
run with ``--calibration original`` (one-shot statistics). At each
FFN keep fraction (``--kind neuron``: every gated/plain FFN of every layer, the same fraction),
one ``cmrtool compile`` child process per mode writes a Hugging Face directory, and its
perplexity on the eval tokens is measured here, streaming: the trunk's hidden states per batch
of sequences, then the LM head on chunks of positions (never tokens × vocab at once for the
whole set). Wall time and peak RSS are the compile child's (``os.wait4``).

Modes: ``dense`` (no reduction), ``delete`` (``--replacement zero``: units removed, nothing
folded), ``mean`` (cmrtool's default: the calibration mean folded into a bias), ``affine``
(ridge refit on all kept units, CMR A.5), ``mean+seq``, ``affine+seq`` (the same with ``--calibration
sequential``, when the installed cmrtool has it), ``lsq+affine`` (``--criterion cmr-lsq``),
``lsq+affine+seq``, ``affine-nobias`` (intercept-free) and ``lsq+affine-nobias``. The last line checks the issue's
target: at keep 0.5 the best mode's perplexity increase over dense is at most a quarter of the
mean fold's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "delete": ["--replacement", "zero"],
    "mean": ["--replacement", "mean"],
    "mean+seq": ["--replacement", "mean", "--calibration", "sequential"],
    "affine": ["--replacement", "affine"],
    "affine+seq": ["--replacement", "affine", "--calibration", "sequential"],
    "lsq+affine": ["--criterion", "cmr-lsq", "--replacement", "affine"],
    "lsq+affine+seq": ["--criterion", "cmr-lsq", "--replacement", "affine", "--calibration", "sequential"],
    "affine-nobias": ["--replacement", "affine-nobias"],
    "lsq+affine-nobias": ["--criterion", "cmr-lsq", "--replacement", "affine-nobias"],
}


def has_sequential() -> bool:
    """Whether the installed cmrtool's compile takes ``--calibration`` (the block engine)."""
    out = subprocess.run([sys.executable, "-m", "cmrtool", "compile", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    return "--calibration" in out.stdout


def run_child(cmd: list[str]) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS in MB, stderr tail) of a child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024, " | ".join(tail)


def perplexity(model_dir: Path, eval_path: Path, batch: int = 8, chunk_elems: int = 1 << 22) -> float:
    """exp(mean next-token NLL) over every sequence of ``eval_path``, streamed."""
    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors import safe_open

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    trunk, head = model.base_model, model.get_output_embeddings()
    total, count = 0.0, 0
    with safe_open(str(eval_path), framework="pt") as f:
        ids_slice = f.get_slice("input_ids")
        mask_slice = f.get_slice("attention_mask") if "attention_mask" in f.keys() else None
        n, t = ids_slice.get_shape()
        for i in range(0, n, batch):
            ids = ids_slice[i : i + batch].long()
            mask = mask_slice[i : i + batch].long() if mask_slice is not None else torch.ones_like(ids)
            with torch.no_grad():
                h = trunk(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (b, T, hidden)
                step = max(1, chunk_elems // max(ids.shape[0] * head.weight.shape[0], 1))
                for p in range(0, t - 1, step):
                    q = min(t - 1, p + step)
                    logits = head(h[:, p:q]).double()
                    # A prediction counts where the token and the next one are both real (not padding).
                    valid = (mask[:, p:q] * mask[:, p + 1 : q + 1]).reshape(-1).bool()
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, p + 1 : q + 1].reshape(-1), reduction="none")
                    total += float(nll[valid].sum())
                    count += int(valid.sum())
    del model
    return math.exp(total / max(count, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--keep", default="0.75,0.5,0.25")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ridge", default=None, help="passed to cmrtool compile --ridge (default: cmrtool's)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    seq = has_sequential()
    keeps = [float(k) for k in args.keep.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    rows: list[dict] = []
    dense = perplexity(Path(args.model), Path(args.eval))
    print(f"{'keep':>5} {'mode':<15} {'ppl':>9} {'Δppl':>8} {'wall s':>7} {'RSS MB':>7}  notes")
    print(f"{1.0:>5} {'dense':<15} {dense:>9.3f} {0.0:>8.3f} {'':>7} {'':>7}")
    rows.append({"keep": 1.0, "mode": "dense", "ppl": dense})
    with tempfile.TemporaryDirectory(prefix="llm-quality-") as tmp:
        for keep in keeps:
            for mode in modes:
                if mode.endswith("+seq") and not seq:
                    print(f"{keep:>5} {mode:<15} {'n/a':>9} {'':>8} {'':>7} {'':>7}  n/a (needs the block engine)")
                    rows.append({"keep": keep, "mode": mode, "ppl": None, "note": "needs the block engine"})
                    continue
                out = Path(tmp) / f"{mode}-{keep}"
                cmd = [sys.executable, "-m", "cmrtool", "compile", args.model, "--calib", args.calib, "--kind", "neuron",
                       "--keep", str(keep), "-o", f"{out}/", "--threads", str(args.threads), "--quiet", *MODES[mode]]
                if args.ridge is not None:
                    cmd += ["--ridge", args.ridge]
                if seq and "--calibration" not in MODES[mode]:  # one-shot: every layer sees the original's inputs
                    cmd += ["--calibration", "original"]
                rc, wall, rss, err = run_child(cmd)
                if rc != 0:
                    print(f"{keep:>5} {mode:<15} {'failed':>9} {'':>8} {wall:>7.1f} {rss:>7.0f}  {err[:160]}")
                    rows.append({"keep": keep, "mode": mode, "ppl": None, "wall_s": wall, "rss_mb": rss, "note": err})
                    continue
                ppl = perplexity(out, Path(args.eval))
                print(f"{keep:>5} {mode:<15} {ppl:>9.3f} {ppl - dense:>8.3f} {wall:>7.1f} {rss:>7.0f}")
                rows.append({"keep": keep, "mode": mode, "ppl": ppl, "wall_s": wall, "rss_mb": rss})
                subprocess.run(["rm", "-rf", str(out)], check=False)
    half = {r["mode"]: r["ppl"] for r in rows if r["keep"] == 0.5 and r.get("ppl") is not None}
    if "mean" in half:
        best = min((m for m in half if m not in ("mean", "delete")), key=lambda m: half[m], default=None)
        if best is not None:
            gain, ref = half[best] - dense, half["mean"] - dense
            ok = gain <= 0.25 * ref
            print(f"target (keep 0.5: best mode's Δppl ≤ ¼ of the mean fold's): {'PASS' if ok else 'FAIL'} — "
                  f"{best} +{gain:.3f} vs mean +{ref:.3f} (ratio {gain / ref if ref else float('nan'):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": dense, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
