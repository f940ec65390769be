"""verify and bench on a causal language model: time ratio, peak memory, prefill/decode speed.

    python benchmarks/verify_lm.py                      # the 135M LLaMA shape, random bf16 weights
    python benchmarks/verify_lm.py --model samples/tiny_lm --calib samples/tiny_lm_calib.safetensors --data samples/tiny_lm_eval.safetensors
    python benchmarks/verify_lm.py --sequences 32 --length 128 --swaps 8 --threads 2

Without ``--model`` it writes a LLaMA of the SmolLM-135M shape (30 layers, hidden 576, FFN 1536,
9 query / 3 key-value heads, vocabulary 49,152, tied embeddings) with random weights as bf16
safetensors, one tensor at a time from the meta device (never a whole fp32 model in memory),
into a temporary directory that is deleted afterwards. Then, in that directory:

1. ``cmrtool compile`` at FFN keep ``--keep`` (``--kind neuron``), calibrated on random tokens;
2. **verify memory**: ``cmrtool verify`` on ``--sequences × --length`` random eval tokens in a
   child process; its peak RSS from ``os.wait4`` (``ru_maxrss``);
3. **verify time ratio**: in one child (after one untimed warm-up of each with ``--warmup``),
   alternating ``--pairs`` times: ``cmrtool.verify.report.verify`` on the loaded models vs one plain forward of O
   plus one of R over the same tokens (whole-model forwards in batches of ``--batch``
   sequences); the median of the per-pair ratios is printed, with verify's parts;
4. **generation**: ``cmrtool.api.bench`` prefill and decode tokens/s of original and reduced
   (batch 1 and ``--gen-batch``), speedup beside the MAC ratio.

Targets (issue 13): peak RSS ≤ 2 GB and time ratio ≤ 2.5 at 32 × 128 eval tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)


def write_random_llama(path: Path, seed: int = 0) -> None:
    """A LLaMA of the 135M shape with random bf16 weights, tensor by tensor (module docstring)."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**SHAPE, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)  # one fp32 tensor at a time
    path.mkdir(parents=True)
    config.save_pretrained(str(path))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def write_tokens(path: Path, n: int, length: int, vocab: int, seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(path))


def cli(*args: str, threads: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cmrtool", *args, "--threads", str(threads)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def peak_rss(args: list[str], threads: int) -> tuple[int, float, dict]:
    """Exit code... peak RSS (bytes) and wall seconds of ``cmrtool ARGS --json`` in a child."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "cmrtool", *args, "--threads", str(threads), "--json"], stdout=out, stderr=subprocess.PIPE, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode() if proc.stderr else ""
        out.seek(0)
        text = out.read().decode()
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise SystemExit(f"cmrtool {' '.join(args)} failed:\n{err}")
    return usage.ru_maxrss * 1024, wall, json.loads(text)


_TIMING_CHILD = r"""
import json, statistics, sys, time, torch
from cmrtool import api
from cmrtool.io.data import open_data
from cmrtool.verify.report import verify
orig, red, data_path, swaps, batch, pairs, threads, warm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
api.configure(threads)
o, r = api.open_model(orig), api.open_model(red)
data = open_data(data_path, o)
x = list(data.all().inputs)
def plain():
    with torch.no_grad():
        for m in (o, r):
            for i in range(0, x[0].shape[0], batch):
                m.forward([t[i:i + batch] for t in x])
def check():
    return verify(o, r, data, swaps=swaps)
if warm:
    plain(); check()  # warm-up
ratios, vt, pt = [], [], []
for k in range(pairs):
    for f in ((plain, check) if k % 2 == 0 else (check, plain)):
        t0 = time.perf_counter(); f(); dt = time.perf_counter() - t0
        (pt if f is plain else vt).append(dt)
    ratios.append(vt[-1] / pt[-1])
print(json.dumps({"verify_s": statistics.median(vt), "plain_s": statistics.median(pt), "ratio": statistics.median(ratios), "ratios": ratios}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Hugging Face causal LM directory (default: write the random 135M shape)")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--calib-sequences", type=int, default=8)
    ap.add_argument("--swaps", type=int, default=8, help="interchange swaps per site (and for all sites)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per plain forward")
    ap.add_argument("--pairs", type=int, default=2, help="alternated verify / plain pairs")
    ap.add_argument("--warmup", action="store_true", help="one untimed verify and plain run first")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--gen-repeats", type=int, default=2)
    ap.add_argument("--gen-dtype", default="bf16", help="bench dtype for generation (fp32 on a CPU without native bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-samples", type=int, default=8, help="compile's fold-check samples")
    ap.add_argument("--calib", help="calibration tokens for compile (default: random tokens)")
    ap.add_argument("--data", help="eval tokens for verify (default: --sequences × --length random tokens)")
    ap.add_argument("--reduced", help="a reduction of --model that cmrtool compile wrote (skips compiling)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: rss, time, generation")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cmrtool-verify-lm-"))
    try:
        if args.model:
            model = Path(args.model)
        else:
            model = tmp / "llama135m"
            t0 = time.perf_counter()
            write_random_llama(model)
            print(f"wrote the 135M shape (random bf16) in {time.perf_counter() - t0:.0f} s")
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        if args.calib:
            shutil.copyfile(args.calib, tmp / "calib.safetensors")
        else:
            write_tokens(tmp / "calib.safetensors", args.calib_sequences, args.length, vocab, 1)
        if args.data:
            shutil.copyfile(args.data, tmp / "eval.safetensors")
        else:
            write_tokens(tmp / "eval.safetensors", args.sequences, args.length, vocab, 2)
        skip = set(filter(None, args.skip.split(",")))
        red = Path(args.reduced) if args.reduced else tmp / "reduced"
        t0 = time.perf_counter()
        c = subprocess.CompletedProcess([], 0) if args.reduced else cli("compile", str(model), "--calib", str(tmp / "calib.safetensors"), "--kind", "neuron", "--keep", str(args.keep),
                "--check-samples", str(args.check_samples), "-o", f"{red}/", threads=args.threads)
        if c.returncode:
            raise SystemExit(f"compile failed:\n{c.stderr}")
        if not args.reduced:
            print(f"compile: {time.perf_counter() - t0:.0f} s")
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.sequences} × {args.length} eval tokens, FFN keep {args.keep}, swaps {args.swaps}")

        if "rss" not in skip:
            report_rss(model, red, tmp, args)
        if "time" not in skip:
            report_time(model, red, tmp, args)
        if "generation" not in skip:
            report_generation(model, red, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report_rss(model: Path, red: Path, tmp: Path, args: argparse.Namespace) -> None:
    rss, wall, report = peak_rss(["verify", str(model), str(red), "--data", str(tmp / "eval.safetensors"), "--swaps", str(args.swaps)], args.threads)
    t = report["tokens"]
    print(f"verify (CLI, cold): {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB; {report['samples']} tokens, fold error {report['fold_error']:.3g}, "
          f"same top p {t['same_top_p']:.4f}, mean KLD {t['mean_kld']:.4g}, 99% KLD {t['kld_99']:.4g}, max KLD {t['maximum_kld']:.4g}, "
          f"PPL(Q)/PPL(base) {t['ppl_ratio']:.4f}, all-sites IIA {report['all_sites']['iia']:.3f}")


def report_time(model: Path, red: Path, tmp: Path, args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, "-c", _TIMING_CHILD, str(model), str(red), str(tmp / "eval.safetensors"), str(args.swaps),
                          str(args.batch), str(args.pairs), str(args.threads), str(int(args.warmup))], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise SystemExit(f"timing failed:\n{out.stderr}")
    timing = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"verify {timing['verify_s']:.1f} s vs plain O + R forwards {timing['plain_s']:.1f} s: ratio {timing['ratio']:.2f} "
          f"(median of {args.pairs} alternated pairs: {', '.join(f'{x:.2f}' for x in timing['ratios'])})")


def report_generation(model: Path, red: Path, args: argparse.Namespace) -> None:
    from cmrtool import api

    api.configure(args.threads)
    b = api.bench([str(model), str(red)], input_shapes=[f"1,{args.length}"], batch=args.gen_batch, device="auto", dtype=args.gen_dtype,
                  warmup=1, repeats=args.gen_repeats, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens)
    print(f"generation ({b.device}, {b.dtype}; {args.prompt_tokens}-token prompts, {args.decode_tokens} greedy steps, "
          f"{args.gen_repeats} alternated rounds); MAC ratio {b.mac_ratio:.2f}")
    print("| batch | prefill tok/s O | prefill tok/s R | prefill speedup | decode tok/s O | decode tok/s R | decode speedup | MAC ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    gen = b.generation
    for i in range(0, len(gen), 2):
        o_, r_ = gen[i], gen[i + 1]
        print(f"| {o_.batch} | {o_.prefill_tokens_per_s:.0f} | {r_.prefill_tokens_per_s:.0f} | {r_.prefill_speedup:.2f} | "
              f"{o_.decode_tokens_per_s:.1f} | {r_.decode_tokens_per_s:.1f} | {r_.decode_speedup:.2f} | {b.mac_ratio:.2f} |")
    for n in b.notes:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
