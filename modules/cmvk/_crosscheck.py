"""Generation mode's decision: grouping the panel's answers by agreement into a majority and
dissenters (:meth:`agent_os.cmvk.CMVK.cross_check`)."""

from __future__ import annotations

from agent_os.cmvk._agreement import Agreement
from agent_os.cmvk._results import Consensus, CrossCheckResult, ModelAnswer
from agent_os.cmvk._voting import Strategy, passes


def group_answers(
    answers: dict[str, ModelAnswer],
    answered: list[str],
    pairs: dict[str, Agreement],
    latency: float,
    *,
    strategy: Strategy,
    threshold: float,
    quorum: int,
) -> CrossCheckResult:
    """The result of a cross-check: the models' ``answers`` (``answered``: those with an
    answer), the agreement of each answered pair (``pairs``, keyed ``"a|b"``). The majority
    group is the model agreeing with the most weight, with those it agrees with (ties: the
    higher mean agreement score, then panel order); ``verified`` when its share of the weight
    passes the voting rule; without ``quorum`` answers nothing is verified."""
    weighted = strategy == "weighted"
    weight = {n: (answers[n].weight if weighted else 1.0) for n in answered}

    def pair(a: str, b: str) -> Agreement | None:
        return pairs.get(f"{a}|{b}") or pairs.get(f"{b}|{a}")

    abstained = [f"{n} ({a.abstention}: {a.reason})" for n, a in answers.items() if a.answer is None]
    tail = f"; abstained: {', '.join(abstained)}" if abstained else ""
    if len(answered) < quorum:
        return CrossCheckResult(
            verified=False,
            confidence=0.0,
            consensus="no_quorum",
            support=0.0,
            majority_answer=None,
            majority=[],
            dissenters=list(answered),
            reason=f"quorum not met: {len(answered)} of {len(answers)} models answered, "
            f"{quorum} needed{tail}",
            strategy=strategy,
            answers=answers,
            pairs=pairs,
            latency_s=latency,
        )
    best: tuple[float, float, int] | None = None
    group: list[str] = []
    center = answered[0]
    for i, n in enumerate(answered):
        members = [m for m in answered if m == n or ((p := pair(n, m)) is not None and p.agree)]
        scores = [p.score for m in members if m != n and (p := pair(n, m)) is not None]
        key = (sum(weight[m] for m in members), sum(scores) / len(scores) if scores else 1.0, -i)
        if best is None or key > best:
            best, group, center = key, members, n
    total = sum(weight.values())
    support = sum(weight[m] for m in group) / total
    verified = passes(strategy, threshold, support)
    inner = [p.score for i, a in enumerate(group) for b in group[i + 1 :] if (p := pair(a, b)) is not None]
    cohesion = sum(inner) / len(inner) if inner else 1.0
    dissenters = [n for n in answered if n not in group]
    consensus: Consensus = "unanimous" if not dissenters else ("majority" if support > 0.5 else "split")
    reason = (
        f"{len(group)} of {len(answered)} answering models agree ({strategy} support "
        f"{support:.2f}, threshold {threshold:.2f})"
    )
    if dissenters:
        reason += f"; dissenting: {', '.join(dissenters)}"
    return CrossCheckResult(
        verified=verified,
        confidence=support * cohesion if verified else (1 - support) * cohesion,
        consensus=consensus,
        support=support,
        majority_answer=answers[center].answer,
        majority=group,
        dissenters=dissenters,
        reason=reason + tail,
        strategy=strategy,
        answers=answers,
        pairs=pairs,
        latency_s=latency,
    )
