"""The ``agent-os`` commands beyond ``demo`` and ``serve``, one module each, imported by
:mod:`agent_os.cli` only when their command runs: ``submit`` (one action through a kernel),
``log`` (query, follow, verify and export a flight recorder), ``policy`` (``policy
validate``) and ``top`` (a live view of running control-plane instances).
``docs/services.md`` (The agent-os command) describes them and their exit codes."""
