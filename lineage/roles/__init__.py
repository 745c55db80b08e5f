"""Roles of tensors: which stored tensor plays which part, across naming schemes.

The stage before everything else: names and shapes in, a :class:`RoleMap` out.

- :mod:`~lineage.roles.keys`: role keys (``L3.attn.q.weight`` …), their order and kind.
- :mod:`~lineage.roles.tables`: architecture knowledge as data, one table per family.
- :mod:`~lineage.roles.names`, :mod:`~lineage.roles.config`, :mod:`~lineage.roles.split`:
  reading names, configs and fused tensors with those tables.
- :mod:`~lineage.roles.assign` (:func:`assign_roles`) and :mod:`~lineage.roles.arch`: the role
  map and the architecture summary.
- :mod:`~lineage.roles.read`: a role's tensor in canonical orientation.
- :mod:`~lineage.roles.pair`: matching the roles of two models (unknown names by name and shape);
  :mod:`~lineage.roles.experts`: undoing a permutation of mixture-of-experts experts.

Supported schemes (with or without ``model.``/``transformer.``/``gpt_neox.``/``bert.``/
``language_model.`` prefixes): Llama/Mistral/Qwen2/Qwen3, Gemma 1-2-3, Phi-3 (fused
``qkv_proj``/``gate_up_proj``), Phi-2, GPT-2 (Conv1D), GPT-NeoX / Pythia (per-head
interleaved QKV), Falcon/BLOOM, BERT/RoBERTa, T5 (encoder-decoder, relative attention
bias), Whisper (encoder-decoder, conv front end), ViT, CLIP (two towers), Mixtral and
Qwen2/Qwen3-MoE (experts and router), and llama.cpp GGUF names (``blk.{i}.attn_q`` …).
"""

from lineage.roles.assign import assign_roles, roles_for
from lineage.roles.experts import ExpertMatch, align_experts
from lineage.roles.keys import (
    GLOBAL_STEMS,
    LAYER_STEMS,
    Role,
    generic_role,
    is_evidence_role,
    is_generic,
    parse_role,
    role_key,
    role_kind,
    role_sort_key,
)
from lineage.roles.model import ArchInfo, RoleMap, RoleView, StackSpan
from lineage.roles.pair import Pairing, RoleFinding, RolePair, pair_models
from lineage.roles.read import apply_view, iter_role_blocks, layer_dict, read_role

__all__ = [
    "GLOBAL_STEMS", "LAYER_STEMS", "ArchInfo", "ExpertMatch", "Pairing", "Role", "RoleFinding", "RoleMap", "RolePair",
    "RoleView", "StackSpan", "align_experts", "apply_view", "assign_roles", "generic_role", "is_evidence_role", "is_generic",
    "iter_role_blocks", "layer_dict", "pair_models", "parse_role", "read_role", "role_key", "role_kind",
    "role_sort_key", "roles_for",
]
