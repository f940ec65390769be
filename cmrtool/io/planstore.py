"""Where a plan travels in each output format: its JSON, and its large tensors beside it.

A plan's dense affine matrices (:mod:`cmrtool.reduce.lsq`, CMR appendix A.5: the replaced units become
``values + B a_K``) hold |S|·|K| float32 coefficients per site: 71 MB for a 135M LLaMA at FFN
keep 0.5, 6.6 GB for a Llama-3-8B. In base64 JSON that would break the 100 MB limit of a
safetensors header and make every plan reader parse gigabytes of text. So a plan whose matrices
exceed :data:`INLINE_MATRIX_BYTES` (1 MiB) is split (:func:`split`): the JSON keeps, per site, a
reference ``matrix_ref = {tensor, shape, dtype, sha256}``, and each matrix is stored as a
float32 tensor named ``cmrtool.plan.<site>.matrix``:

- Hugging Face directory: ``cmrtool_plan.safetensors`` next to ``cmrtool_plan.json``
  (``model.safetensors`` holds only weights, so stock ``from_pretrained`` loads the directory);
- single ``.safetensors``: extra tensors in the same file, skipped by :func:`load_reduced`
  (:func:`is_plan_tensor`);
- TorchScript: the extra file ``cmrtool/plan.safetensors`` (the tensors in safetensors bytes);
- ONNX: only the JSON, in ``metadata_props``; a large plan's matrices are there by reference
  (sha256), enough for ``verify --onnx`` to check the export against its checkpoint, which
  holds the matrices.

Smaller plans stay inline (base64), as before; plans written inline keep loading. A reference
whose tensor is missing, of another shape, or whose bytes do not hash to the recorded sha256 is
refused (:class:`~cmrtool.errors.InputError`), never folded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from cmrtool.errors import InputError
from cmrtool.plan import MATRIX_PREFIX, Plan

__all__ = [
    "INLINE_MATRIX_BYTES", "PLAN_JSON_FILE", "PLAN_TENSORS_FILE", "TS_TENSORS_FILE", "split", "is_plan_tensor", "SafetensorsTensors",
    "tensors_to_bytes", "tensors_from_bytes", "write_dir_plan", "read_dir_plan",
]

INLINE_MATRIX_BYTES = 1 << 20  # plans with more bytes of dense matrices than this store them as tensors
PLAN_TENSORS_FILE = "cmrtool_plan.safetensors"  # a Hugging Face directory's plan tensors, next to cmrtool_plan.json
TS_TENSORS_FILE = "cmrtool/plan.safetensors"  # a TorchScript archive's extra file with the plan tensors
PLAN_JSON_FILE = "cmrtool_plan.json"  # a Hugging Face directory's plan (cmrtool.backends.module.hf.PLAN_FILE)


def split(plan: Plan) -> tuple[str, dict[str, torch.Tensor]]:
    """The plan's JSON text and the tensors it refers to: ``(inline JSON, {})`` for a small plan,
    ``(JSON with references, {name: float32 matrix})`` when its matrices exceed
    :data:`INLINE_MATRIX_BYTES`. The tensors are read-only views of the plan's own bytes."""
    if plan.matrix_bytes() <= INLINE_MATRIX_BYTES:
        return plan.dumps(), {}
    return plan.dumps(external=True), plan.matrices()


def is_plan_tensor(name: str) -> bool:
    """A tensor of a plan stored beside the weights (never a weight)."""
    return name.startswith(MATRIX_PREFIX)


class SafetensorsTensors(Mapping[str, torch.Tensor]):
    """The plan tensors of a safetensors file, read one at a time on demand (a plan resolves its
    references through this, so at most one matrix is in memory twice)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = str(path)
        try:
            with safe_open(self.path, framework="pt") as f:
                self._names = [k for k in f.keys() if is_plan_tensor(k)]
        except Exception as e:  # safetensors raises its own types for bad files
            raise InputError(f"{path} is not a readable safetensors file ({_first_line(e)})",
                             "the plan's tensors are truncated or corrupt: re-run cmrtool compile") from e

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._names:
            raise KeyError(name)
        try:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise InputError(f"cannot read {name} from {self.path} ({_first_line(e)})", "the file is truncated or corrupt: re-run cmrtool compile") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Tensors as one safetensors blob (a TorchScript extra file)."""
    from safetensors.torch import save

    return save(dict(tensors))


def tensors_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob written by :func:`tensors_to_bytes`."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:
        raise InputError(f"{where} is not readable safetensors data ({_first_line(e)})", "the file is truncated or corrupt: re-run cmrtool compile") from e


def write_dir_plan(directory: str | Path, plan: Plan) -> str:
    """Write ``cmrtool_plan.json`` (and ``cmrtool_plan.safetensors`` when the plan is large)
    into a Hugging Face output directory; returns the JSON text (for the weights' metadata)."""
    from safetensors.torch import save_file

    text, side = split(plan)
    out = Path(directory)
    if side:
        save_file(side, str(out / PLAN_TENSORS_FILE))
    (out / PLAN_JSON_FILE).write_text(text)
    return text


def read_dir_plan(directory: str | Path) -> Plan | None:
    """The plan of a reduced Hugging Face directory (None when it has none), its references
    resolved in ``cmrtool_plan.safetensors``."""
    p = Path(directory)
    if not (p / PLAN_JSON_FILE).is_file():
        return None
    side_path = p / PLAN_TENSORS_FILE
    side = SafetensorsTensors(side_path) if side_path.is_file() else None
    return Plan.loads((p / PLAN_JSON_FILE).read_text(), side, str(side_path))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]
