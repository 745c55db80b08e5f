"""Natural-language training text available offline, obtained deterministically.

* ``reference``: the Python language reference and library topics bundled with
  CPython as ``pydoc_data.topics`` (about 0.5 MB of English prose and examples).
  Used for base training; its last 5 % is held out for evaluation.
* ``docstrings``: module, class and function docstrings parsed (not imported)
  from a fixed list of standard-library source files.  Used for continued
  pre-training and as "other data".

Nothing is downloaded and no third-party text is committed; the text depends
only on the Python version, which is part of the zoo's recipe hash.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import sysconfig
from pathlib import Path

import torch

from lineage.testing.bpe import BPETokenizer

log = logging.getLogger(__name__)

#: Standard-library modules whose docstrings make the second corpus (sorted).
DOCSTRING_MODULES = (
    "argparse", "asyncio/base_events", "asyncio/events", "asyncio/streams", "asyncio/tasks", "base64",
    "bisect", "calendar", "cmd", "codecs", "collections/__init__", "concurrent/futures/_base",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "_pydecimal",
    "difflib", "doctest", "email/message", "email/utils", "enum", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "http/client", "http/cookiejar", "http/server",
    "imaplib", "inspect", "ipaddress", "json/__init__", "json/decoder", "json/encoder", "locale",
    "logging/__init__", "logging/handlers", "mailbox", "mimetypes", "multiprocessing/pool", "netrc",
    "ntpath", "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "posixpath", "pprint", "pydoc", "queue", "random", "re/__init__", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3/__init__", "ssl", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle",
    "typing", "unittest/case", "unittest/mock", "urllib/parse", "urllib/request", "uuid", "warnings",
    "weakref", "webbrowser", "xml/dom/minidom", "xml/etree/ElementTree", "zipfile/__init__", "zipfile",
)


def reference_text() -> str:
    """The CPython language reference topics, joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, OSError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > 40:
                out.append(doc)
    return out


def docstring_text(max_chars: int = 600_000) -> str:
    """Docstrings of :data:`DOCSTRING_MODULES` (those present), up to ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for mod in DOCSTRING_MODULES:
        p = root / f"{mod}.py"
        if not p.is_file():
            continue
        for d in _docstrings(p):
            parts.append(d)
            total += len(d) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def text_fingerprint(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def split_holdout(text: str, frac: float = 0.05) -> tuple[str, str]:
    """(train, held-out) split at a paragraph boundary near ``1 - frac``."""
    cut = int(len(text) * (1 - frac))
    nl = text.find("\n\n", cut)
    cut = nl if nl > 0 else cut
    return text[:cut], text[cut:]


def encode(tok: BPETokenizer, text: str) -> torch.Tensor:
    """Token ids as a 1-D int64 tensor."""
    return torch.tensor(tok.encode(text), dtype=torch.int64)


def batches(ids: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """``n`` batches of random windows ``(n, batch, seq + 1)``, seeded."""
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq - 1, (n, batch), generator=g)
    offs = torch.arange(seq + 1)
    return ids[starts[..., None] + offs]


def eval_windows(ids: torch.Tensor, batch: int, seq: int, max_batches: int = 8) -> torch.Tensor:
    """Disjoint consecutive windows for evaluation ``(k, batch, seq + 1)``."""
    w = seq + 1
    n = min(max_batches * batch, ids.numel() // w)
    n -= n % batch
    return ids[: n * w].reshape(n // batch, batch, w)
