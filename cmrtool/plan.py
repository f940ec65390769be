"""Plans: per site, which units are kept, which are replaced, and by what.

A plan holds names and numbers only (never module objects), round-trips through JSON
byte-for-byte, and travels inside every reduced checkpoint (a TorchScript extra file). Same
inputs and seed give the same plan, byte for byte: floats are written with ``repr`` (shortest
round-tripping form) and keys in a fixed order.

Replacements (DESIGN §3.2–3.4):
- ``constant``: ``values[i]`` replaces unit ``replaced[i]``; folds as ``b' = b + W[:, S] c_S``
  (Proposition 1). For grouped units (attention heads, ``SitePlan.group`` > 1) each replaced
  unit takes ``group`` consecutive values: the head's mean output vector (appendix A.6).
- ``affine``: unit ``replaced[i]`` becomes ``values[i] + coefficients[i]·a[parents[i]]``; folds
  as ``W'[:, P] += W[:, j] βᵀ``, ``b' += W[:, j] β0`` (Theorem 1, affine case).
- ``affine`` with a **dense matrix** (every kept unit is a parent, :mod:`cmrtool.reduce.lsq`): the
  replaced units become ``values + B a_K`` with B of shape ``(|S|·group, |K|·group)``, stored as
  one block of little-endian float32 (base64 in JSON, ~5.3 bytes per coefficient), not as
  per-unit lists. The fit is float64; B is rounded to float32 once, when the plan is made, and
  the fold and the clamped original both read the stored values, so folding stays exact. Size:
  a plan holds |S|·|K| coefficients per site (a 135M LLaMA at keep 0.5: 17.7M, 71 MB of float32,
  94 MB in base64; a Llama-3-8B: 6.6 GB). So a plan with more than
  :data:`cmrtool.io.planstore.INLINE_MATRIX_BYTES` of matrices keeps them **out of its JSON**: each
  matrix becomes a tensor ``cmrtool.plan.<site>.matrix`` stored next to the plan
  (:mod:`cmrtool.io.planstore`), and the JSON holds a reference ``matrix_ref`` = {tensor, shape,
  dtype, sha256}; reading such a plan without its tensors, or with altered ones, is an error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cmrtool import __version__
from cmrtool.errors import InputError

__all__ = ["PLAN_SCHEMA_VERSION", "MATRIX_PREFIX", "Replacement", "SitePlan", "Plan", "matrix_tensor_name"]

PLAN_SCHEMA_VERSION = 1
MATRIX_PREFIX = "cmrtool.plan."  # tensors of a plan stored outside its JSON: cmrtool.plan.<site>.matrix
_SIDE_HINT = "a plan and its tensors are written together by cmrtool compile: copy them together, unaltered, or re-run compile"


def matrix_tensor_name(site: str) -> str:
    """The tensor name under which a site's dense affine matrix is stored outside the JSON."""
    return f"{MATRIX_PREFIX}{site}.matrix"


@dataclass(frozen=True)
class Replacement:
    """What the replaced units of a site become (aligned with ``SitePlan.replaced``).

    - ``constant``: replaced unit ``replaced[i]`` becomes ``values[i]``.
    - ``affine``: it becomes ``values[i] + Σ_k coefficients[i][k] · a[parents[i][k]]``, an affine
      function of kept units (``parents`` must be kept).
    """

    kind: str
    values: tuple[float, ...]
    parents: tuple[tuple[int, ...], ...] = ()
    coefficients: tuple[tuple[float, ...], ...] = ()
    matrix: bytes = field(default=b"", repr=False)  # dense B over all kept units: little-endian float32, row-major

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "affine"):
            raise InputError(f"unknown replacement kind '{self.kind}'", "replacements are 'constant' or 'affine'")
        if self.matrix:
            if self.kind != "affine" or self.parents or self.coefficients or len(self.matrix) % 4:
                raise InputError("a dense affine replacement has per-unit parents too, or a truncated matrix", "regenerate the plan with cmrtool compile")
            if not bool(self.dense(len(self.values)).isfinite().all()):
                raise InputError("a replacement value is NaN or infinite", "regenerate the plan from finite scores")
        elif self.kind == "affine" and not (len(self.parents) == len(self.coefficients) == len(self.values)):
            raise InputError("affine replacement: parents, coefficients and intercepts differ in length", "regenerate the plan with cmrtool compile")
        if any(len(p) != len(c) for p, c in zip(self.parents, self.coefficients)):
            raise InputError("affine replacement: a unit has a different number of parents and coefficients", "regenerate the plan with cmrtool compile")
        if not all(math.isfinite(v) for v in self.values) or not all(math.isfinite(c) for cs in self.coefficients for c in cs):
            raise InputError("a replacement value is NaN or infinite", "regenerate the plan from finite scores")

    @classmethod
    def dense_affine(cls, values: Any, coef: Any) -> Replacement:
        """A dense affine replacement from intercepts ``(rows,)`` and B ``(rows, cols)`` tensors."""
        import numpy as np
        import torch

        data = np.ascontiguousarray(coef.detach().to(torch.float32).cpu().numpy(), dtype="<f4").tobytes()
        return cls("affine", tuple(float(v) for v in values.tolist()), matrix=data)

    def dense(self, rows: int) -> Any:
        """B as a float64 tensor ``(rows, cols)`` (rows: the replaced values; cols follow)."""
        import numpy as np
        import torch

        flat = torch.from_numpy(np.frombuffer(self.matrix, dtype="<f4").astype(np.float64))
        if rows <= 0 or flat.numel() % rows:
            raise InputError("a dense affine replacement's matrix does not have one row per replaced value", "regenerate the plan with cmrtool compile")
        return flat.reshape(rows, flat.numel() // rows)

    def matrix_tensor(self, rows: int) -> Any:
        """B as stored: a read-only float32 view ``(rows, cols)`` of the plan's bytes (no copy;
        for writing it, never for writing into it)."""
        import torch

        with warnings.catch_warnings():  # bytes are immutable; the view is only ever read
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.matrix, dtype=torch.float32)
        return flat.reshape(rows, flat.numel() // rows)

    def to_json(self, matrix_ref: dict[str, Any] | None = None) -> dict[str, Any]:
        """The replacement as JSON; a dense matrix inline (base64), or as ``matrix_ref`` when given."""
        d: dict[str, Any] = {"kind": self.kind, "values": list(self.values)}
        if self.matrix and matrix_ref is not None:
            d["matrix_ref"] = matrix_ref
        elif self.matrix:
            d["matrix"] = base64.b64encode(self.matrix).decode("ascii")
            d["matrix_dtype"] = "float32"
        elif self.kind == "affine":
            d["parents"] = [list(p) for p in self.parents]
            d["coefficients"] = [list(c) for c in self.coefficients]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], side: Mapping[str, Any] | None = None, where: str = "") -> Replacement:
        """Read a replacement; a ``matrix_ref`` is resolved in ``side`` (tensors by name, found
        in ``where``) and must match its recorded shape, dtype and sha256."""
        if not isinstance(d, dict):
            raise TypeError(f"a replacement is a {type(d).__name__}, not an object")
        matrix = b""
        if d.get("matrix_ref") is not None:
            matrix = _resolve(d["matrix_ref"], side, where)
        elif d.get("matrix") is not None:
            if d.get("matrix_dtype", "float32") != "float32":
                raise InputError(f"unknown matrix dtype {d.get('matrix_dtype')!r} in an affine replacement", "upgrade cmrtool, or regenerate the plan")
            try:
                matrix = base64.b64decode(str(d["matrix"]), validate=True)
            except ValueError as e:
                raise InputError("an affine replacement's matrix is not valid base64", "regenerate the plan with cmrtool compile") from e
        return cls(
            kind=str(d["kind"]),
            values=tuple(float(v) for v in d["values"]),
            parents=tuple(tuple(int(i) for i in p) for p in d.get("parents", ())),
            coefficients=tuple(tuple(float(x) for x in c) for c in d.get("coefficients", ())),
            matrix=matrix,
        )


def _resolve(ref: dict[str, Any], side: Mapping[str, Any] | None, where: str) -> bytes:
    """The bytes of the side tensor ``ref`` names, checked against the reference."""
    import numpy as np
    import torch

    name, shape, digest = str(ref["tensor"]), [int(n) for n in ref["shape"]], str(ref["sha256"])
    if ref.get("dtype", "float32") != "float32":
        raise InputError(f"unknown matrix dtype {ref.get('dtype')!r} in an affine replacement", "upgrade cmrtool, or regenerate the plan")
    if side is None or name not in side:
        place = f"in {where or 'its side data'}, which " + ("does not hold it" if side is not None else "is missing")
        raise InputError(f"the plan keeps affine matrix {name} outside its JSON, {place}", _SIDE_HINT)
    t = side[name]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or list(t.shape) != shape:
        raise InputError(f"affine matrix {name} in {where} is not float32 of shape {shape}, as the plan records", _SIDE_HINT)
    data = np.ascontiguousarray(t.detach().cpu().numpy(), dtype="<f4").tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise InputError(f"affine matrix {name} in {where} was altered: its sha256 differs from the plan's record", _SIDE_HINT)
    return data


@dataclass(frozen=True)
class SitePlan:
    """The decision for one site. ``kept`` and ``replaced`` are sorted and partition range(width).

    ``group`` is the number of values per replaced unit (``head_dim`` for attention heads, whose
    replacement is a vector): ``replacement.values`` is then unit-major, ``group`` per unit.
    """

    name: str
    kind: str
    width: int
    kept: tuple[int, ...]
    replaced: tuple[int, ...]
    replacement: Replacement
    group: int = 1

    def __post_init__(self) -> None:
        # Lengths first: a corrupt width must not make us build a huge range.
        if len(self.kept) + len(self.replaced) != self.width or sorted(self.kept + self.replaced) != list(range(self.width)):
            raise InputError(
                f"plan for site {self.name} does not partition its {self.width} units into kept and replaced",
                "regenerate the plan with cmrtool compile",
            )
        if len(self.replacement.values) != len(self.replaced) * self.group:
            raise InputError(
                f"plan for site {self.name} has {len(self.replacement.values)} replacement values for {len(self.replaced)} replaced units"
                + (f" of {self.group} values each" if self.group != 1 else ""),
                "regenerate the plan with cmrtool compile",
            )
        if self.replacement.matrix and len(self.replacement.matrix) != 4 * len(self.replaced) * len(self.kept) * self.group * self.group:
            raise InputError(
                f"plan for site {self.name}: the affine matrix is not {len(self.replaced) * self.group}×{len(self.kept) * self.group}",
                "regenerate the plan with cmrtool compile",
            )
        kept = set(self.kept)
        if any(p not in kept for ps in self.replacement.parents for p in ps):
            raise InputError(f"plan for site {self.name}: an affine replacement reads a unit that is not kept", "regenerate the plan with cmrtool compile")

    def matrix_ref(self) -> dict[str, Any]:
        """The JSON reference to this site's matrix stored as tensor :func:`matrix_tensor_name`."""
        rows = len(self.replaced) * self.group
        return {"tensor": matrix_tensor_name(self.name), "shape": [rows, len(self.kept) * self.group], "dtype": "float32",
                "sha256": hashlib.sha256(self.replacement.matrix).hexdigest()}

    def to_json(self, external: bool = False) -> dict[str, Any]:
        ref = self.matrix_ref() if external and self.replacement.matrix else None
        return {
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            "kept": list(self.kept),
            "replaced": list(self.replaced),
            "replacement": self.replacement.to_json(ref),
            **({"group": self.group} if self.group != 1 else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], side: Mapping[str, Any] | None = None, where: str = "") -> SitePlan:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            width=int(d["width"]),
            kept=tuple(int(i) for i in d["kept"]),
            replaced=tuple(int(i) for i in d["replaced"]),
            replacement=Replacement.from_json(d["replacement"], side, where),
            group=int(d.get("group", 1)),
        )


@dataclass(frozen=True)
class Plan:
    """A whole reduction: settings that produced it and one :class:`SitePlan` per site."""

    source_sha256: str
    criterion: str
    sites: tuple[SitePlan, ...]
    replacement: str = "auto"
    seed: int = 0
    tool_version: str = __version__
    schema_version: int = PLAN_SCHEMA_VERSION
    settings: tuple[tuple[str, Any], ...] = field(default=())

    def site(self, name: str) -> SitePlan:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self, external: bool = False) -> dict[str, Any]:
        """The plan as JSON; with ``external`` dense matrices become references to side tensors
        (:meth:`matrices` gives them)."""
        return {
            "schema_version": self.schema_version,
            "tool_version": self.tool_version,
            "kind": "cmrtool-plan",
            "source_sha256": self.source_sha256,
            "criterion": self.criterion,
            "replacement": self.replacement,
            "seed": self.seed,
            "settings": dict(self.settings),
            "sites": [s.to_json(external) for s in self.sites],
        }

    def dumps(self, external: bool = False) -> str:
        """Canonical JSON text (stable across runs for the same plan); see :meth:`to_json`."""
        return json.dumps(self.to_json(external), indent=1, allow_nan=False) + "\n"

    def matrix_bytes(self) -> int:
        """Bytes of dense affine matrices in the plan (float32)."""
        return sum(len(s.replacement.matrix) for s in self.sites)

    def matrices(self) -> dict[str, Any]:
        """The dense matrices as float32 tensors by :func:`matrix_tensor_name` (views, no copies)."""
        return {matrix_tensor_name(s.name): s.replacement.matrix_tensor(len(s.replaced) * s.group) for s in self.sites if s.replacement.matrix}

    @classmethod
    def from_json(cls, d: dict[str, Any], side: Mapping[str, Any] | None = None, where: str = "") -> Plan:
        """Read a plan; ``side`` holds the tensors its ``matrix_ref`` entries name (found in ``where``)."""
        try:
            version = int(d["schema_version"])
            if version > PLAN_SCHEMA_VERSION:
                raise InputError(
                    f"plan schema version {version} is newer than this cmrtool understands ({PLAN_SCHEMA_VERSION})",
                    "upgrade cmrtool",
                )
            return cls(
                source_sha256=str(d["source_sha256"]),
                criterion=str(d["criterion"]),
                sites=tuple(SitePlan.from_json(s, side, where) for s in d["sites"]),
                replacement=str(d.get("replacement", "auto")),
                seed=int(d.get("seed", 0)),
                tool_version=str(d.get("tool_version", "")),
                schema_version=version,
                settings=tuple(sorted(dict(d.get("settings", {})).items())),
            )
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise InputError(f"plan is malformed ({type(e).__name__}: {e})", "regenerate it with cmrtool compile") from e

    @classmethod
    def loads(cls, text: str | bytes, side: Mapping[str, Any] | None = None, where: str = "") -> Plan:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InputError(f"plan is not valid JSON: {str(e)[:200]}", "regenerate it with cmrtool compile") from e
        if not isinstance(d, dict):
            raise InputError("plan is not a JSON object", "regenerate it with cmrtool compile")
        return cls.from_json(d, side, where)
