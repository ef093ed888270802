"""One Redis connection that sends a batch of ``SET key 1 NX PX ttl`` as one pipelined write.

The shared nonce store's wire (``docs/trust.md``, "Shared replay protection", says why it is not
redis-py). It speaks only what a claim needs: ``AUTH``/``SELECT`` when connecting, then ``SET``
with ``NX PX``, whose replies are one line each (``+OK``, a nil, or an error). Anything else is a
protocol error; after any error the connection is closed, since its framing is then unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from agent_os.iatp.errors import IATPConfigError

_OK = b"+OK\r\n"
_NILS = (b"$-1\r\n", b"_\r\n")  # RESP2 and RESP3 nil: not set, the key exists
_SET_TAIL = b"\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nPX\r\n"


class RespError(Exception):
    """The server answered with an error or with something a claim never gets."""


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(p) for p in parts)


def encode_claims(keys: Sequence[bytes], ttls_ms: Sequence[int]) -> bytes:
    """The pipelined ``SET <key> 1 NX PX <ttl>`` commands for one batch, as one buffer."""
    out = []
    for key, ttl in zip(keys, ttls_ms, strict=True):
        digits = b"%d" % ttl
        out.append(
            b"*6\r\n$3\r\nSET\r\n$%d\r\n%s%s$%d\r\n%s\r\n" % (len(key), key, _SET_TAIL, len(digits), digits)
        )
    return b"".join(out)


def parse_claim_reply(line: bytes) -> bool:
    """True for ``+OK`` (set: the first claim), False for a nil (the key exists); RespError
    for anything else."""
    if line == _OK:
        return True
    if line in _NILS:
        return False
    raise RespError(f"unexpected reply to SET NX: {line[:200]!r}")


class RedisAddress:
    """Where and how to connect, from a ``redis://`` or ``rediss://`` URL
    (``redis://[[user]:password@]host[:port][/db]``); IATPConfigError for anything else."""

    __slots__ = ("db", "host", "password", "port", "tls", "username")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise IATPConfigError(
                f"the nonce store needs a redis:// or rediss:// URL with a host, not {url!r}"
            )
        if parts.query or parts.fragment:
            raise IATPConfigError("the nonce store URL takes no query or fragment")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise IATPConfigError(f"the database in the nonce store URL must be a number, not {path!r}")
        try:
            port = parts.port or 6379
        except ValueError as exc:
            raise IATPConfigError(f"bad port in the nonce store URL: {exc}") from exc
        self.host = parts.hostname
        self.port = port
        self.db = int(path) if path else 0
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None

    def handshake(self) -> list[bytes]:
        """The commands sent once per connection (``AUTH``, ``SELECT``), each answered ``+OK``."""
        out = []
        if self.password is not None:
            user = [self.username.encode()] if self.username else []
            out.append(_command(b"AUTH", *user, self.password.encode()))
        if self.db:
            out.append(_command(b"SELECT", b"%d" % self.db))
        return out


class RespConnection:
    """One connection, one batch at a time (the caller serialises batches)."""

    def __init__(self, address: RedisAddress) -> None:
        self.address = address
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        address = self.address
        context = ssl.create_default_context() if address.tls else None
        reader, writer = await asyncio.open_connection(address.host, address.port, ssl=context)
        self._reader, self._writer = reader, writer
        hello = address.handshake()
        if hello:
            writer.write(b"".join(hello))
            for _ in hello:
                line = await reader.readline()
                if line != _OK:
                    raise RespError(f"the nonce store refused the connection setup: {line[:200]!r}")
        return reader, writer

    async def claim(self, keys: Sequence[bytes], ttls_ms: Sequence[int]) -> list[bool]:
        """Send one batch and read its replies, in order. Raises RespError, OSError or
        EOFError (the connection is then closed; the next call connects anew)."""
        try:
            if self._writer is None or self._reader is None:
                reader, writer = await self._connect()
            else:
                reader, writer = self._reader, self._writer
            writer.write(encode_claims(keys, ttls_ms))
            answers = []
            for _ in keys:
                line = await reader.readline()
                if not line.endswith(b"\r\n"):
                    raise EOFError("the nonce store closed the connection")
                answers.append(parse_claim_reply(line))
            return answers
        except BaseException:
            self.close()  # a timeout or an error mid-batch: the framing is lost
            raise

    def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()

    async def aclose(self) -> None:
        writer = self._writer
        self.close()
        if writer is not None:
            with contextlib.suppress(OSError, ssl.SSLError):  # a broken one: nothing to release
                await writer.wait_closed()
