"""Plans: per site, which units are kept, which are replaced, and by what.

A plan holds names and numbers only (never module objects), round-trips through JSON
byte-for-byte, and travels inside every reduced checkpoint (a TorchScript extra file). Same
inputs and seed give the same plan, byte for byte: floats are written with ``repr`` (shortest
round-tripping form) and keys in a fixed order.

Replacements (DESIGN §3.2–3.4):
- ``constant``: ``values[i]`` replaces unit ``replaced[i]``; folds as ``b' = b + W[:, S] c_S``
  (Proposition 1). For grouped units (attention heads, ``SitePlan.group`` > 1) each replaced
  unit takes ``group`` consecutive values: the head's mean output vector (appendix A.6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cmrtool import __version__
from cmrtool.errors import InputError

__all__ = ["PLAN_SCHEMA_VERSION", "Replacement", "SitePlan", "Plan"]

PLAN_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Replacement:
    """What the replaced units of a site become: one constant per replaced unit."""

    kind: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind != "constant":
            raise InputError(f"unknown replacement kind '{self.kind}'", "this cmrtool supports 'constant' replacements")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": list(self.values)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Replacement:
        return cls(kind=str(d["kind"]), values=tuple(float(v) for v in d["values"]))


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
        if sorted(self.kept + self.replaced) != list(range(self.width)):
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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            "kept": list(self.kept),
            "replaced": list(self.replaced),
            "replacement": self.replacement.to_json(),
            **({"group": self.group} if self.group != 1 else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SitePlan:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            width=int(d["width"]),
            kept=tuple(int(i) for i in d["kept"]),
            replaced=tuple(int(i) for i in d["replaced"]),
            replacement=Replacement.from_json(d["replacement"]),
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

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool_version": self.tool_version,
            "kind": "cmrtool-plan",
            "source_sha256": self.source_sha256,
            "criterion": self.criterion,
            "replacement": self.replacement,
            "seed": self.seed,
            "settings": dict(self.settings),
            "sites": [s.to_json() for s in self.sites],
        }

    def dumps(self) -> str:
        """Canonical JSON text (stable across runs for the same plan)."""
        return json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
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
                sites=tuple(SitePlan.from_json(s) for s in d["sites"]),
                replacement=str(d.get("replacement", "auto")),
                seed=int(d.get("seed", 0)),
                tool_version=str(d.get("tool_version", "")),
                schema_version=version,
                settings=tuple(sorted(dict(d.get("settings", {})).items())),
            )
        except InputError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"plan is malformed ({type(e).__name__}: {e})", "regenerate it with cmrtool compile") from e

    @classmethod
    def loads(cls, text: str | bytes) -> Plan:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"plan is not valid JSON: {e}", "regenerate it with cmrtool compile") from e
        if not isinstance(d, dict):
            raise InputError("plan is not a JSON object", "regenerate it with cmrtool compile")
        return cls.from_json(d)
