"""Regenerate the bundled samples deterministically: ``python samples/generate.py``.

Trains three small classifiers on scikit-learn's bundled handwritten digits (1,797 8x8 images,
no download) and writes, next to this script:

- ``calib.safetensors`` (512 training images) and ``eval.safetensors`` (597 held-out images),
  each with ``input`` float32 ``(n, 1, 8, 8)`` scaled to [0, 1] and ``labels`` int64 ``(n,)``;
- for each model ``NAME`` in ``digits_mlp``, ``digits_convnet``, ``digits_transformer``:
  ``NAME.pt`` (``torch.jit.script``), ``NAME_traced.pt`` (``torch.jit.trace``) and
  ``NAME.safetensors`` (the state dict; architecture ``cmrtool.testing.models:NAME``);
- ``MANIFEST.json``: held-out accuracy, parameters and sha256 of every file.

and the sample language model (``tiny_lm.py``): ``tiny_lm/`` (a Hugging Face ``LlamaForCausalLM``
directory with its BPE tokenizer), ``tiny_lm_calib.safetensors`` and ``tiny_lm_eval.safetensors``
(``input_ids`` and ``attention_mask``), trained on text that ships with Python.

``--only digits`` or ``--only tiny_lm`` regenerates one group and keeps the other's manifest entries.
Everything is seeded and runs on one thread, so the same torch version gives the same weights (the
language model's corpus also depends on the Python version). Requires scikit-learn and transformers
(``pip install -e '.[samples]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cmrtool.testing.models import digits_convnet, digits_mlp, digits_transformer  # noqa: E402

SEED = 0
N_EVAL = 597
N_CALIB = 512
EPOCHS = {"digits_mlp": 60, "digits_convnet": 40, "digits_transformer": 80}
LR = {"digits_mlp": 1e-3, "digits_convnet": 2e-3, "digits_transformer": 2e-3}


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def split_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed shuffle of the digits into (x_train, y_train, x_eval, y_eval); eval is the first N_EVAL."""
    x, y = load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    x, y = x[perm], y[perm]
    return x[N_EVAL:], y[N_EVAL:], x[:N_EVAL], y[:N_EVAL]


def train(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = SEED) -> torch.nn.Module:
    """The training recipe of the samples; ``seed`` orders the batches (the samples use SEED)."""
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR[name], weight_decay=1e-4)
    steps = EPOCHS[name] * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR[name], total_steps=steps)
    model.train()
    for _ in range(EPOCHS[name]):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_digits() -> dict[str, dict]:
    """Write the digits token files and the three classifiers; returns their manifest entries."""
    torch.manual_seed(SEED)
    x_train, y_train, x_eval, y_eval = split_digits()
    save_file({"input": x_train[:N_CALIB].contiguous(), "labels": y_train[:N_CALIB].contiguous()}, str(HERE / "calib.safetensors"))
    save_file({"input": x_eval.contiguous(), "labels": y_eval.contiguous()}, str(HERE / "eval.safetensors"))

    manifest: dict[str, dict] = {}
    for name, factory in (("digits_mlp", digits_mlp), ("digits_convnet", digits_convnet), ("digits_transformer", digits_transformer)):
        torch.manual_seed(SEED)
        model = train(name, factory(), x_train, y_train)
        with torch.no_grad():
            acc = (model(x_eval).argmax(1) == y_eval).float().mean().item()
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, x_eval[:4])
        scripted.save(str(HERE / f"{name}.pt"))
        traced.save(str(HERE / f"{name}_traced.pt"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(HERE / f"{name}.safetensors"))
        manifest[name] = {
            "architecture": f"cmrtool.testing.models:{name}",
            "eval_accuracy": round(acc, 4),
            "params": sum(p.numel() for p in model.parameters()),
        }
        print(f"{name}: held-out accuracy {acc:.4f}")
    return manifest


def write_manifest(models: dict[str, dict]) -> None:
    """MANIFEST.json: the models' entries and the sha256 of every sample file (tiny_lm/ included)."""
    files = sorted(p.name for p in HERE.iterdir() if p.suffix in (".pt", ".safetensors"))
    lm_dir = HERE / "tiny_lm"
    if lm_dir.is_dir():
        files += sorted(f"tiny_lm/{p.name}" for p in lm_dir.iterdir() if p.is_file())
    out = {"models": models, "sha256": {f: sha256(HERE / f) for f in files}, "torch": torch.__version__}
    (HERE / "MANIFEST.json").write_text(json.dumps(out, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Regenerate the bundled samples deterministically.",
        epilog="example: python samples/generate.py --only tiny_lm",
    )
    parser.add_argument("--only", choices=("digits", "tiny_lm"),
                        help="regenerate one group (default: all); the other group's manifest entries are kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    manifest_path = HERE / "MANIFEST.json"
    models: dict[str, dict] = {}
    if args.only and manifest_path.exists():
        models = json.loads(manifest_path.read_text())["models"]
    if args.only in (None, "digits"):
        models.update(build_digits())
    if args.only in (None, "tiny_lm"):
        import tiny_lm  # needs transformers; the digits alone do not

        models["tiny_lm"] = tiny_lm.build(HERE)
    write_manifest(models)


if __name__ == "__main__":
    main()
