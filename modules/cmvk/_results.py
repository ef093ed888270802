"""The results of :meth:`CMVK.verify` and :meth:`CMVK.cross_check`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent_os.cmvk._agreement import Agreement
from agent_os.cmvk._calls import AbstentionKind, CallOutcome
from agent_os.cmvk._verdict import Verdict

Consensus = Literal["unanimous", "majority", "split", "no_quorum"]


@dataclass(frozen=True, slots=True)
class CallStats:
    """Latency, attempts, tokens and cost of one model's call (tokens and cost when litellm
    reports them, otherwise None)."""

    latency_s: float
    attempts: int
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None

    @classmethod
    def of(cls, outcome: CallOutcome) -> CallStats:
        return cls(
            outcome.latency_s,
            outcome.attempts,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.cost_usd,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_s": round(self.latency_s, 4),
            "attempts": self.attempts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd,
        }


@dataclass(frozen=True, slots=True)
class ModelVote:
    """One model's verdict on a response, or its abstention.

    ``vote`` is True for ``supported``, False for ``contradicted`` and ``unsure`` (an unsure
    model answered but does not vouch for the response), None when the model abstained
    (``abstention`` says why: ``timeout``, ``deadline``, ``provider_error``, ``parse_error``;
    ``reason`` has the details).
    """

    model: str
    weight: float
    verdict: Verdict | None
    confidence: float | None
    reason: str
    abstention: AbstentionKind | None
    stats: CallStats

    @property
    def vote(self) -> bool | None:
        if self.verdict is None:
            return None
        return self.verdict == "supported"

    @property
    def abstained(self) -> bool:
        return self.verdict is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vote": self.vote,
            "verdict": self.verdict,
            "confidence": self.confidence,
            "reason": self.reason,
            "abstention": self.abstention,
            "weight": self.weight,
            **self.stats.to_dict(),
        }


class _AsMapping(Mapping[str, Any]):
    """Mapping access to ``to_dict()``: ``result["verified"]`` as in ``docs/api-reference.md``."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _totals(stats: list[CallStats]) -> dict[str, Any]:
    def total(values: list[int | None] | list[float | None]) -> Any:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    return {
        "prompt_tokens": total([s.prompt_tokens for s in stats]),
        "completion_tokens": total([s.completion_tokens for s in stats]),
        "cost_usd": total([s.cost_usd for s in stats]),
    }


@dataclass(frozen=True, slots=True, eq=False)
class VerificationResult(_AsMapping):
    """The outcome of :meth:`CMVK.verify`.

    Attributes satisfy the kernel's verifier contract (``verified``, ``confidence``,
    ``reason``). ``model_votes`` maps each model name to its :class:`ModelVote`.
    ``to_dict()`` (and mapping access, ``result["verified"]``) gives the shape of
    ``docs/api-reference.md``: ``{"verified", "confidence", "model_votes": {name: True | False | None},
    "consensus"}`` plus ``reason``, ``support``, ``strategy``, ``latency_s``, token and cost
    totals, and ``details`` (each model's :meth:`ModelVote.to_dict`).
    """

    verified: bool
    confidence: float
    consensus: Consensus
    reason: str
    support: float  # weighted share of non-abstaining votes that are "supported"
    strategy: str
    model_votes: dict[str, ModelVote] = field(default_factory=dict)
    latency_s: float = 0.0

    @property
    def abstentions(self) -> dict[str, str]:
        """Models that abstained, with why."""
        return {n: f"{v.abstention}: {v.reason}" for n, v in self.model_votes.items() if v.abstained}

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "confidence": round(self.confidence, 4),
            "model_votes": {n: v.vote for n, v in self.model_votes.items()},
            "consensus": self.consensus,
            "reason": self.reason,
            "support": round(self.support, 4),
            "strategy": self.strategy,
            "latency_s": round(self.latency_s, 4),
            **_totals([v.stats for v in self.model_votes.values()]),
            "details": {n: v.to_dict() for n, v in self.model_votes.items()},
        }

    def __str__(self) -> str:
        return str({k: self.to_dict()[k] for k in ("verified", "confidence", "model_votes", "consensus")})


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """One model's answer in generation mode, or its abstention (``answer`` None)."""

    model: str
    weight: float
    answer: str | None
    abstention: AbstentionKind | None
    reason: str
    stats: CallStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "abstention": self.abstention,
            "reason": self.reason,
            "weight": self.weight,
            **self.stats.to_dict(),
        }


@dataclass(frozen=True, slots=True, eq=False)
class CrossCheckResult(_AsMapping):
    """The outcome of :meth:`CMVK.cross_check`.

    ``majority_answer`` is the answer of the largest (by weight) group of mutually agreeing
    models (its most central member's words), ``majority`` those models, ``dissenters`` the
    other models that answered. ``verified`` is True when a quorum answered and the majority
    group's weighted share meets the threshold under the voting strategy. ``pairs`` holds every
    pairwise :class:`Agreement` (key ``"a|b"``).
    """

    verified: bool
    confidence: float
    consensus: Consensus
    reason: str
    support: float
    strategy: str
    majority_answer: str | None
    majority: list[str]
    dissenters: list[str]
    answers: dict[str, ModelAnswer]
    pairs: dict[str, Agreement]
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "confidence": round(self.confidence, 4),
            "consensus": self.consensus,
            "majority_answer": self.majority_answer,
            "majority": list(self.majority),
            "dissenters": list(self.dissenters),
            "reason": self.reason,
            "support": round(self.support, 4),
            "strategy": self.strategy,
            "latency_s": round(self.latency_s, 4),
            **_totals([a.stats for a in self.answers.values()]),
            "answers": {n: a.to_dict() for n, a in self.answers.items()},
            "pairs": {k: p.to_dict() for k, p in self.pairs.items()},
        }
