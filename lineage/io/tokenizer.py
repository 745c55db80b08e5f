"""Token strings from tokenizer files (tokenizer.json, vocab.json, vocab.txt), without `tokenizers`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _from_mapping(mapping: dict[str, int]) -> list[str]:
    size = max(mapping.values(), default=-1) + 1
    out = [""] * size
    for tok, i in mapping.items():
        if isinstance(i, int) and 0 <= i < size:
            out[i] = tok
    return out


def load_vocab(folder: str) -> list[str] | None:
    """Token strings indexed by id, or None when no readable tokenizer is found."""
    d = Path(folder)
    try:
        if (d / "tokenizer.json").is_file():
            data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
            model = data.get("model", {})
            vocab = model.get("vocab")
            toks: list[str]
            if isinstance(vocab, dict):
                toks = _from_mapping(vocab)
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                toks = [v[0] if isinstance(v, list) else str(v) for v in vocab]
            else:
                return None
            for added in data.get("added_tokens", []) or []:
                i, c = added.get("id"), added.get("content")
                if isinstance(i, int) and isinstance(c, str):
                    if i >= len(toks):
                        toks.extend([""] * (i + 1 - len(toks)))
                    toks[i] = c
            return toks
        if (d / "vocab.json").is_file():
            return _from_mapping(json.loads((d / "vocab.json").read_text(encoding="utf-8")))
        if (d / "vocab.txt").is_file():
            return (d / "vocab.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError, AttributeError) as e:
        log.warning("%s: ignoring unreadable tokenizer (%s)", folder, e)
    return None
