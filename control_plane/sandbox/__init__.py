"""OS sandboxes: processes whose only way out is a channel to the kernel.

:mod:`.bwrap` starts a command in a bubblewrap sandbox (no network, a read-only root, a private
workspace, resource limits, its own uid); :mod:`.channel` carries length-prefixed msgpack frames
and calls between the kernel and what runs inside. ``docs/sandbox.md`` explains the design.
"""

from __future__ import annotations

from agent_os.control_plane.sandbox.bwrap import Sandbox, SandboxLimits, SandboxSpec, check_available, start

__all__ = ["Sandbox", "SandboxLimits", "SandboxSpec", "check_available", "start"]
