"""What a backend may ask about the device a layer runs on, in one small frozen record."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

#: Device kinds used as keys of backend priorities and capabilities.
DEVICE_KINDS = ("cpu", "cuda", "rocm", "hpu", "xpu", "mps")


def default_device() -> torch.device:
    """Where models load and compute when no device is named: the GPU torch sees, a Gaudi HPU
    (``torch.hpu`` exists once habana_frameworks.torch is imported), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    hpu = getattr(torch, "hpu", None)
    if hpu is not None and hpu.is_available():
        return torch.device("hpu")
    return torch.device("cpu")


@dataclass(frozen=True)
class DeviceInfo:
    """A device as the selector sees it.

    ``kind`` is what priorities are keyed by: "cuda" for NVIDIA, "rocm" for AMD (torch calls
    both "cuda"), "cpu", "hpu" (Gaudi), "xpu", "mps".
    """

    type: str
    index: int | None
    kind: str
    name: str
    compute_capability: tuple[int, int] | None = None
    is_hip: bool = False
    memory_bytes: int | None = None
    triton_interpret: bool = False

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    def describe(self) -> str:
        """A short label for messages: "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)"."""
        where = self.type if self.index is None else f"{self.type}:{self.index}"
        extra = self.name
        if self.compute_capability is not None:
            major, minor = self.compute_capability
            arch = f"gfx/{major}.{minor}" if self.is_hip else f"sm_{major}{minor}"
            extra = f"{extra}, {arch}"
        return f"{where} ({extra})"

    @classmethod
    def of(cls, device: torch.device | str | None = None) -> DeviceInfo:
        """Describe ``device`` (default: :func:`default_device`)."""
        device = default_device() if device is None else torch.device(device)
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            is_hip = torch.version.hip is not None
            return cls(
                type="cuda",
                index=index,
                kind="rocm" if is_hip else "cuda",
                name=props.name,
                compute_capability=(props.major, props.minor),
                is_hip=is_hip,
                memory_bytes=props.total_memory,
                triton_interpret=interpret,
            )
        if device.type == "cpu":
            return cls(type="cpu", index=None, kind="cpu", name="CPU", triton_interpret=interpret)
        return cls(
            type=device.type,
            index=device.index,
            kind=device.type,
            name=device.type.upper(),
            triton_interpret=interpret,
        )
