"""The triton backend's AMD defaults compile for gfx90a and gfx942 through Triton's AMD
backend with no device present, lower to MFMA and fit 64 KiB of LDS."""

from __future__ import annotations

import pytest

from gptq_backends.triton_kernels import configs
from gptq_backend_rocm.triton_aot import CDNA_LDS_BYTES, CI_ARCHS, compile_qmm

FUSED = [cfg for _, cfg in configs.AMD_DEFAULT_RULES if cfg.path == "fused"]


def test_amd_rules_chosen_for_hip_only():
    assert configs.default_config(1, hip=True) == FUSED[0]
    assert configs.default_config(1, hip=False) == configs.DEFAULT_RULES[0][1]
    assert configs.default_config(4096, hip=True).path == "dequant"
    assert configs.default_config(256, 3, hip=True).path == "dequant"


@pytest.mark.parametrize("arch", CI_ARCHS)
@pytest.mark.parametrize("cfg", FUSED, ids=lambda c: c.label())
def test_default_tiles_compile_for_cdna(arch, cfg):
    out = compile_qmm(arch, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert out.hsaco_bytes > 0 and out.uses_mfma
    assert out.shared_bytes <= CDNA_LDS_BYTES
    assert f".amdgcn_target \"amdgcn-amd-amdhsa--{arch}" in out.amdgcn


@pytest.mark.parametrize("bits,act", [(3, "float16"), (2, "bfloat16"), (8, "float16")])
def test_other_widths_compile_for_gfx942(bits, act):
    cfg = FUSED[0]
    out = compile_qmm("gfx942", cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                      bits=bits, act=act, const_zero=False)
    assert out.hsaco_bytes > 0 and out.shared_bytes <= CDNA_LDS_BYTES
