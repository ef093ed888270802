"""Voting rules: strategies, thresholds, quorum, weights (cmvk._voting)."""

from __future__ import annotations

import pytest

from agent_os.cmvk._voting import Ballot, decide


def ballots(*votes: tuple[bool, float], confidence: float = 0.9) -> list[Ballot]:
    return [Ballot(f"m{i}", v, w, confidence) for i, (v, w) in enumerate(votes)]


def test_majority_needs_the_threshold_of_the_answering_models() -> None:
    two_of_three = ballots((True, 1), (True, 1), (False, 1))
    assert not decide("majority", 0.8, 2, two_of_three).verified  # 0.67 < 0.8
    d = decide("majority", 0.6, 2, two_of_three)
    assert d.verified
    assert d.consensus == "majority"
    assert d.support == pytest.approx(2 / 3)
    assert d.confidence == pytest.approx(2 / 3 * 0.9)


def test_majority_never_passes_on_half_even_with_a_low_threshold() -> None:
    d = decide("majority", 0.3, 2, ballots((True, 1), (False, 1)))
    assert not d.verified
    assert d.consensus == "split"


def test_unanimous_fails_on_one_dissent() -> None:
    assert decide("unanimous", 0.5, 1, ballots((True, 1), (True, 1))).verified
    d = decide("unanimous", 0.5, 1, ballots((True, 1), (True, 1), (False, 1)))
    assert not d.verified
    assert d.confidence == pytest.approx(1 / 3 * 0.9)


def test_weighted_uses_the_weights_and_majority_ignores_them() -> None:
    votes = ballots((True, 3.0), (False, 1.0), (False, 1.0))
    w = decide("weighted", 0.6, 2, votes)
    assert w.verified
    assert w.support == pytest.approx(0.6)
    assert not decide("majority", 0.6, 2, votes).verified


def test_below_quorum_nothing_is_verified() -> None:
    d = decide("majority", 0.5, 2, ballots((True, 1)))
    assert (d.verified, d.consensus, d.confidence) == (False, "no_quorum", 0.0)
    assert decide("majority", 0.5, 1, []).consensus == "no_quorum"


def test_all_against_is_a_unanimous_rejection() -> None:
    d = decide("majority", 0.8, 2, ballots((False, 1), (False, 1)))
    assert (d.verified, d.consensus, d.support) == (False, "unanimous", 0.0)
    assert d.confidence == pytest.approx(0.9)
