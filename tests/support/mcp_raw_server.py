"""A hand-written MCP server on stdio that misbehaves on request, for the connection tests of
:class:`agent_os.control_plane.actions.McpTools`: ``python -m tests.support.mcp_raw_server
[--pid-file PATH] [--slow-start SECONDS]``. It writes its pid to PATH, waits SECONDS before it
reads anything, then answers ``initialize``, ``tools/list`` and calls of its tools: ``pid``
(its process id), ``rpcerr`` (a JSON-RPC error answer, -32602), ``wedge`` (it answers nothing
from then on) and ``stray`` (a line that is not UTF-8 on stdout before the answer)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = ("pid", "rpcerr", "wedge", "stray")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid-file")
    parser.add_argument("--slow-start", type=float, default=0.0)
    args = parser.parse_args()
    if args.pid_file:
        Path(args.pid_file).write_text(str(os.getpid()))
    time.sleep(args.slow_start)
    out = sys.stdout.buffer
    wedged = False

    def send(message: dict[str, Any] | None = None, raw: bytes = b"") -> None:
        out.write(raw + (json.dumps(message).encode() + b"\n" if message else b""))
        out.flush()

    for line in sys.stdin.buffer:
        message = json.loads(line)
        method, rid = message.get("method"), message.get("id")
        if rid is None or wedged:
            continue
        if method == "initialize":
            result = {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw", "version": "0"},
            }
            send({"jsonrpc": "2.0", "id": rid, "result": result})
        elif method == "tools/list":
            tools = [{"name": name, "inputSchema": {"type": "object"}} for name in TOOLS]
            send({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}})
        elif method == "tools/call" and message["params"]["name"] == "rpcerr":
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "Invalid params"}})
        elif method == "tools/call" and message["params"]["name"] == "wedge":
            wedged = True
        elif method == "tools/call":
            stray = b"\xff\xfe not UTF-8\n" if message["params"]["name"] == "stray" else b""
            text = {"type": "text", "text": str(os.getpid())}
            send({"jsonrpc": "2.0", "id": rid, "result": {"content": [text]}}, raw=stray)
        else:
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no such method"}})


if __name__ == "__main__":
    main()
