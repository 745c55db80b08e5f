"""``adapter_config.json`` of a PEFT LoRA adapter: read within caps, type-checked, patterns matched safely.

PEFT matches ``alpha_pattern`` / ``rank_pattern`` keys to a module path as regular
expressions, ``re.match(rf"(.*\\.)?({key})$", module)``.  Keys are usually plain
module names (``q_proj``, ``model.layers.3.mlp.up_proj``), which are matched here as
strings with the same meaning; a key that really is a regular expression is run only
when it cannot backtrack catastrophically (no nested or alternating repetition, no
back-references, few repeats, short names), and refused with a typed error otherwise.
"""

from __future__ import annotations

import math
import re
import re._constants as sre_c  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lineage.errors import HeaderError, UnsupportedFormatError
from lineage.io.safejson import load_json_file

CONFIG = "adapter_config.json"
#: Longest pattern key accepted.
MAX_PATTERN = 256
#: Most repetition operators a regular-expression key may hold.
MAX_REPEATS = 2
#: Longest module path a regular-expression key is run against.
MAX_MODULE = 512
#: Largest |lora_alpha| accepted (real adapters use a few to a few hundred).
MAX_ALPHA = 1e6
_REGEX_CHARS = set("[](){}*+?|^$\\")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that lineage uses, validated."""

    path: str
    raw: dict[str, Any]
    peft_type: str
    r: int | None
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    use_dora: bool
    base_model: str | None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def alpha_for(self, module: str) -> float:
        """``lora_alpha`` for ``module``, honouring ``alpha_pattern`` as PEFT does."""
        return pattern_value(self.alpha_pattern, module, self.lora_alpha, self.path)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flag(cfg: dict[str, Any], key: str, path: str) -> bool:
    v = cfg.get(key)
    if v is None or isinstance(v, bool):
        return bool(v)
    raise HeaderError(f"{CONFIG}: {key} must be true or false, found {v!r:.60}", path=path)


def _pattern_map(cfg: dict[str, Any], key: str, path: str, integer: bool) -> dict[str, Any]:
    v = cfg.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise HeaderError(f"{CONFIG}: {key} must be an object, found {type(v).__name__}", path=path)
    for k, val in v.items():
        ok = _number(val) and (not integer or (isinstance(val, int) and val > 0))
        if not ok or (not integer and abs(val) > MAX_ALPHA):
            raise HeaderError(f"{CONFIG}: {key}[{k[:60]!r}] must be a "
                              f"{'positive integer' if integer else 'finite number'}, found {val!r:.60}",
                              path=path)
        check_pattern_key(k, key, path)
    return dict(v)


def parse_adapter_config(folder: str | Path) -> AdapterConfig:
    """Read and validate ``folder/adapter_config.json`` (typed errors name the file)."""
    p = Path(folder) / CONFIG
    path = str(p)
    cfg = load_json_file(p, CONFIG)
    ptype = cfg.get("peft_type", "LORA")
    if not isinstance(ptype, str):
        raise HeaderError(f"{CONFIG}: peft_type must be a string, found {ptype!r:.60}", path=path)
    if ptype.upper() != "LORA":
        raise UnsupportedFormatError(f"PEFT type {ptype[:40]} (only LORA adapters are supported)",
                                     path=str(folder))
    r = cfg.get("r")
    if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise HeaderError(f"{CONFIG}: r must be a positive integer, found {r!r:.60}", path=path)
    alpha = cfg.get("lora_alpha", r if r is not None else 8)
    if not _number(alpha) or abs(alpha) > MAX_ALPHA:
        raise HeaderError(f"{CONFIG}: lora_alpha must be a finite number up to {MAX_ALPHA:g}, "
                          f"found {alpha!r:.60}", path=path)
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise HeaderError(f"{CONFIG}: base_model_name_or_path must be a string, found {base!r:.60}",
                          path=path)
    if isinstance(base, str) and ("\0" in base or len(base) > 4096):
        raise HeaderError(f"{CONFIG}: base_model_name_or_path is not a usable name: {base[:60]!r}",
                          path=path)
    return AdapterConfig(
        path=path, raw=cfg, peft_type=ptype.upper(), r=r, lora_alpha=float(alpha),
        use_rslora=_flag(cfg, "use_rslora", path), fan_in_fan_out=_flag(cfg, "fan_in_fan_out", path),
        use_dora=_flag(cfg, "use_dora", path), base_model=base or None,
        alpha_pattern={k: float(v) for k, v in _pattern_map(cfg, "alpha_pattern", path, False).items()},
        rank_pattern=_pattern_map(cfg, "rank_pattern", path, True),
    )


# ---------------------------------------------------------------------------- pattern keys


def _is_regex(key: str) -> bool:
    return any(c in _REGEX_CHARS for c in key)


def _repeats(items: Any, inside_repeat: bool) -> int:
    """Count repetition operators; raise ValueError on constructs that can backtrack exponentially."""
    n = 0
    for op, av in items:
        if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
            if inside_repeat:
                raise ValueError("nested repetition")
            n += 1 + _repeats(av[2], True)
        elif op is sre_c.BRANCH:
            if inside_repeat:
                raise ValueError("alternation inside a repetition")
            n += sum(_repeats(b, inside_repeat) for b in av[1])
        elif op is sre_c.SUBPATTERN:
            n += _repeats(av[3], inside_repeat)
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            n += _repeats(av[1], inside_repeat)
        elif op in (sre_c.GROUPREF, sre_c.GROUPREF_EXISTS):
            raise ValueError("back-reference")
    return n


def check_pattern_key(key: str, what: str, path: str) -> None:
    """Refuse a pattern key that is too long, not a regular expression, or could hang the matcher."""
    if not key or len(key) > MAX_PATTERN:
        raise HeaderError(f"{CONFIG}: {what} key of {len(key)} characters (1..{MAX_PATTERN})", path=path)
    if not _is_regex(key):
        return
    try:
        n = _repeats(sre_parse.parse(key), False)
    except (re.error, ValueError, RecursionError, OverflowError) as e:
        raise HeaderError(f"{CONFIG}: {what} key {key[:60]!r} is not a regular expression lineage "
                          f"will run ({e})", path=path) from None
    if n > MAX_REPEATS:
        raise HeaderError(f"{CONFIG}: {what} key {key[:60]!r} has {n} repetitions "
                          f"(at most {MAX_REPEATS} are run)", path=path)


def pattern_matches(key: str, module: str) -> bool:
    """PEFT's ``re.match(rf"(.*\\.)?({key})$", module)``, without its backtracking prefix."""
    if not _is_regex(key):
        return module == key or module.endswith("." + key)
    if len(module) > MAX_MODULE:
        return False
    starts = [0] + [i + 1 for i, c in enumerate(module) if c == "."]
    rx = re.compile(key)
    return any(rx.fullmatch(module, s) for s in starts)


def pattern_value(patterns: dict[str, Any], module: str, default: Any, path: str) -> Any:
    """The value of the first key of ``patterns`` that matches ``module``, else ``default``."""
    for key, val in patterns.items():
        if pattern_matches(key, module):
            return val
    return default
