"""``python -m agent_os.services.control_plane_service``: the same as ``agent-os serve control-plane``."""

from agent_os.services.control_plane_service._cli import main

main()
