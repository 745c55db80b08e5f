"""One way to write a p-value, everywhere (text, HTML, JSON's ``p_text``).

``log10_p`` is the exact figure (it survives p-values far below what a float holds);
the written form is ``p = 0.906``, ``p = 3.2e-12``, or below :data:`FLOOR_LOG10`
``p < 1e-300 (log10 p = −620.0)``.
"""

from __future__ import annotations

import math

#: Below 10**FLOOR_LOG10 a p-value is written as a bound with its exact log10.
FLOOR_LOG10 = -300
_MINUS = "\u2212"


def p_float(log10_p: float | None) -> float | None:
    """The p-value as a JSON-safe float: None when unknown or below ``1e-300`` (read ``log10_p``)."""
    if log10_p is None or not math.isfinite(log10_p) or log10_p < FLOOR_LOG10:
        return None
    return min(1.0, 10.0 ** log10_p)


def format_p(log10_p: float | None) -> str:
    """``p = 0.906``, ``p = 3.2e-12`` or ``p < 1e-300 (log10 p = −620.0)``; ``p not computed`` when None."""
    if log10_p is None or (isinstance(log10_p, float) and math.isnan(log10_p)):
        return "p not computed"
    if log10_p == -math.inf or log10_p < FLOOR_LOG10:
        exact = "−∞" if log10_p == -math.inf else f"{log10_p:.1f}".replace("-", _MINUS)
        return f"p < 1e{FLOOR_LOG10} (log10 p = {exact})"
    p = min(1.0, 10.0 ** log10_p)
    if p >= 1e-3:
        return f"p = {p:.3g}"
    mant, exp = f"{p:.1e}".split("e")
    return f"p = {mant}e{int(exp)}"
