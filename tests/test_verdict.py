"""The provisional verdict: derived pairs come out derived, independent ones not; p-values never underflow."""

from __future__ import annotations

import random

from lineage.verdict import MatrixEvidence, combined_log10_p, decide, fisher_z


def _ev(r: float, identical: bool = False, rel: float | None = 0.3) -> MatrixEvidence:
    return MatrixEvidence("L0.attn.q.weight", 512, 512, r, rel, identical)


def test_strong_correlation_is_derived_with_tiny_p() -> None:
    v = decide([_ev(0.95) for _ in range(20)])
    assert v.derived is True and v.relation == "derived"
    assert v.log10_p is not None and v.log10_p < -300  # far below float range, still finite
    assert v.p_value == 0.0


def test_null_correlations_are_unrelated() -> None:
    rng = random.Random(0)
    v = decide([_ev(rng.gauss(0, 1 / 512**0.5)) for _ in range(30)])
    assert v.derived is False and v.relation == "unrelated" and v.p_value > 0.01


def test_identical_and_copy() -> None:
    assert decide([_ev(1.0, True, 0.0)] * 3).relation == "identical"
    assert decide([_ev(0.99999, False, 1e-3)] * 3).relation == "re-encoded copy"


def test_nothing_to_compare() -> None:
    v = decide([])
    assert v.derived is None and v.p_value is None and "nothing" in v.summary.lower()


def test_null_is_calibrated_on_simulated_independent_matrices() -> None:
    # Under H0 with m independent units the combined p-value is ~uniform: check the rejection rate.
    rng = random.Random(1)
    rejections = 0
    trials = 400
    for _ in range(trials):
        ev = [_ev(rng.gauss(0, 1 / (512 - 3) ** 0.5)) for _ in range(10)]
        rejections += decide(ev).p_value < 0.05
    assert 0.02 < rejections / trials < 0.09


def test_helpers() -> None:
    assert fisher_z(0.0, 100) == 0.0
    assert combined_log10_p([]) == 0.0
    assert combined_log10_p([40.0]) < -300


def test_log10_norm_sf_matches_scipy_across_the_tail() -> None:
    from scipy import special

    from lineage.verdict import log10_norm_sf

    for z in (-5.0, 0.0, 1.0, 3.0, 10.0, 29.9, 30.0, 31.0, 60.0, 500.0):
        ref = float(special.log_ndtr(-z)) / 2.302585092994046
        assert abs(log10_norm_sf(z) - ref) < 1e-8 * max(1.0, abs(ref)), z


def test_with_merge_needs_a_derived_pair_an_explaining_fit_and_two_weighted_parents() -> None:
    from lineage.verdict import Verdict, with_merge

    derived = Verdict(True, "fine-tune", 0.0, -400.0, "Lineage found.", "H0", "canonical+elementwise", {})
    fit = {"method": "linear", "weights": [0.3, 0.7], "t": None, "explains": True}
    assert with_merge(derived, fit).relation == "merge"
    assert "0.300, 0.700" in with_merge(derived, fit).summary
    slerp = with_merge(derived, {**fit, "method": "slerp", "t": 0.4})
    assert slerp.relation == "merge" and "t = 0.400" in slerp.summary
    assert with_merge(derived, {**fit, "explains": False}).relation == "fine-tune"
    assert with_merge(derived, {**fit, "weights": [1.0, 0.01]}).relation == "fine-tune"
    unrelated = Verdict(False, "unrelated", 0.5, -0.3, "No lineage.", "H0", "canonical+elementwise", {})
    assert with_merge(unrelated, fit).relation == "unrelated"
    disguised = Verdict(True, "fine-tune (disguised)", 0.0, -400.0, "x", "H0", "canonical+elementwise", {})
    assert with_merge(disguised, fit).relation == "merge (disguised)"
