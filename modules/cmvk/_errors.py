"""The errors of the Cross-Model Verification Kernel::

    CMVKError
    ├── CMVKConfigError (ValueError)     bad option: unknown strategy, threshold out of range, ...
    └── VerdictParseError (ValueError)   a model's reply is not a valid verdict / answer

A model that times out, fails or replies with something unparsable is never an exception
out of :meth:`agent_os.cmvk.CMVK.verify`: it is an abstention recorded in the result. Only misuse
(bad configuration or arguments) raises.
"""

from __future__ import annotations


class CMVKError(Exception):
    """Root of every error raised by the CMVK module."""


class CMVKConfigError(CMVKError, ValueError):
    """An option or argument is invalid."""


class VerdictParseError(CMVKError, ValueError):
    """A model's reply does not follow the verdict schema (kept as the abstention's reason)."""
