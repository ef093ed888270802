"""Calling one model through litellm: per-attempt timeout, retries of transient failures with
backoff and jitter, never past the call's deadline; litellm's own retries off, so the attempts
counted are the requests made. The rules: ``docs/verification.md``, "Calls, deadlines and
retries".
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

from agent_os.amb import tracing as _tracing
from agent_os.amb.numbers import seconds
from agent_os.cmvk._client import load_client
from agent_os.cmvk._errors import CMVKConfigError

AbstentionKind = Literal["timeout", "deadline", "provider_error", "parse_error"]
_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})

RESERVED_PARAMS: Mapping[str, str] = {
    "model": "set ModelSpec(model=...)",
    "messages": "CMVK builds the messages from the prompt",
    "timeout": "set CMVK(timeout=..., model_timeout=...) or ModelSpec(timeout=...)",
    "max_retries": "CMVK retries itself: set CMVK(retries=...)",
    "num_retries": "CMVK retries itself: set CMVK(retries=...)",
    "stream": "CMVK needs whole replies to parse",
}
"""Keyword arguments of ``litellm.acompletion`` that CMVK sets itself, with what to use instead.

Passing one of them in ``params``/``litellm_params`` would make every call fail with "got
multiple values for keyword argument" (an abstention of every model), or, for ``stream``,
an unparsable reply; so they are refused when the spec or the CMVK is built."""


def check_params(params: Mapping[str, Any], owner: str) -> None:
    """Refuse litellm keyword arguments CMVK cannot pass through (see :data:`RESERVED_PARAMS`).

    Raises CMVKConfigError naming the key for a reserved key, a non-string key or a
    ``params`` that is not a mapping."""
    if not isinstance(params, Mapping):
        raise CMVKConfigError(
            f"{owner} must be a mapping of litellm keyword arguments, got {type(params).__name__}"
        )
    for key in params:
        if not isinstance(key, str):
            raise CMVKConfigError(f"{owner}: litellm keyword arguments need string names, got {key!r}")
        if key in RESERVED_PARAMS:
            raise CMVKConfigError(
                f"{owner} may not set {key!r}: CMVK sets it itself ({RESERVED_PARAMS[key]})"
            )


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of a CMVK panel.

    Args:
        name: the label used in results (``model_votes`` keys).
        model: the litellm model id (``"openai/gpt-4o"``, ``"anthropic/claude-3-5-sonnet"``);
            defaults to ``name``.
        weight: the model's weight in ``weighted`` voting (e.g. its past accuracy); > 0.
        api_base, api_key: passed to litellm (the key is kept out of ``repr``).
        timeout: this model's per-attempt timeout; defaults to the CMVK's ``model_timeout``.
        params: further keyword arguments for ``litellm.acompletion`` (``temperature``,
            ``response_format``, ``mock_response`` in tests, ...); not the ones CMVK sets
            itself (``model``, ``messages``, ``timeout``, ``max_retries``, ``num_retries``,
            ``stream``).

    Raises CMVKConfigError for an empty name, a weight <= 0, a timeout <= 0, or ``params``
    with a reserved key (the message names it).
    """

    name: str
    _: KW_ONLY
    model: str | None = None
    weight: float = 1.0
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise CMVKConfigError("a model needs a non-empty name")
        # A weight is at most 10**6: support sums weights, and infinities make it NaN (a
        # unanimous panel then came back unverified).
        seconds(self.weight, f"weight of {self.name!r}", most=1e6, error=CMVKConfigError, unit="units")
        if self.timeout is not None:
            seconds(self.timeout, f"timeout of {self.name!r}", error=CMVKConfigError)
        check_params(self.params, f"params of {self.name!r}")

    @property
    def litellm_model(self) -> str:
        return self.model or self.name


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """Timeouts and retries for the calls of one CMVK (``docs/verification.md``)."""

    model_timeout: float
    retries: int
    backoff: float
    backoff_max: float = 2.0


@dataclass(slots=True)
class CallOutcome:
    """What one model call produced: its text, or why it produced none."""

    content: str | None = None
    abstention: AbstentionKind | None = None
    error: str | None = None
    latency_s: float = 0.0
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None


def transient(exc: BaseException) -> bool:
    """Whether a provider error is worth another attempt."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and (status in _TRANSIENT_STATUS or status >= 500):
        return True
    litellm = sys.modules.get("litellm")
    if litellm is not None:
        kinds = tuple(
            getattr(litellm, n)
            for n in (
                "Timeout",
                "APIConnectionError",
                "ServiceUnavailableError",
                "InternalServerError",
                "RateLimitError",
                "BadGatewayError",
            )
            if hasattr(litellm, n)
        )
        if isinstance(exc, kinds):
            return True
    return isinstance(exc, ConnectionError | TimeoutError)


def _usage(response: Any, outcome: CallOutcome) -> None:
    usage = getattr(response, "usage", None)
    if usage is not None:
        pt, ct = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
        outcome.prompt_tokens = pt if isinstance(pt, int) else None
        outcome.completion_tokens = ct if isinstance(ct, int) else None
    hidden = getattr(response, "_hidden_params", None)
    cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        outcome.cost_usd = float(cost)


def _content(response: Any) -> str | None:
    try:
        content = response.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def chat_attributes(model: str, **more: Any) -> dict[str, Any]:
    """The attributes of a model call's span ``chat <model>`` (OpenTelemetry's gen-ai
    conventions: operation ``chat``, the litellm model id), with ``more``."""
    return {"gen_ai.operation.name": "chat", "gen_ai.request.model": model, **more}


async def call_model(
    spec: ModelSpec,
    messages: list[dict[str, str]],
    policy: CallPolicy,
    deadline: float,
    defaults: Mapping[str, Any],
) -> CallOutcome:
    """Ask one model; never raises except CancelledError (and ImportError when litellm is not
    installed: the caller loads it first, with :func:`agent_os.cmvk._client.ensure_client`).

    ``deadline`` is a ``time.monotonic()`` instant no attempt may run past. ``defaults`` are
    keyword arguments for every call (the spec's own settings win). Returns the reply text, or
    an abstention (``timeout``, ``deadline`` or ``provider_error``) with its reason. While
    tracing is on the call is the span ``chat <model>``: its attempts, tokens, cost and
    abstention; an abstention ends it with status ERROR.
    """
    attributes = chat_attributes(spec.litellm_model, **{"agent_os.cmvk.model": spec.name})
    with _tracing.span(f"chat {spec.litellm_model}", attributes, kind="client") as span:
        outcome = await _call(spec, messages, policy, deadline, defaults)
        if span is not None:
            span.set_attributes(
                _tracing.clean(
                    {
                        "agent_os.cmvk.attempts": outcome.attempts,
                        "gen_ai.usage.input_tokens": outcome.prompt_tokens,
                        "gen_ai.usage.output_tokens": outcome.completion_tokens,
                        "agent_os.cmvk.cost_usd": outcome.cost_usd,
                        "agent_os.cmvk.abstention": outcome.abstention,
                    }
                )
            )
            if outcome.abstention is not None:
                _tracing.set_error(span, f"{outcome.abstention}: {outcome.error or ''}")
        return outcome


async def _call(
    spec: ModelSpec,
    messages: list[dict[str, str]],
    policy: CallPolicy,
    deadline: float,
    defaults: Mapping[str, Any],
) -> CallOutcome:
    litellm = load_client()  # loaded before the deadline started: returns at once
    kwargs: dict[str, Any] = dict(defaults)
    if spec.api_base is not None:
        kwargs["api_base"] = spec.api_base
    if spec.api_key is not None:
        kwargs["api_key"] = spec.api_key
    kwargs.update(spec.params)
    model_timeout = spec.timeout or policy.model_timeout
    outcome = CallOutcome()
    start = time.monotonic()
    last: tuple[AbstentionKind, str] = ("deadline", "the total deadline passed before the first attempt")
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if outcome.attempts:
                last = (
                    "deadline",
                    f"total deadline reached after {outcome.attempts} attempt(s); last: {last[1]}",
                )
            break
        per_attempt = min(model_timeout, remaining)
        clipped = per_attempt < model_timeout
        outcome.attempts += 1
        retry = False
        try:
            async with asyncio.timeout(per_attempt):
                response = await litellm.acompletion(
                    model=spec.litellm_model,
                    messages=messages,
                    timeout=per_attempt,
                    max_retries=0,
                    num_retries=0,
                    **kwargs,
                )
        except TimeoutError:
            last = ("deadline" if clipped else "timeout", f"no reply within {per_attempt:.2f}s")
            retry = True
        except Exception as exc:  # every provider failure is an abstention, never a crash
            if isinstance(exc, litellm.Timeout):
                last = (
                    "deadline" if clipped else "timeout",
                    f"no reply within {per_attempt:.2f}s ({_describe(exc)})",
                )
                retry = True
            else:
                last = ("provider_error", _describe(exc))
                retry = transient(exc)
        else:
            outcome.content = _content(response)
            _usage(response, outcome)
            outcome.latency_s = time.monotonic() - start
            return outcome
        if not retry or outcome.attempts > policy.retries:
            break
        delay = min(policy.backoff_max, policy.backoff * 2 ** (outcome.attempts - 1))
        delay *= 0.5 + random.random() / 2  # jitter, so a panel does not retry in lockstep
        if time.monotonic() + delay >= deadline:
            last = (
                "deadline",
                f"no time left for a retry after {outcome.attempts} attempt(s); last: {last[1]}",
            )
            break
        await asyncio.sleep(delay)
    outcome.abstention, outcome.error = last
    outcome.latency_s = time.monotonic() - start
    return outcome
