"""The kernel modules, under the names the API reference uses: ``from agent_os.modules import AMB``."""

from amb import AMB

__all__ = ["AMB"]
