"""Cross-Model Verification Kernel: several LLMs check an answer, by meaning, and fail closed.

- :class:`CMVK` asks a panel of models (through litellm, in parallel) for a strict JSON
  verdict on a response (:meth:`CMVK.verify`), or for their own answers, whose agreement is
  measured by meaning (:meth:`CMVK.cross_check`, :meth:`CMVK.agreement`).
- Timeouts, provider errors and unparsable replies are abstentions, never votes; without a
  quorum of answering models nothing is verified.
- ``CMVK.verify(prompt, response, context)`` is also the verifier contract of the control
  plane's ``kernel.add_module``: the result has ``verified``, ``confidence`` and ``reason``.

Importing this package does not import litellm: :meth:`CMVK.warm` or the first call loads it,
before the call's deadline starts. How panels, voting and agreement work: ``docs/verification.md``.
"""

from agent_os.cmvk._agreement import Agreement, AgreementMeasure, Embedder
from agent_os.cmvk._calls import AbstentionKind, ModelSpec
from agent_os.cmvk._cmvk import CMVK
from agent_os.cmvk._errors import CMVKConfigError, CMVKError, VerdictParseError
from agent_os.cmvk._results import (
    CallStats,
    Consensus,
    CrossCheckResult,
    ModelAnswer,
    ModelVote,
    VerificationResult,
)
from agent_os.cmvk._verdict import Verdict, parse_judgement, parse_verdict
from agent_os.cmvk._voting import Strategy

__all__ = [
    "CMVK",
    "AbstentionKind",
    "Agreement",
    "AgreementMeasure",
    "CMVKConfigError",
    "CMVKError",
    "CallStats",
    "Consensus",
    "CrossCheckResult",
    "Embedder",
    "ModelAnswer",
    "ModelSpec",
    "ModelVote",
    "Strategy",
    "Verdict",
    "VerdictParseError",
    "VerificationResult",
    "parse_judgement",
    "parse_verdict",
]
