"""Bit packing of the GPTQ format: hand-computed words, round trips, errors."""

from __future__ import annotations

import pytest
import torch

from gptq_core.errors import FormatError
from gptq_core.packing import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows


def u32(words: list[int]) -> torch.Tensor:
    """Unsigned 32-bit patterns as the int32 column the format stores."""
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def column(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)[:, None]


@pytest.mark.parametrize(
    ("bits", "values", "words"),
    [
        (4, [1, 2, 3, 4, 5, 6, 7, 8], [0x87654321]),
        (4, [0xF] * 8 + [0, 0, 0, 0, 0, 0, 0, 0xA], [0xFFFFFFFF, 0xA0000000]),
        (8, [0x11, 0x22, 0x33, 0x44, 0xFF], [0x44332211, 0x000000FF]),
        (2, [3, 0, 1, 2] * 4, [0x93939393]),  # byte 0b10_01_00_11
        # 3 bits: only the straddling values 10 and 21 are set. Value 10 = 0b101 sits in
        # stream bits 30..32: 0b01 at the top of word 0, 0b1 at the bottom of word 1.
        # Value 21 = 0b011 sits in bits 63..65: its low bit at the top of word 1, 0b01 in word 2.
        (3, [0] * 10 + [5] + [0] * 10 + [3] + [0] * 10, [0x40000000, 0x80000001, 0x00000001]),
        # 3 bits: values 0, 9, 11 and 31 = 7, each inside one word (bits 0-2, 27-29, 33-35, 93-95).
        (3, [7] + [0] * 8 + [7, 0, 7] + [0] * 19 + [7], [0x38000007, 0x0000000E, 0xE0000000]),
        # 3 bits, 3 repeated (the v1 symmetric zero): the stream 011 011 ... LSB first.
        (3, [3] * 32, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]),
    ],
)
def test_hand_computed_words(bits, values, words):
    packed = pack_rows(column(values), bits)
    assert packed.dtype == torch.int32
    assert packed[:, 0].tolist() == u32(words).tolist()
    assert unpack_rows(packed, bits, len(values))[:, 0].tolist() == values


def bit_stream_words(values: list[int], bits: int) -> list[int]:
    """Independent reference: one Python integer as the little-endian bit stream."""
    stream = sum(v << (j * bits) for j, v in enumerate(values))
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(packed_length(len(values), bits))]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 31, 32, 33, 64, 100, 172])
def test_round_trip_and_stream_reference(bits, count):
    g = torch.Generator().manual_seed(bits * 1000 + count)
    values = torch.randint(0, 2**bits, (count, 5), generator=g, dtype=torch.int32)
    original = values.clone()
    packed = pack_rows(values, bits)
    assert torch.equal(values, original), "pack_rows modified its input"
    assert packed.shape == (packed_length(count, bits), 5)
    for c in range(5):
        assert packed[:, c].tolist() == u32(bit_stream_words(values[:, c].tolist(), bits)).tolist()
    assert torch.equal(unpack_rows(packed, bits, count).to(torch.int32), values)
    # along columns (the qzeros layout)
    cols = pack_cols(values.t(), bits)
    assert torch.equal(cols, packed.t())
    assert torch.equal(unpack_cols(cols, bits, count).to(torch.int32), values.t())


def test_pack_accepts_any_integer_dtype_and_views():
    values = torch.arange(64, dtype=torch.int64).reshape(16, 4) % 16
    assert torch.equal(pack_rows(values, 4), pack_rows(values.to(torch.uint8), 4))
    strided = torch.arange(128, dtype=torch.int32).reshape(16, 8)[:, ::2] % 16
    assert torch.equal(pack_rows(strided, 4), pack_rows(strided.contiguous(), 4))


def test_empty_columns_pack():
    assert pack_rows(torch.zeros(33, 0, dtype=torch.int32), 3).shape == (4, 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pack_rows(column([16]), 4), r"\[0, 15\] for 4-bit, found \[16, 16\]"),
        (lambda: pack_rows(column([-1]), 8), r"\[0, 255\] for 8-bit, found \[-1, -1\]"),
        (lambda: pack_rows(torch.zeros(4, 2), 4), "integer tensor, got torch.float32"),
        (lambda: pack_rows(torch.zeros(4, dtype=torch.int32), 4), "2-D tensor"),
        (lambda: pack_rows(column([1]), 5), r"bits=5 is not a GPTQ bit width; use one of \[2, 3, 4, 8\]"),
        (lambda: unpack_rows(torch.zeros(3, 2, dtype=torch.int32), 3, 33), "need 4 packed rows, found 3"),
        (lambda: unpack_rows(torch.zeros(3, 2, dtype=torch.int64), 3, 32), "2-D int32 tensor"),
    ],
)
def test_errors_name_the_problem(call, message):
    with pytest.raises(FormatError, match=message):
        call()
