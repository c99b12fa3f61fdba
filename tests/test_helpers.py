"""The small helpers every module shares: which modules are linear, the default device, dtype
names."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D as TransformersConv1D

from gptq_core.device import DeviceInfo, default_device
from gptq_core.modules import is_conv1d, is_linear_like
from gptq_core.spec import LayerSpec, dtype_name


class Conv1D(nn.Module):
    """GPT-2's Conv1D as a remote-code model defines its own copy of it."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.zeros(nx, nf))


def test_linear_like_modules():
    assert is_linear_like(nn.Linear(4, 3)) and not is_conv1d(nn.Linear(4, 3))
    assert is_linear_like(TransformersConv1D(3, 4)) and is_conv1d(TransformersConv1D(3, 4))
    assert is_linear_like(Conv1D(3, 4)) and is_conv1d(Conv1D(3, 4))
    for other in (nn.Conv1d(4, 3, 1), nn.Embedding(8, 4), nn.LayerNorm(4), nn.Sequential()):
        assert not is_linear_like(other), type(other).__name__


def test_default_device_is_what_device_info_describes():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device() == torch.device(expected)
    assert DeviceInfo.of().type == DeviceInfo.of(default_device()).type == expected


def test_dtype_names():
    assert [dtype_name(d) for d in (torch.float16, torch.bfloat16, torch.float32)] == [
        "float16", "bfloat16", "float32"]
    spec = LayerSpec(bits=4, group_size=128, in_features=256, out_features=64,
                     act_dtype=torch.bfloat16)
    assert spec.describe() == "4-bit g128 sym, K=256 N=64, bfloat16, inference"
