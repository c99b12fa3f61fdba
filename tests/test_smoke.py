import torch

from gptq_core import QuantLinear, quantize_rtn


def test_quantlinear_matches_dequantized_reference():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    packed = quantize_rtn(w, bits=4, group_size=32)
    layer = QuantLinear.from_packed(packed, act_dtype=torch.float32)
    x = torch.randn(2, 5, 96)
    ref = x.double() @ packed.dequantize(torch.float64)
    err = (layer(x).double() - ref).norm() / ref.norm()
    assert err < 1e-5
