"""Loading litellm, the LLM client, once per process and before any deadline starts.

Importing litellm takes seconds (6-11 s offline on a slow machine): done inside a call it
would eat that call's deadline. :func:`load_client` imports it and makes one offline call
(``mock_response``: nothing is sent), which runs litellm's own lazy imports too; it is
thread-safe and runs once. :func:`ensure_client` runs it in a worker thread, so the event loop
keeps running; :meth:`agent_os.cmvk.CMVK.warm` and every CMVK call await it before their
deadline starts. ``import agent_os.cmvk`` itself never imports litellm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from types import ModuleType

INSTALL_HINT = "CMVK calls models through litellm: pip install 'agent-os[cmvk]'"
COST_MAP_ENV = "LITELLM_LOCAL_MODEL_COST_MAP"

_lock = threading.Lock()
_loaded: ModuleType | None = None


def litellm_module() -> ModuleType:
    """Import litellm (once), without network access for its cost map: ``COST_MAP_ENV`` is set
    to ``True`` first unless the user set it. When CMVK is the first to import litellm it turns
    off litellm's "Give Feedback" banner and its loggers' own stream handlers (they write to
    stdout), so its records go to the application's logging configuration. Raises ImportError
    naming the ``cmvk`` extra when litellm is not installed. Blocks for the import: call it off
    the event loop."""
    mod = sys.modules.get("litellm")
    if mod is not None:
        return mod
    os.environ.setdefault(COST_MAP_ENV, "True")
    try:
        import litellm
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    litellm.suppress_debug_info = True
    _route_logs_to_the_application()
    return litellm


def _route_logs_to_the_application() -> None:
    # litellm gives its loggers their own stream handlers, which write INFO records to stdout:
    # the channel where a service prints its one "ready" line. Without them its records reach
    # the application's handlers (propagation) like any library's.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)


def load_client() -> ModuleType:
    """:func:`litellm_module` plus one offline completion (``mock_response``, no request is
    sent), so that the first real call imports nothing more. Thread-safe; runs once per
    process. Raises ImportError naming the ``cmvk`` extra."""
    global _loaded
    with _lock:
        if _loaded is None:
            litellm = litellm_module()
            litellm.completion(
                model="openai/agent-os-warm-up",
                messages=[{"role": "user", "content": "warm-up"}],
                mock_response="ok",
                **{"no-log": True},  # not a request: keep it out of the user's logging callbacks
            )
            _loaded = litellm
        return _loaded


async def ensure_client() -> ModuleType:
    """The loaded litellm; the first call loads it in a worker thread (:func:`load_client`).
    Raises ImportError naming the ``cmvk`` extra."""
    if _loaded is not None:
        return _loaded
    return await asyncio.to_thread(load_client)
