"""A small byte-level BPE tokenizer: trainer, encoder and Hugging Face ``tokenizer.json``.

Tokens are strings over the printable "byte alphabet" used by GPT-2-style
tokenizers (every byte maps to one visible character), so token strings match
what ``tokenizers`` would write and the tool can pair vocabularies by string.

Ids: the special tokens first (``<|pad|>`` 0, ``<|bos|>`` 1, ``<|eos|>`` 2), then
the 256 byte symbols, then one token per merge in training order.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")

#: Pre-tokenisation: contractions, words with an optional leading space, digits,
#: punctuation runs, whitespace (ASCII classes; other bytes fall into punctuation).
_PRETOKEN = re.compile(r"'(?:s|t|d|m|ll|ve|re)| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def _byte_alphabet() -> list[str]:
    """Byte value -> one printable character (printable Latin-1 bytes map to
    themselves; the rest are shifted above 255 in order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_CHARS = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}


def to_byte_chars(text: str) -> str:
    return "".join(BYTE_CHARS[b] for b in text.encode("utf-8"))


def from_byte_chars(s: str) -> str:
    return bytes(_CHAR_TO_BYTE[c] for c in s).decode("utf-8", errors="replace")


def pretokenize(text: str) -> list[str]:
    """Split text into pre-tokens, each in the byte alphabet."""
    return [to_byte_chars(m) for m in _PRETOKEN.findall(text)]


@dataclass
class BPETokenizer:
    """Vocabulary (id -> token string) and ordered merges."""

    tokens: list[str]
    merges: list[tuple[str, str]]
    specials: tuple[str, ...] = SPECIALS
    _ids: dict[str, int] = field(default_factory=dict, repr=False)
    _ranks: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)
    _cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens):
            raise ValueError("duplicate token strings")
        self._ranks = {m: r for r, m in enumerate(self.merges)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def token_id(self, tok: str) -> int | None:
        return self._ids.get(tok)

    # ---------------------------------------------------------------- encode
    def _encode_word(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = -1, None
            for j in range(len(parts) - 1):
                r = self._ranks.get((parts[j], parts[j + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = j, r
            if best_rank is None:
                break
            a, b = self.merges[best_rank]
            merged, j = [], 0
            while j < len(parts):
                if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        ids = []
        for p in parts:
            i = self._ids.get(p)
            if i is None:  # a merge product removed from the vocabulary: fall back to bytes
                ids.extend(self._ids[c] for c in p if c in self._ids)
            else:
                ids.append(i)
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for w in pretokenize(text):
            out.extend(self._encode_word(w))
        return out

    def decode(self, ids: list[int]) -> str:
        s = "".join(self.tokens[i] for i in ids if self.tokens[i] not in self.specials)
        return from_byte_chars(s)

    # ---------------------------------------------------------------- derived vocabularies
    def extended(self, new_tokens: list[str]) -> BPETokenizer:
        """New tokens appended at the end (their ids follow the old ones)."""
        add = [t for t in new_tokens if t not in self._ids]
        return BPETokenizer(self.tokens + add, list(self.merges), self.specials)

    def subset(self, keep_ids: list[int]) -> BPETokenizer:
        """Only ``keep_ids`` (new id j = old id keep_ids[j]); merges whose pieces or
        product disappeared are dropped."""
        toks = [self.tokens[i] for i in keep_ids]
        have = set(toks)
        merges = [m for m in self.merges if m[0] in have and m[1] in have and m[0] + m[1] in have]
        return BPETokenizer(toks, merges, self.specials)

    def permuted(self, perm: list[int]) -> BPETokenizer:
        """Ids reordered: new id j = old id perm[j]."""
        return BPETokenizer([self.tokens[i] for i in perm], list(self.merges), self.specials)

    # ---------------------------------------------------------------- files
    def to_hf_json(self) -> dict:
        added = [
            {"id": self._ids[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s in self.specials if s in self._ids
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": {t: i for i, t in enumerate(self.tokens)},
                "merges": [f"{a} {b}" for a, b in self.merges],
            },
        }

    def save(self, folder: str | Path) -> None:
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text(json.dumps(self.to_hf_json(), ensure_ascii=False) + "\n", encoding="utf-8")
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[1], "eos_token": SPECIALS[2],
               "pad_token": SPECIALS[0], "model_max_length": 1024}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> BPETokenizer:
        data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        toks = [""] * len(vocab)
        for t, i in vocab.items():
            toks[i] = t
        merges = [tuple(m.split(" ", 1)) for m in data["model"]["merges"]]
        return cls(toks, merges)  # type: ignore[arg-type]


def train_bpe(text: str, vocab_size: int) -> BPETokenizer:
    """Learn ``vocab_size - 259`` merges from ``text`` (deterministic: ties are broken
    by the lexicographically smallest pair)."""
    n_merges = vocab_size - len(SPECIALS) - 256
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {len(SPECIALS) + 256}")
    counts = Counter(pretokenize(text))
    words = [list(w) for w in sorted(counts)]
    freq = [counts[w] for w in sorted(counts)]
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, sym in enumerate(words):
        for j in range(len(sym) - 1):
            p = (sym[j], sym[j + 1])
            pair_count[p] += freq[wi]
            where[p].add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and heap:
        negc, p = heapq.heappop(heap)
        if pair_count.get(p, 0) != -negc or -negc <= 0:
            continue  # stale entry
        merges.append(p)
        a, b = p
        changed: set[tuple[str, str]] = set()
        for wi in sorted(where.pop(p, ())):
            sym = words[wi]
            f = freq[wi]
            for j in range(len(sym) - 1):  # remove the word's old pairs
                q = (sym[j], sym[j + 1])
                pair_count[q] -= f
                changed.add(q)
            new, j = [], 0
            while j < len(sym):
                if j < len(sym) - 1 and sym[j] == a and sym[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(sym[j])
                    j += 1
            words[wi] = new
            for j in range(len(new) - 1):
                q = (new[j], new[j + 1])
                pair_count[q] += f
                where[q].add(wi)
                changed.add(q)
        pair_count.pop(p, None)
        for q in changed:
            c = pair_count.get(q, 0)
            if c > 0 and q != p:
                heapq.heappush(heap, (-c, q))
    tokens = list(SPECIALS) + BYTE_CHARS + [a + b for a, b in merges]
    # a merge product can equal an existing token only if produced twice; keep ids unique
    seen: set[str] = set()
    uniq = []
    for t in tokens:
        if t not in seen:
            uniq.append(t)
            seen.add(t)
    log.info("trained BPE: %d tokens, %d merges", len(uniq), len(merges))
    return BPETokenizer(uniq, merges)
