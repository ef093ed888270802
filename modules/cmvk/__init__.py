"""Cross-Model Verification Kernel: several LLMs check an answer, by meaning, and fail closed.

- :class:`CMVK` asks a panel of models (through litellm, in parallel) for a strict JSON
  verdict on a response (:meth:`CMVK.verify`), or for their own answers, whose agreement is
  measured by meaning (:meth:`CMVK.cross_check`, :meth:`CMVK.agreement`).
- Timeouts, provider errors and unparsable replies are abstentions, never votes; without a
  quorum of answering models nothing is verified.
- ``CMVK.verify(prompt, response, context)`` is also the verifier contract of the control
  plane's ``kernel.add_module``: the result has ``verified``, ``confidence`` and ``reason``.

Importing this package does not import litellm; the first call does.
"""

from cmvk._agreement import Agreement, AgreementMeasure, Embedder
from cmvk._calls import AbstentionKind, ModelSpec
from cmvk._cmvk import CMVK
from cmvk._errors import CMVKConfigError, CMVKError, VerdictParseError
from cmvk._results import CallStats, Consensus, CrossCheckResult, ModelAnswer, ModelVote, VerificationResult
from cmvk._verdict import Verdict, parse_judgement, parse_verdict
from cmvk._voting import Strategy

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
