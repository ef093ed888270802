"""EMK with a litellm embedding model, served by a small local HTTP server speaking the OpenAI
embeddings API (reached through litellm's ``api_base``)."""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent_os.emk import EMK, DimensionMismatch, EmbeddingError, HashingEmbedder, LiteLLMEmbedder, NewMemory

DIM = 64


class EmbeddingServer:
    """OpenAI-compatible ``POST /v1/embeddings``; vectors from the hashing embedder.

    ``mode``: "ok", "wrong_dimension", "wrong_count" or "error" (HTTP 500).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.hashing = HashingEmbedder(DIM)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                status, answer = server.answer(body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.mode == "error":
            return 500, {"error": {"message": "model overloaded", "type": "server_error"}}
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = [self.hashing.embed_one(t) for t in texts]
        if self.mode == "wrong_dimension":
            vectors = [v[:-1] for v in vectors]
        if self.mode == "wrong_count":
            vectors = vectors[:-1]
        data = []
        for i, v in enumerate(vectors):
            if body.get("encoding_format") == "base64":
                item: Any = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            else:
                item = v
            data.append({"object": "embedding", "index": i, "embedding": item})
        usage = {"prompt_tokens": len(texts), "total_tokens": len(texts)}
        return 200, {"object": "list", "data": data, "model": body["model"], "usage": usage}


@pytest.fixture
def server() -> Iterator[EmbeddingServer]:
    srv = EmbeddingServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def embedder(server: EmbeddingServer) -> LiteLLMEmbedder:
    return LiteLLMEmbedder(
        "openai/text-embedding-3-small",
        dimension=DIM,
        request_dimensions=True,
        api_base=server.url,
        api_key="sk-test-key",
    )


async def test_store_and_search_through_litellm(server: EmbeddingServer) -> None:
    async with EMK("memory", embedding_model=embedder(server)) as emk:
        records = await emk.store_many(
            [
                NewMemory(agent_id="a1", content="User prefers dark mode and metric units."),
                NewMemory(agent_id="a1", content="The quarterly budget meeting moved to Thursday."),
            ]
        )
        hits = await emk.search("a1", "dark mode units", limit=2)
    assert hits[0].id == records[0].id
    # One request for the batch, one for the query; the key and the dimension went along.
    assert [r["input"] for r in server.requests] == [
        ["User prefers dark mode and metric units.", "The quarterly budget meeting moved to Thursday."],
        ["dark mode units"],
    ]
    assert all(r["path"] == "/v1/embeddings" for r in server.requests)
    assert all(r["auth"] == "Bearer sk-test-key" for r in server.requests)
    assert server.requests[0]["model"] == "text-embedding-3-small"
    assert server.requests[0]["dimensions"] == DIM
    # The vectors are the server's: the same as the hashing embedder gives locally.
    expected = HashingEmbedder(DIM).embed_one("dark mode units")
    got = await embedder(server).embed(["dark mode units"])
    assert got[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("mode", "error"),
    [("wrong_dimension", DimensionMismatch), ("wrong_count", EmbeddingError), ("error", EmbeddingError)],
)
async def test_a_misbehaving_model_is_a_clear_error_and_nothing_is_stored(
    server: EmbeddingServer, mode: str, error: type[Exception]
) -> None:
    async with EMK("memory", embedding_model=embedder(server)) as emk:
        await emk.store("a1", "stored while the model behaved")
        server.mode = mode
        with pytest.raises(error):
            await emk.store_many([NewMemory(agent_id="a1", content=f"memory {i}") for i in range(3)])
        with pytest.raises(error):
            await emk.search("a1", "anything")
        assert len(await emk.query("a1")) == 1


def test_unknown_dimension_must_be_given() -> None:
    from agent_os.emk import ConfigError

    with pytest.raises(ConfigError):
        LiteLLMEmbedder("openai/some-new-embedding-model")
    assert LiteLLMEmbedder("text-embedding-3-small").dimension == 1536
