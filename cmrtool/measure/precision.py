"""Where and in what precision the benchmark runs (DESIGN §3.7).

``--device auto`` picks the first CUDA device when torch sees one, else the CPU; asking for
``cuda`` without one is an error (a GPU figure measured on a CPU would mislead). fp16 means a
half-precision model *and* inputs. A CPU computes fp16 natively only with AVX512-FP16 or AMX-FP16
(x86) or the FP16 arithmetic extension (Arm); elsewhere torch emulates it, several times slower
than fp32, so the benchmark times fp32 instead and says so. bf16 runs on any CPU whose kernels
accept it; a model that fails in the requested precision is timed in fp32, with the reason noted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cmrtool.errors import CmrError, UsageError

__all__ = ["DTYPES", "Target", "resolve_device", "dtype_name", "resolve_dtype", "cpu_native"]

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
_CPU_FLAGS = {"fp16": ("avx512_fp16", "amx_fp16", "fphp", "asimdhp"), "bf16": ("avx512_bf16", "amx_bf16", "bf16")}


@dataclass(frozen=True)
class Target:
    """Where and in what precision the models run."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        """The device's name: the GPU's, or the CPU model from /proc/cpuinfo."""
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        import platform

        return platform.processor() or platform.machine()


def resolve_device(requested: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a device torch can use here."""
    text = requested.strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{requested}'", "choose auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise CmrError(
            f"--device {requested} was asked for, but torch {torch.__version__} sees no CUDA device",
            "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu (or auto)",
        )
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UsageError(f"no device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)", "use --device cuda:0")
    return torch.device("cuda", index)


def cpu_native(dtype: str) -> bool:
    """Whether this CPU has native arithmetic for ``fp16``/``bf16`` (read from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return any(f in flags for f in _CPU_FLAGS.get(dtype, ()))


def dtype_name(requested: str) -> str:
    """``fp16`` | ``bf16`` | ``fp32`` for a dtype name or alias (``half``, ``float32``, …)."""
    name = _ALIASES.get(requested.strip().lower(), requested.strip().lower())
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{requested}'", "choose fp16, bf16 or fp32")
    return name


def resolve_dtype(requested: str, device: torch.device) -> tuple[Target, list[str]]:
    """The precision to time in, and notes for every fallback from the requested one."""
    name = dtype_name(requested)
    notes: list[str] = []
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        notes.append(f"{torch.cuda.get_device_name(device)} has no bf16 support: timing in fp32")
        name = "fp32"
    elif device.type == "cpu" and name == "fp16" and not cpu_native("fp16"):
        cause = "CUDA is not available" if not torch.cuda.is_available() else "--device cpu was chosen"
        notes.append(
            f"{cause} and this CPU has no native fp16 arithmetic: timing in fp32 instead of fp16 "
            "(fp16 figures need a GPU)"
        )
        name = "fp32"
    return Target(device, DTYPES[name]), notes
