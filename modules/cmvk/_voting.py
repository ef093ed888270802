"""Voting: from the models' verdicts to one decision (quorum, support, the three strategies,
confidence and consensus). The rules: ``docs/verification.md``, "Voting".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent_os.cmvk._results import Consensus

Strategy = Literal["majority", "unanimous", "weighted"]
STRATEGIES: tuple[Strategy, ...] = ("majority", "unanimous", "weighted")


@dataclass(frozen=True, slots=True)
class Ballot:
    """One non-abstaining vote: for or against, its weight, the confidence reported."""

    model: str
    support: bool
    weight: float
    confidence: float


@dataclass(frozen=True, slots=True)
class Decision:
    verified: bool
    confidence: float
    consensus: Consensus
    support: float


def passes(strategy: Strategy, threshold: float, support: float) -> bool:
    """Whether a support share passes under a strategy (``docs/verification.md``, "Voting")."""
    if strategy == "unanimous":
        return support >= 1.0 - 1e-12
    if strategy == "majority":
        return support >= threshold and support > 0.5
    return support >= threshold


def decide(strategy: Strategy, threshold: float, quorum: int, ballots: list[Ballot]) -> Decision:
    """Combine the ballots of the models that answered."""
    if len(ballots) < quorum:
        return Decision(False, 0.0, "no_quorum", 0.0)
    weighted = strategy == "weighted"
    weight = {b.model: (b.weight if weighted else 1.0) for b in ballots}
    total = sum(weight.values())
    pro = [b for b in ballots if b.support]
    con = [b for b in ballots if not b.support]
    support = sum(weight[b.model] for b in pro) / total
    verified = passes(strategy, threshold, support)
    side = pro if verified else con
    side_weight = sum(weight[b.model] for b in side)
    mean_conf = sum(weight[b.model] * b.confidence for b in side) / side_weight if side_weight else 0.0
    confidence = (support if verified else 1.0 - support) * mean_conf
    if not pro or not con:
        consensus: Consensus = "unanimous"
    elif support > 0.5 or support < 0.5:
        consensus = "majority"
    else:
        consensus = "split"
    return Decision(verified, confidence, consensus, support)
