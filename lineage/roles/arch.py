"""The architecture summary of a role map (:class:`ArchInfo`), from config and shapes."""

from __future__ import annotations

from lineage.roles.config import Cfg
from lineage.roles.keys import Role, parse_role, role_kind
from lineage.roles.model import ArchInfo, RoleView
from lineage.roles.names import table_for

#: Layer numbers listed in the "layers without any role" note (the count is always given).
_MAX_LISTED = 20


def missing_layers(layers: set[int], n_layers: int) -> tuple[int, list[int]]:
    """How many of ``range(n_layers)`` have no role, and the first few of them.

    Walks the gaps between the stored layer numbers: cost follows the number of
    tensors, never a layer number read from a file.
    """
    listed: list[int] = []
    prev = -1
    for i in sorted(layers):
        j = prev + 1
        while j < i and len(listed) < _MAX_LISTED:
            listed.append(j)
            j += 1
        prev = i
    return n_layers - len(layers), listed


def _layer_count(cfg: Cfg, layers: set[int], stacked: bool, notes: list[str]) -> int:
    n_layers = max(layers) + 1 if layers else 0
    if cfg.n_layers is not None and cfg.n_layers != n_layers and not stacked:
        notes.append(f"config says {cfg.n_layers} layers, the weights have {n_layers}; using the weights")
    if layers and len(layers) != n_layers:
        count, listed = missing_layers(layers, n_layers)
        more = f" and {count - len(listed)} more" if count > len(listed) else ""
        notes.append(f"layers without any role: {listed}{more}")
    return n_layers


def _norm_and_positional(family: str, cfg: Cfg, roles: dict[Role, RoleView]) -> tuple[str, str]:
    """Norm kind and positional scheme: the family's traits, else what the roles show."""
    base = family.removeprefix("gguf-")
    table = table_for(base)
    norm_trait, pos_trait = table.traits if table is not None else (None, None)
    has_norm_bias = any(role_kind(r) == "norm" and r.endswith(".bias") for r in roles)
    has_norm = any(role_kind(r) == "norm" for r in roles)
    if norm_trait == "rms":
        norm = "rms"
    elif norm_trait == "layer" or has_norm_bias:
        norm = "layer"
    else:
        norm = "rms" if has_norm else "unknown"
    if "pos_embed.weight" in roles:
        positional = "learned"
    elif cfg.alibi or base == "bloom":
        positional = "alibi"
    elif pos_trait in ("rope", "relative"):
        positional = str(pos_trait)
    else:
        positional = "unknown"
    return norm, positional


def _tied(cfg: Cfg, roles: dict[Role, RoleView], notes: list[str]) -> bool:
    has_head = "lm_head.weight" in roles
    tied = (not has_head and "embed.weight" in roles) or (cfg.tied is True and has_head is False)
    if cfg.tied is True and has_head:
        notes.append("config ties embeddings but the checkpoint stores lm_head too; treated as tied copy")
        tied = True
    if not has_head and cfg.tied is False:
        notes.append("config says untied embeddings but no lm_head is stored")
    return tied


def _heads(cfg: Cfg, hidden: int | None, notes: list[str]) -> tuple[int | None, int | None, int | None]:
    n_heads, n_kv, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if n_heads is None:
        notes.append("head count unknown (no config): n_heads left None")
    if n_kv is None and n_heads is not None:
        n_kv = n_heads
    if head_dim is None and n_heads and hidden and hidden % n_heads == 0:
        head_dim = hidden // n_heads
    return n_heads, n_kv, head_dim


def build_arch(
    family: str, cfg: Cfg, roles: dict[Role, RoleView], hidden: int | None,
    from_config: bool, notes: list[str], stacked: bool = False,
) -> ArchInfo:
    """Summarise the architecture; ``notes`` receives what the config and the weights disagree on.

    ``stacked``: several layer stacks (encoder-decoder, two towers) share the layer numbers,
    so the config's per-stack layer count is not compared with the total.
    """
    layers = {i for i in (parse_role(r)[0] for r in roles) if i is not None}
    n_layers = _layer_count(cfg, layers, stacked, notes)

    def shape0(role: Role) -> int | None:
        v = roles.get(role)
        return v.shape[0] if v is not None and v.shape else None

    vocab_s = shape0("embed.weight") or shape0("lm_head.weight")
    inter_s = next((shape0(f"L{i}.mlp.{p}.weight") for i in sorted(layers)
                    for p in ("up", "gate") if shape0(f"L{i}.mlp.{p}.weight")), None)
    used_shapes = vocab_s is not None or inter_s is not None or hidden is not None
    norm, positional = _norm_and_positional(family, cfg, roles)
    mlp = "glu" if any(".mlp.gate." in r for r in roles) else ("plain" if any(".mlp.up." in r for r in roles) else "unknown")
    tied = _tied(cfg, roles, notes)
    n_heads, n_kv, head_dim = _heads(cfg, hidden, notes)
    source = "shapes" if not from_config else ("config+shapes" if used_shapes else "config")
    return ArchInfo(
        family=family, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, intermediate=inter_s or cfg.intermediate, vocab=vocab_s or cfg.vocab, norm=norm,
        mlp=mlp, positional=positional, tied_embeddings=tied, max_positions=cfg.max_positions,
        qkv_bias=any(r.endswith(".attn.q.bias") for r in roles), model_type=cfg.model_type,
        architectures=cfg.architectures, source=source, notes=tuple(notes),
    )
