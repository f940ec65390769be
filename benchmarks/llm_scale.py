"""Language models at real scale: block-by-block compile of random-weight LLaMA models.

    python benchmarks/llm_scale.py --sizes 135m,1.2b [--work DIR] [--threads 2] [--keep-files] [--replacement affine]
                                   [--tokens 16x128]

For each size a LLaMA-family model with random weights is written as bf16 safetensors shards,
tensor by tensor from a meta-device model (never a whole fp32 model in memory), with random
calibration tokens; then, each as its own child process whose peak resident memory is the
``ru_maxrss`` that ``os.wait4`` reports:

1. ``plain``: one plain forward pass over the same tokens, layer by layer (each layer read,
   materialized in fp32, run over all tokens, freed: the least work any layer-wise method does),
2. ``compile``: ``python -m cmrtool compile DIR --calib tokens --kind neuron --keep 0.5 -o OUT/``
   with the default (original) calibration and the default fold check (``--replacement R``
   is passed on when given: ``affine`` refits the removed units on all kept units),
3. ``load``: the reduced directory loaded with stock ``from_pretrained`` with its weights left on
   disk (``device_map={"": "disk"}``, needs ``accelerate``; parameters on the meta device) and its
   tensor shapes compared with the expected ones (``intermediate_size`` halved).

Printed per size: peak RSS of compile; peak RSS ÷ (largest layer in fp32 + the calibration
buffers compile reports); compile wall time (the whole process: start-up, hashing the input, copying the embeddings and
writing the output included); wall time ÷ the plain forward's wall time (only the layers' pass,
inside its process; both measured in the same run, one after the other, on the same machine);
and compile's own phases (``engine.phases`` of its JSON report). This driver never imports
torch: with ``vfork`` the kernel would charge the parent's peak RSS to each child.

Sizes (real shapes): 135m — 30 layers, hidden 576, FFN 1536, 9/3 heads, vocab 49152, tied
embeddings; 1.2b — the Llama-3.2-1B shape; 8b — the Llama-3-8B shape (16 GB in bf16). Calibration:
128 sequences × 128 tokens (16,384 tokens, the set of the measurements that motivated the engine)
for 135m and 1.2b; 16 × 128 (2,048 tokens) for 8b, to keep its run near 30 minutes here;
gemma-2b-6l — the Gemma-2B shape with 6 of its 18 layers (2.4 GB in bf16; 16 × 128 tokens), a
non-LLaMA family through the same engine (``--sizes gemma-2b-6l``); qwen2-moe-2l — the
Qwen1.5-MoE-A2.7B shape with 2 of its 24 layers (60 experts per layer, stored per expert; 2.9 GB;
16 × 128 tokens).
``--tokens NxT`` overrides it for every size (compile's per-run and per-layer costs — start-up,
hashing, writing, the float64 fold check on 64 tokens per layer — do not shrink with the
calibration set, so the time ratio is larger at fewer tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=2048, tokens=(128, 128)),
    "1.2b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192, tokens=(128, 128)),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192, tokens=(16, 128)),
    # Another family through the engine: the Gemma-2B shape (multi-query attention, head_dim 256,
    # GeGLU FFN 16384, vocabulary 256000, embeddings scaled by sqrt(hidden)) cut to 6 of its 18
    # layers, so the bf16 checkpoint stays near 2.4 GB.
    "gemma-2b-6l": dict(family="Gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=1, head_dim=256, vocab_size=256000, tie_word_embeddings=True, rope_theta=10000.0,
                        max_position_embeddings=8192, tokens=(16, 128)),
    # Experts through the engine: the Qwen1.5-MoE-A2.7B shape (60 experts of width 1408 per layer,
    # 4 routed per token, a shared expert of width 5632) cut to 2 of its 24 layers, embeddings tied
    # (2.9 GB in bf16); the experts are stored one tensor per expert, as save_pretrained writes them.
    "qwen2-moe-2l": dict(family="Qwen2Moe", hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                         shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, max_position_embeddings=8192, tokens=(16, 128)),
}


# -- children (these import torch) ---------------------------------------------------------------
def _make(size: str, directory: Path) -> None:
    """Write the random bf16 checkpoint (sharded), tensor by tensor."""
    import torch
    import transformers

    from cmrtool.engine.writer import StreamWriter

    shape = dict(SHAPES[size])
    shape.pop("tokens")
    family = shape.pop("family", "Llama")
    config = getattr(transformers, f"{family}Config")(**shape, dtype="bfloat16")
    with torch.device("meta"):
        model = getattr(transformers, f"{family}ForCausalLM")(config)
    directory.mkdir(parents=True, exist_ok=True)
    scratch = directory / ".parts"
    scratch.mkdir(exist_ok=True)
    writer = StreamWriter(scratch, shard_bytes=2 << 30, reserve=1 << 16)
    g = torch.Generator().manual_seed(0)
    from cmrtool.engine.convert import Conversions

    stored = Conversions(model)
    for name, p in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if p.dim() == 3:  # a bank of experts: stored one tensor per expert, as save_pretrained writes it
            bank = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
            for k, v in stored.to_checkpoint({name: bank}).items():
                writer.add(k, v)
            del bank
            continue
        rows = p.shape[0]
        step = max(1, (32 << 20) // max(1, p[0].numel() if p.dim() > 1 else 1))

        def pieces(p=p, rows=rows, step=step, name=name):  # noqa: ANN001
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                if name.endswith("norm.weight"):
                    block = torch.ones((r1 - r0, *p.shape[1:]))
                else:
                    block = torch.randn((r1 - r0, *p.shape[1:]), generator=g) * 0.02
                yield block.to(torch.bfloat16).reshape(-1).view(torch.uint8).numpy().tobytes()

        writer.add_raw(name, torch.bfloat16, tuple(p.shape), pieces(), p.numel() * 2)
    writer.finish(directory, None, {"format": "pt"})
    shutil.rmtree(scratch)
    config.architectures = [f"{family}ForCausalLM"]
    config.save_pretrained(str(directory))


def _tokens(vocab: int, n: int, t: int, path: Path) -> None:
    """Random calibration tokens, a quarter of the sequences padded at the end."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1::4, t - t // 4 :] = 0
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))


def _plain(directory: Path, tokens: Path, threads: int) -> None:
    """One plain forward pass over the tokens, layer by layer; prints the wall time."""
    import torch
    from safetensors.torch import load_file

    from cmrtool.engine.blocks import BlockStack
    from cmrtool.engine.memory import release

    torch.set_num_threads(threads)
    data = load_file(str(tokens))
    stack = BlockStack(directory)
    start = time.perf_counter()
    mask = data["attention_mask"]
    h = stack.embed(data)
    batch = max(1, 2048 // mask.shape[1])
    with torch.no_grad():
        for i in range(len(stack)):
            block = stack.block(i, stack.read_layer(i))
            for b0 in range(0, h.shape[0], batch):
                h[b0 : b0 + batch] = block.forward([h[b0 : b0 + batch], mask[b0 : b0 + batch]])
            del block
            release()
    print(json.dumps({"seconds": time.perf_counter() - start}))


def _load(directory: Path, intermediate: int) -> None:
    """Stock from_pretrained with every weight offloaded to disk (parameters stay on the meta
    device; needs ``accelerate``); the FFN shapes must be the reduced ones."""
    import tempfile

    import torch
    import transformers

    try:
        import accelerate  # noqa: F401  (from_pretrained's disk offloading)
    except ImportError:  # no disk offloading: the config and the safetensors headers instead
        from safetensors import safe_open

        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with torch.device("meta"):
            want_model = transformers.AutoModelForCausalLM.from_config(config)  # the shapes stock loading expects
        want_shapes = {k: tuple(v.shape) for k, v in want_model.state_dict().items()}
        got_shapes = {}
        for f in sorted(directory.glob("*.safetensors")):
            if f.name.startswith("cmrtool_"):
                continue
            with safe_open(str(f), "pt") as sf:
                got_shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
        from cmrtool.engine.convert import Conversions

        conv = Conversions(want_model)  # an expert's stored tensor is one slice of a merged one
        field = "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"
        ok = all(want_shapes.get(k) == v for k, v in got_shapes.items() if not conv.merged(k)) and getattr(config, field) == intermediate
        ffn = [k for k in got_shapes if k.startswith("model.layers.0.mlp.") and k.endswith(("gate_proj.weight", "down_proj.weight"))]
        got = (*(got_shapes[k] for k in sorted(ffn)[:2]), getattr(config, field))
        ok = ok and all(intermediate in shape for shape in got[:2])
        print(json.dumps({"ok": ok, "shapes": got, "checked": "config + safetensors headers (accelerate missing)"}))
        return
    with tempfile.TemporaryDirectory() as offload:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, dtype=torch.bfloat16, device_map={"": "disk"}, offload_folder=offload,
        )
    mlp = model.model.layers[0].mlp
    params = sum(p.numel() for p in model.parameters())
    if not hasattr(mlp, "gate_proj"):  # a bank of experts: 3-D (experts, out, in) parameters, gate and up fused
        shapes = {k: tuple(v.shape) for k, v in mlp.experts.named_parameters()}
        ok = model.config.moe_intermediate_size == intermediate and all(
            intermediate in shape or 2 * intermediate in shape for shape in shapes.values())
        print(json.dumps({"ok": ok, "shapes": [*shapes.values(), model.config.moe_intermediate_size], "params": params}))
        return
    got = (tuple(mlp.gate_proj.weight.shape), tuple(mlp.down_proj.weight.shape), model.config.intermediate_size)
    want = ((intermediate, model.config.hidden_size), (model.config.hidden_size, intermediate), intermediate)
    print(json.dumps({"ok": got == want, "shapes": got, "dtype": str(mlp.gate_proj.weight.dtype), "params": params}))


# -- driver (no torch) ---------------------------------------------------------------------------
def _run_measured(args: list[str]) -> tuple[float, int, str, str]:
    """Run a child; return (wall seconds, its own peak RSS in bytes from ``os.wait4``, stdout, stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(err[-3000:])
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}")
    return wall, usage.ru_maxrss * 1024, out, err


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def run_size(size: str, work: Path, threads: int, keep_files: bool, replacement: str | None = None,
             token_shape: tuple[int, int] | None = None) -> dict[str, object]:
    me = [sys.executable, str(Path(__file__).resolve())]
    directory = work / f"llama-{size}"
    shape = SHAPES[size]
    n, t = token_shape or shape["tokens"]
    tokens = work / f"llama-{size}-tokens-{n}x{t}.safetensors"
    out = work / f"llama-{size}-ffn50"
    if not (directory / "config.json").is_file():
        wall, rss, _, _ = _run_measured([*me, "_make", size, str(directory)])
        print(f"[{size}] wrote the bf16 checkpoint in {wall:.0f}s (peak RSS {rss / 2**30:.2f} GB)", file=sys.stderr)
    if not tokens.is_file():
        _run_measured([*me, "_tokens", str(shape["vocab_size"]), str(n), str(t), str(tokens)])
    plain_wall, plain_rss, plain_out, _ = _run_measured([*me, "_plain", str(directory), str(tokens), str(threads)])
    plain = json.loads(plain_out.strip().splitlines()[-1])["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cmrtool", "compile", str(directory), "--calib", str(tokens), "--kind", "neuron", "--keep", "0.5",
           "-o", f"{out}/", "--threads", str(threads), "--json", "--batch-size", str(max(1, 2048 // t))]
    if replacement:
        cmd += ["--replacement", replacement]
    wall, rss, doc_text, err = _run_measured(cmd)
    doc = json.loads(doc_text)
    experts = shape.get("num_experts", 0)
    width = shape["moe_intermediate_size"] if experts else shape["intermediate_size"]
    _, _, load_out, _ = _run_measured([*me, "_load", str(out), str(width // 2)])
    load = json.loads(load_out.strip().splitlines()[-1])
    h, f = shape["hidden_size"], shape["intermediate_size"]
    hd = shape.get("head_dim", h // shape["num_attention_heads"])
    q, kv = hd * shape["num_attention_heads"], hd * shape["num_key_value_heads"]
    ffn = 3 * h * (experts * width + shape["shared_expert_intermediate_size"]) + h * experts if experts else 3 * h * f
    layer_fp32 = 4 * (2 * h * q + 2 * h * kv + ffn + 2 * h)
    buffers = doc["engine"]["buffer_bytes"]
    row = {
        "size": size, "tokens": n * t, "sequences": n, "seq_len": t, "peak_rss_gb": rss / 2**30,
        "rss_over_block_plus_buffer": rss / (layer_fp32 + buffers), "largest_layer_fp32_gb": layer_fp32 / 2**30,
        "buffer_gb": buffers / 2**30, "wall_s": wall, "plain_forward_s": plain, "plain_forward_process_s": plain_wall,
        "plain_forward_peak_rss_gb": plain_rss / 2**30, "time_ratio": wall / plain, "fold_error": doc["fold_error"],
        "fold_error_relative": doc["fold_error_relative"], "dtype": doc["dtype"], "params_before": doc["params_before"],
        "params_after": doc["params_after"], "from_pretrained_ok": load["ok"], "loaded_shapes": load["shapes"],
        "engine_seconds": doc["engine"]["seconds"], "phases": doc["engine"].get("phases"), "fold_check": doc["engine"].get("fold_check"), "replacement": doc["replacement"],
        "plan_json_bytes": _bytes(out / "cmrtool_plan.json"), "plan_tensors_bytes": _bytes(out / "cmrtool_plan.safetensors"),
        "output_bytes": sum(_bytes(f) for f in out.iterdir()),
    }
    if not keep_files:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        tokens.unlink(missing_ok=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.path.insert(0, str(ROOT))
        cmd, *rest = sys.argv[1:]
        if cmd == "_make":
            _make(rest[0], Path(rest[1]))
        elif cmd == "_plain":
            _plain(Path(rest[0]), Path(rest[1]), int(rest[2]))
        elif cmd == "_tokens":
            _tokens(int(rest[0]), int(rest[1]), int(rest[2]), Path(rest[3]))
        elif cmd == "_load":
            _load(Path(rest[0]), int(rest[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="135m,1.2b")
    ap.add_argument("--work", default="/tmp/cmrtool-llm-scale")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-files", action="store_true", help="keep the checkpoints (they are reused by the next run)")
    ap.add_argument("--replacement", default=None, help="passed to compile, e.g. --replacement affine (default: compile's own)")
    ap.add_argument("--tokens", default=None, help="calibration sequences x tokens for every size, e.g. 16x128 (default: per size)")
    a = ap.parse_args()
    token_shape = tuple(int(v) for v in a.tokens.lower().split("x")) if a.tokens else None
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print("size   tokens  peak RSS   RSS÷(layer+buffer)  wall      wall÷forward  fold error (rel)  from_pretrained")
    for size in a.sizes.split(","):
        r = run_size(size.strip(), work, a.threads, a.keep_files, a.replacement, token_shape)  # type: ignore[arg-type]
        print(f"{r['size']:<6} {r['tokens']:>6}  {r['peak_rss_gb']:6.2f} GB  {r['rss_over_block_plus_buffer']:8.2f}           "
              f"{r['wall_s']:7.1f} s  {r['time_ratio']:8.2f}      {r['fold_error_relative']:.2e}         {r['from_pretrained_ok']}", flush=True)
        print(f"       layer fp32 {r['largest_layer_fp32_gb']:.2f} GB + buffers {r['buffer_gb']:.2f} GB; "
              f"fold check {r['fold_check']}", flush=True)
        print(f"       replacement {r['replacement']}: plan JSON {r['plan_json_bytes'] / 2**20:.2f} MB, plan tensors "
              f"{r['plan_tensors_bytes'] / 2**20:.1f} MB, output directory {r['output_bytes'] / 2**20:.0f} MB", flush=True)
        phases = dict(r["phases"] or {})
        phases["start-up, hashing, report"] = r["wall_s"] - sum(phases.values())
        print("       compile phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if v >= 0.05)
              + f"; plain forward {r['plain_forward_s']:.1f} s", flush=True)
        print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
