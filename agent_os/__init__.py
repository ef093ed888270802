"""Agent OS: a governed message bus for AI agents.

The bus client is ``agent_os.modules.AMB`` (also importable as ``amb.AMB``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agent-os")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
