"""The kernel modules under their reference names (``docs/api-reference.md``):
``from agent_os.modules import AMB``.

Each name loads its part on first use, so importing one module does not load the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_os._lazy import lazy_exports

if TYPE_CHECKING:
    from agent_os.amb import AMB
    from agent_os.cmvk import CMVK
    from agent_os.emk import EMK
    from agent_os.iatp import IATP

_LAZY: dict[str, str] = {
    "AMB": "agent_os.amb",
    "CMVK": "agent_os.cmvk",
    "EMK": "agent_os.emk",
    "IATP": "agent_os.iatp",
}

__all__ = ["AMB", "CMVK", "EMK", "IATP"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
