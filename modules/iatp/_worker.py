"""The entry point of a signature worker process (:mod:`agent_os.iatp.offload`)."""

from __future__ import annotations

import sys

from agent_os.iatp.offload import main

if __name__ == "__main__":
    sys.exit(main())
