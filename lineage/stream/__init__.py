"""The streaming pass of a comparison and what it gathers per module.

:mod:`lineage.stream.moments` — centred pair moments of row blocks, merged exactly across blocks
(the anatomy's per-module statistics come from the same read as the element-wise comparison).
:mod:`lineage.stream.screen` — cheap per-module screening statistics (a random sketch of the delta,
row and column samples for lattice and float-grid screening, exact-equality counts) from which the
anatomy decides which modules deserve exact work.
"""

from lineage.stream.moments import BlockMoments, block_moments, block_moments_reference, merge_moments
from lineage.stream.screen import ModuleScreen, ScreenBuilder, ScreenConfig

__all__ = ["BlockMoments", "ModuleScreen", "ScreenBuilder", "ScreenConfig", "block_moments",
           "block_moments_reference", "merge_moments"]
