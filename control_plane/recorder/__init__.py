"""The flight recorder: hash-chained audit records in memory, SQLite or PostgreSQL."""

from agent_os.control_plane.recorder.heads import HEAD_EVENT, Head
from agent_os.control_plane.recorder.recorder import FlightRecorder
from agent_os.control_plane.recorder.records import ANCHOR_EVENT, GENESIS, Record, VerifyResult
from agent_os.control_plane.recorder.storage import MemoryStorage, Storage, Where

__all__ = [
    "ANCHOR_EVENT",
    "GENESIS",
    "HEAD_EVENT",
    "FlightRecorder",
    "Head",
    "MemoryStorage",
    "Record",
    "Storage",
    "VerifyResult",
    "Where",
]
