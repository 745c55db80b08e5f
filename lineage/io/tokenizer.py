"""Token strings from tokenizer files (tokenizer.json, vocab.json, vocab.txt), without `tokenizers`.

Files are read through :mod:`lineage.io.safejson` (size, depth and integer caps), and
token ids are bounded by the number of entries the file holds, so the id list costs
memory in proportion to the file, never to the numbers written in it.  An unreadable
or hostile tokenizer is logged and ignored (the weights are compared without it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lineage.errors import HeaderError, LineageError
from lineage.io.safejson import MAX_TOKENIZER_BYTES, load_json_file

log = logging.getLogger(__name__)

#: Ids may leave this many holes beyond the number of entries (added tokens above the vocabulary).
ID_SLACK = 1024


def _valid_id(i: Any) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def _place(pairs: list[tuple[str, Any]], n_entries: int, path: Path) -> list[str]:
    """Token strings by id from ``(token, id)`` pairs; ids beyond what the file can hold are an error."""
    ids = [i for _, i in pairs if _valid_id(i)]
    size = max(ids, default=-1) + 1
    if size > n_entries + ID_SLACK:
        raise HeaderError(f"token id {size - 1} is beyond what {n_entries} entries can number",
                          path=str(path))
    out = [""] * size
    for tok, i in pairs:
        if _valid_id(i):
            out[i] = str(tok)
    return out


def _from_tokenizer_json(path: Path) -> list[str] | None:
    data = load_json_file(path, "tokenizer.json", max_bytes=MAX_TOKENIZER_BYTES)
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        added = []
    extra = [(a.get("content"), a.get("id")) for a in added
             if isinstance(a, dict) and isinstance(a.get("content"), str)]
    if isinstance(vocab, dict):
        pairs = list(vocab.items())
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        pairs = [(v[0] if isinstance(v, list) and v else v, i) for i, v in enumerate(vocab)]
    else:
        return None
    return _place(pairs + extra, len(pairs) + len(extra), path)


def load_vocab(folder: str) -> list[str] | None:
    """Token strings indexed by id, or None when no readable tokenizer is found."""
    d = Path(folder)
    try:
        if (d / "tokenizer.json").is_file():
            return _from_tokenizer_json(d / "tokenizer.json")
        if (d / "vocab.json").is_file():
            mapping = load_json_file(d / "vocab.json", "vocab.json", max_bytes=MAX_TOKENIZER_BYTES)
            return _place(list(mapping.items()), len(mapping), d / "vocab.json")
        p = d / "vocab.txt"
        if p.is_file():
            if p.stat().st_size > MAX_TOKENIZER_BYTES:
                raise HeaderError(f"vocab.txt is over the {MAX_TOKENIZER_BYTES}-byte cap", path=str(p))
            return p.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError, LineageError) as e:
        log.warning("%s: ignoring unreadable tokenizer (%s)", folder, e)
    return None
