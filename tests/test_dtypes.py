"""The storage-format table: float facts agree with torch, GGUF block sizes with the gguf package."""

from __future__ import annotations

import pytest
import torch

from lineage.io.dtypes import DTYPES, FLOAT_FORMATS, GGUF_BLOCKS, bits_per_weight, unit_roundoff


@pytest.mark.parametrize("name", ["F64", "F32", "F16", "BF16"])
def test_float_facts_match_torch(name: str) -> None:
    d = DTYPES[name]
    fi = torch.finfo(d.torch_dtype)
    fmt = d.float_format
    assert fmt is not None and FLOAT_FORMATS[fmt.grid] is fmt
    assert 2.0 ** -fmt.mantissa_bits == fi.eps and 2.0 ** fmt.min_exponent == fi.tiny
    assert unit_roundoff(name.lower()) == fi.eps / 2 and bits_per_weight(name) == fi.bits


def test_gguf_blocks_match_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    sizes = {q.name: tuple(v) for q, v in gguf.GGML_QUANT_SIZES.items()}
    for name, block in GGUF_BLOCKS.items():
        assert sizes[name] == block, name
    assert bits_per_weight("q4_k") == 4.5 and bits_per_weight("Q8_0") == 8.5 and bits_per_weight("IQ2_XS") is None


def test_formats_without_float_facts() -> None:
    assert unit_roundoff("I8") == 0.0 and unit_roundoff("F8_E4M3") == 0.0 and unit_roundoff("nonsense") == 0.0
    assert bits_per_weight("I8") == 8.0 and bits_per_weight("BOOL") is None and bits_per_weight("nonsense") is None
