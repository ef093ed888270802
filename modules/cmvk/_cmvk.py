"""The CMVK: a panel of models, asked in parallel, combined by vote."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, get_args

from agent_os.amb import tracing as _tracing
from agent_os.amb.numbers import fraction, seconds, whole
from agent_os.cmvk._agreement import Agreement, AgreementMeasure, Embedder, cosine, embed
from agent_os.cmvk._calls import CallOutcome, CallPolicy, ModelSpec, call_model, check_params
from agent_os.cmvk._client import ensure_client
from agent_os.cmvk._crosscheck import group_answers
from agent_os.cmvk._errors import CMVKConfigError, VerdictParseError
from agent_os.cmvk._results import (
    CallStats,
    CrossCheckResult,
    ModelAnswer,
    ModelVote,
    VerificationResult,
)
from agent_os.cmvk._verdict import (
    answer_messages,
    judge_messages,
    parse_answer,
    parse_judgement,
    parse_verdict,
    verify_messages,
)
from agent_os.cmvk._voting import STRATEGIES, Ballot, Strategy, decide


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def _noted(agreement: Agreement, note: str) -> Agreement:
    return replace(agreement, reason=f"{agreement.reason} ({note})") if note else agreement


class CMVK:
    """Cross-Model Verification Kernel: several LLMs check an answer, by meaning, and fail closed.

    Example (``docs/api-reference.md``)::

        cmvk = CMVK(models=["gpt-4", "claude-3", "gemini-pro"], consensus_threshold=0.8,
                    voting_strategy="majority", timeout=30.0)
        result = await cmvk.verify(prompt="What is the capital of France?",
                                   response="Paris is the capital of France.",
                                   context={"domain": "geography"})
        result.verified, result.confidence, result["model_votes"], result["consensus"]

    Args:
        models: model names (litellm ids) or :class:`ModelSpec` objects; names must be unique.
        consensus_threshold: the weighted share of non-abstaining votes that must support the
            response, in (0, 1] (rules: ``docs/verification.md``, "Voting").
        voting_strategy: ``"majority"``, ``"unanimous"`` or ``"weighted"``.
        timeout: the total deadline of one ``verify``/``cross_check`` call, in seconds; no
            model call or retry runs past it.
        model_timeout: the per-attempt timeout of each model (default: ``timeout``; a
            :class:`ModelSpec` may set its own).
        retries: further attempts after a transient failure (timeout, connection error, 429,
            5xx), with exponential backoff starting at ``backoff`` seconds, with jitter.
        quorum: the least number of models that must answer (default: a majority of the panel).
        weights: per-model weights for ``weighted`` voting, overriding the specs' weights.
        agreement_threshold: the score at which two answers agree (generation mode and
            :meth:`agreement`).
        embedder: optional :class:`Embedder` (plain or async ``embed(texts)``) whose cosine
            similarity joins the agreement measure; if it fails, the measure goes on without it.
        judge: optional model that decides whether two *long* answers agree (short factual
            answers are compared canonically, unless their only evidence is numbers in
            unknown context: see :attr:`Agreement.settled`).
        api_base, api_key, litellm_params: defaults for every call (a spec's own win);
            ``litellm_params`` may not set what CMVK sets itself (``model``, ``messages``,
            ``timeout``, ``max_retries``, ``num_retries``, ``stream``).

    Raises CMVKConfigError for an empty panel, duplicate names, an unknown strategy, a
    threshold outside (0, 1], a timeout <= 0, negative retries, a quorum outside
    1..len(models), or a reserved key in ``litellm_params`` (the message names it).

    Guarantees: models are called in parallel; ``verify`` and ``cross_check`` return within
    ``timeout`` (plus scheduling noise) after the LLM client is loaded (once per process, before
    the deadline starts: see :meth:`warm`) and never raise for a model's failure: a timeout,
    provider error or unparsable reply is an abstention with its reason in the result, and
    abstentions are never counted as votes.
    """

    def __init__(
        self,
        models: Sequence[str | ModelSpec],
        consensus_threshold: float = 0.8,
        voting_strategy: Strategy = "majority",
        timeout: float = 30.0,
        *,
        model_timeout: float | None = None,
        retries: int = 1,
        backoff: float = 0.2,
        quorum: int | None = None,
        weights: Mapping[str, float] | None = None,
        agreement_threshold: float = 0.6,
        embedder: Embedder | None = None,
        judge: str | ModelSpec | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        litellm_params: Mapping[str, Any] | None = None,
    ) -> None:
        specs = [m if isinstance(m, ModelSpec) else ModelSpec(m) for m in models]
        if not specs:
            raise CMVKConfigError("CMVK needs at least one model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise CMVKConfigError(f"model names must be unique: {names}")
        if weights:
            unknown = set(weights) - set(names)
            if unknown:
                raise CMVKConfigError(f"weights for models not in the panel: {sorted(unknown)}")
            specs = [replace(s, weight=weights[s.name]) if s.name in weights else s for s in specs]
        if voting_strategy not in get_args(Strategy):
            raise CMVKConfigError(
                f"voting_strategy must be one of {', '.join(STRATEGIES)}, got {voting_strategy!r}"
            )
        threshold = fraction(consensus_threshold)  # a real number from 0 to 1, or None
        if threshold is None or threshold == 0.0:
            raise CMVKConfigError(f"consensus_threshold must be in (0, 1], got {consensus_threshold!r:.40}")
        timeout = seconds(timeout, "timeout", error=CMVKConfigError)
        if model_timeout is not None:
            model_timeout = seconds(model_timeout, "model_timeout", error=CMVKConfigError)
        retries = whole(retries, "retries", 0, error=CMVKConfigError)
        backoff = seconds(backoff, "backoff", zero=True, error=CMVKConfigError)
        self.quorum = (
            len(specs) // 2 + 1 if quorum is None else whole(quorum, "quorum", error=CMVKConfigError)
        )
        if not 1 <= self.quorum <= len(specs):
            raise CMVKConfigError(f"quorum must be between 1 and {len(specs)}, got {self.quorum}")
        self.models: tuple[ModelSpec, ...] = tuple(specs)
        self.consensus_threshold = threshold
        self.voting_strategy: Strategy = voting_strategy
        self.timeout = timeout
        self.policy = CallPolicy(model_timeout or timeout, retries, backoff)
        self.measure = AgreementMeasure(threshold=agreement_threshold)
        self.embedder = embedder
        self.judge = ModelSpec(judge) if isinstance(judge, str) else judge
        if litellm_params is not None:
            check_params(litellm_params, "litellm_params")
        defaults: dict[str, Any] = dict(litellm_params or {})
        if api_base is not None:
            defaults["api_base"] = api_base
        if api_key is not None:
            defaults["api_key"] = api_key
        self._defaults = defaults

    def __repr__(self) -> str:
        return (
            f"CMVK(models={[m.name for m in self.models]}, consensus_threshold={self.consensus_threshold}, "
            f"voting_strategy={self.voting_strategy!r}, timeout={self.timeout}, quorum={self.quorum})"
        )

    async def warm(self) -> None:
        """Load the LLM client (litellm) now, in a worker thread, instead of in the first call.

        Every call loads it before its deadline starts anyway, so the first call of a process
        answers like the second; ``warm`` moves that wait (seconds) to a moment of your choice,
        such as a service's start. Idempotent, once per process. Raises ImportError naming the
        ``cmvk`` extra when litellm is not installed."""
        await ensure_client()

    # -- verification --------------------------------------------------------------------------

    async def verify(
        self, prompt: Any, response: Any, context: dict[str, Any] | None = None
    ) -> VerificationResult:
        """Ask every model, in parallel, whether ``response`` correctly answers ``prompt``.

        Each model replies with a JSON verdict (schema: ``docs/verification.md``); the votes are
        combined by the voting strategy. A ``prompt`` or ``response`` that
        is not a string is serialized as JSON (``str()`` for what JSON cannot carry), so an
        agent's arguments and return value can be verified as they are (the kernel passes
        them so). Raises CMVKConfigError when ``context`` is not a dict, ImportError naming
        the ``cmvk`` extra when litellm is not installed; never raises for a model's failure.
        """
        if context is not None and not isinstance(context, dict):
            raise CMVKConfigError(f"context must be a dict or None, got {type(context).__name__}")
        text = _as_text(response)
        await self.warm()  # before the deadline starts: the import takes seconds
        attributes = {
            "agent_os.cmvk.models": len(self.models),
            "agent_os.cmvk.strategy": self.voting_strategy,
            "agent_os.cmvk.threshold": self.consensus_threshold,
        }
        with _tracing.span("cmvk.verify", attributes) as span:  # a child span per model call
            result = await self._verify(prompt, text, context)
            if span is not None:
                span.set_attributes(
                    _tracing.clean(
                        {
                            "agent_os.cmvk.verified": result.verified,
                            "agent_os.cmvk.confidence": result.confidence,
                            "agent_os.cmvk.consensus": str(result.consensus),
                            "agent_os.cmvk.support": result.support,
                        }
                    )
                )
            return result

    async def _verify(self, prompt: Any, text: str, context: dict[str, Any] | None) -> VerificationResult:
        start = time.monotonic()
        outcomes = await self._ask_all(verify_messages(_as_text(prompt), text, context), start + self.timeout)
        votes: dict[str, ModelVote] = {}
        ballots: list[Ballot] = []
        for spec, outcome in zip(self.models, outcomes, strict=True):
            vote = self._vote(spec, outcome)
            votes[spec.name] = vote
            if vote.verdict is not None and vote.confidence is not None:
                ballots.append(Ballot(spec.name, vote.verdict == "supported", spec.weight, vote.confidence))
        decision = decide(self.voting_strategy, self.consensus_threshold, self.quorum, ballots)
        return VerificationResult(
            verified=decision.verified,
            confidence=decision.confidence,
            consensus=decision.consensus,
            reason=self._verify_reason(decision.verified, decision.support, ballots, votes),
            support=decision.support,
            strategy=self.voting_strategy,
            model_votes=votes,
            latency_s=time.monotonic() - start,
        )

    async def _ask_all(self, messages: list[dict[str, str]], deadline: float) -> list[CallOutcome]:
        return list(
            await asyncio.gather(
                *(call_model(spec, messages, self.policy, deadline, self._defaults) for spec in self.models)
            )
        )

    @staticmethod
    def _vote(spec: ModelSpec, outcome: CallOutcome) -> ModelVote:
        stats = CallStats.of(outcome)
        if outcome.abstention is not None:
            return ModelVote(
                spec.name, spec.weight, None, None, outcome.error or "", outcome.abstention, stats
            )
        try:
            parsed = parse_verdict(outcome.content)
        except VerdictParseError as exc:
            return ModelVote(spec.name, spec.weight, None, None, str(exc), "parse_error", stats)
        return ModelVote(
            spec.name, spec.weight, parsed.verdict, parsed.confidence, parsed.reason, None, stats
        )

    def _verify_reason(
        self, verified: bool, support: float, ballots: list[Ballot], votes: dict[str, ModelVote]
    ) -> str:
        abstained = [f"{n} ({v.abstention}: {v.reason})" for n, v in votes.items() if v.abstained]
        tail = f"; abstained: {', '.join(abstained)}" if abstained else ""
        if len(ballots) < self.quorum:
            return (
                f"quorum not met: {len(ballots)} of {len(votes)} models answered, {self.quorum} needed{tail}"
            )
        pro = sum(b.support for b in ballots)
        head = (
            f"{pro} of {len(ballots)} answering models support the response "
            f"({self.voting_strategy} support {support:.2f}, threshold {self.consensus_threshold:.2f})"
        )
        if not verified:
            against = [
                f"{b.model} ({votes[b.model].verdict}: {votes[b.model].reason})"
                for b in ballots
                if not b.support
            ]
            head += f"; not supported by {', '.join(against)}"
        return head + tail

    # -- generation mode -----------------------------------------------------------------------

    async def agreement(self, answer_a: str, answer_b: str, question: str | None = None) -> Agreement:
        """Score whether two answers agree, without any LLM (``docs/verification.md``).

        Uses the configured embedder, if any (plain or async); when it fails, the measure
        decides without it and ``reason`` says so. Returns an :class:`Agreement` with ``score``
        in [0, 1] and ``agree`` at the configured ``agreement_threshold``. Raises
        CMVKConfigError for non-string answers."""
        if not isinstance(answer_a, str) or not isinstance(answer_b, str):
            raise CMVKConfigError("answers must be strings")
        vectors, note = await self._vectors([answer_a, answer_b])
        similarity = cosine(vectors[0], vectors[1]) if vectors else None
        return _noted(self.measure.measure(answer_a, answer_b, question, similarity=similarity), note)

    async def _vectors(self, texts: list[str]) -> tuple[list[list[float]] | None, str]:
        if self.embedder is None or not texts:
            return None, ""
        try:
            vectors = await embed(self.embedder, texts)
            if len({len(v) for v in vectors}) != 1:
                raise ValueError("vectors of different lengths")
        except Exception as exc:  # the measure works without embeddings: degrade, do not fail
            return None, f"embedder failed: {type(exc).__name__}: {exc}"
        return vectors, ""

    async def judge_agreement(self, answer_a: str, answer_b: str, question: str | None = None) -> Agreement:
        """:meth:`agreement`, with the configured judge deciding for long answers.

        Short factual answers are compared canonically (and identical texts agree without
        asking), unless the measure is not ``settled``: when their only evidence is matching
        numbers in unknown context ("100" / "100 km"), the judge is asked too. For those and
        for longer answers the judge's JSON reply (``{"agree", "confidence", "reason"}``)
        decides: ``agree`` is its decision and ``score`` is ``0.5 ± confidence / 2``.
        When no judge is configured, or it abstains (timeout, error, unparsable reply), the
        non-LLM measure decides and ``reason`` says so. Raises CMVKConfigError for non-string
        answers.
        """
        measured = await self.agreement(answer_a, answer_b, question)
        if self.judge is not None:
            await self.warm()  # before the deadline starts: the import takes seconds
        return await self._judged(measured, answer_a, answer_b, question, time.monotonic() + self.timeout)

    async def _judged(
        self, measured: Agreement, answer_a: str, answer_b: str, question: str | None, deadline: float
    ) -> Agreement:
        same_text = " ".join(answer_a.lower().split()) == " ".join(answer_b.lower().split())
        if self.judge is None or measured.settled or same_text:
            return measured
        messages = judge_messages(question, answer_a, answer_b)
        outcome = await call_model(self.judge, messages, self.policy, deadline, self._defaults)
        why = outcome.error or ""
        if outcome.abstention is None:
            try:
                j = parse_judgement(outcome.content)
            except VerdictParseError as exc:
                why = str(exc)
            else:
                score = 0.5 + 0.5 * j.confidence if j.agree else 0.5 - 0.5 * j.confidence
                return Agreement(score, j.agree, "judge", measured.conflicts, j.reason)
        return _noted(measured, f"judge abstained: {why}")

    async def cross_check(self, prompt: str, context: dict[str, Any] | None = None) -> CrossCheckResult:
        """Ask every model to answer ``prompt`` and measure whether the answers agree.

        Answers are embedded in one call (when an embedder is configured) and grouped by
        pairwise agreement (the non-LLM measure, plus the judge for long answers when
        configured, as in :meth:`judge_agreement`): the majority group is the model agreeing
        with the most weight, with those it agrees with. See :class:`CrossCheckResult`.
        Raises CMVKConfigError for a non-string prompt or non-dict context.
        """
        if not isinstance(prompt, str):
            raise CMVKConfigError(f"prompt must be a string, got {type(prompt).__name__}")
        if context is not None and not isinstance(context, dict):
            raise CMVKConfigError(f"context must be a dict or None, got {type(context).__name__}")
        await self.warm()  # before the deadline starts: the import takes seconds
        start = time.monotonic()
        deadline = start + self.timeout
        outcomes = await self._ask_all(answer_messages(prompt, context), deadline)
        answers: dict[str, ModelAnswer] = {}
        for spec, outcome in zip(self.models, outcomes, strict=True):
            stats = CallStats.of(outcome)
            if outcome.abstention is not None:
                answers[spec.name] = ModelAnswer(
                    spec.name, spec.weight, None, outcome.abstention, outcome.error or "", stats
                )
                continue
            try:
                text = parse_answer(outcome.content)
            except VerdictParseError as exc:
                answers[spec.name] = ModelAnswer(spec.name, spec.weight, None, "parse_error", str(exc), stats)
            else:
                answers[spec.name] = ModelAnswer(spec.name, spec.weight, text, None, "", stats)
        answered = [n for n, a in answers.items() if a.answer is not None]
        texts = {n: answers[n].answer or "" for n in answered}
        vectors, note = await self._vectors([texts[n] for n in answered])
        vec = dict(zip(answered, vectors, strict=True)) if vectors else {}
        keys = [(a, b) for i, a in enumerate(answered) for b in answered[i + 1 :]]
        measured = [
            _noted(
                self.measure.measure(
                    texts[a], texts[b], prompt, similarity=cosine(vec[a], vec[b]) if vec else None
                ),
                note,
            )
            for a, b in keys
        ]
        results = await asyncio.gather(
            *(
                self._judged(m, texts[a], texts[b], prompt, deadline)
                for m, (a, b) in zip(measured, keys, strict=True)
            )
        )
        pairs = {f"{a}|{b}": r for (a, b), r in zip(keys, results, strict=True)}
        return group_answers(
            answers,
            answered,
            pairs,
            time.monotonic() - start,
            strategy=self.voting_strategy,
            threshold=self.consensus_threshold,
            quorum=self.quorum,
        )
