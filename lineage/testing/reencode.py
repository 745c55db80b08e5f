"""Re-encoded copies of model folders (bf16 casts, int8 re-uploads), as a re-upload script makes them.

Used by the tests and benchmarks that check what survives re-encoding (the adapter check, the
rounding check under a disguise).  Not part of the zoo's recipe: changing it does not rebuild the zoo.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

#: Encodings :func:`reencoded_folder` writes.
REENCODINGS = ("bf16", "int8-per-row")


def int8_round(v: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Symmetric int8 rounding of a 2-D tensor with one scale per row (``dim=1``) or per column (``dim=0``),
    returned dequantised in ``v``'s dtype."""
    w = v.double()
    s = w.abs().amax(dim, keepdim=True).clamp_min(1e-12) / 127.0
    return (torch.round(w / s).clamp(-127, 127) * s).to(v.dtype)


def reencoded_folder(src: str | Path, dst: str | Path, how: str) -> Path:
    """Copy the model folder ``src`` to ``dst`` with every safetensors file re-encoded ``how``.

    ``"bf16"`` casts every tensor to bfloat16; ``"int8-per-row"`` rounds every 2-D tensor to symmetric
    int8 with one scale per *stored* row (kept dequantised in its dtype), as a re-upload script working
    on the file would.  Config and tokenizer files are copied as they are.
    """
    if how not in REENCODINGS:
        raise ValueError(f"reencoded_folder: how must be one of {REENCODINGS}, got {how!r}")
    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        w = load_file(str(f))
        for k, v in w.items():
            if how == "bf16":
                w[k] = v.to(torch.bfloat16)
            elif v.dim() == 2:
                w[k] = int8_round(v)
        save_file(w, str(f))
    return dst
