# A real MCP server (the `mcp` package's MCPServer) over streamable HTTP on 127.0.0.1,
# serving both protocol generations on one endpoint: a 2026-07-28 client's requests
# each stand alone (no session), while an `initialize` (protocol 2025-11-25 and
# earlier) gets an Mcp-Session-Id that every later request of that session carries.
# Tests run it in a thread (`running_mcp_server`); a benchmark can run it as a process:
#   python -m bench.mcp_server [--port N] [--json-response]
# which prints one line, the endpoint URL, once it accepts connections.
from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from typing import Annotated

import uvicorn
from starlette.middleware.gzip import GZipMiddleware
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve
from pydantic import BaseModel

MCP_PATH = "/mcp"
START_TIMEOUT_S = 10.0
DOCUMENTS = {
    "doc-1": "Margins move with every call.",
    "doc-2": "Agents call tools; tools cost money.",
}
TOOL_NAMES = ("search", "fetch", "add")
# A tool that asks the user to confirm before it runs (elicitation): at 2026-07-28 the
# first `tools/call` is answered `input_required` and the client calls again with the
# answer; before, the server asks mid-call on the same POST.
CONFIRMED_TOOL = "archive"


class Confirmation(BaseModel):
    confirm: bool


async def _ask_to_archive(doc_id: str, context: Context) -> Elicit[Confirmation]:
    # Progress first, for a client that asked for it: an SSE answer then carries the
    # progress and the `input_required` result (JSON when there is nothing to stream).
    await context.report_progress(0, 1, f"asking to archive {doc_id}")
    return Elicit(f"Archive {doc_id}?", Confirmation)


def build_mcp_server() -> MCPServer:
    """An MCPServer with the tools `search`, `fetch`, `add` and `archive` (which
    elicits a confirmation first)."""
    server = MCPServer("aforo-test-tools")

    @server.tool()
    def search(query: str) -> list[str]:
        """Ids of the documents whose text contains `query` (case-insensitive)."""
        return [doc_id for doc_id, text in DOCUMENTS.items() if query.lower() in text.lower()]

    @server.tool()
    def fetch(doc_id: str) -> str:
        """The text of one document."""
        return DOCUMENTS.get(doc_id, "")

    @server.tool()
    def add(a: int, b: int) -> int:
        """a + b."""
        return a + b

    @server.tool()
    def archive(doc_id: str, answer: Annotated[Confirmation, Resolve(_ask_to_archive)]) -> str:
        """Archives one document once the user confirms."""
        return f"archived {doc_id}" if answer.confirm else f"kept {doc_id}"

    return server


class McpServerThread:
    """A uvicorn server for `build_mcp_server()` in a thread of its own, on a free
    port of 127.0.0.1; `url` is the MCP endpoint once `start()` returned. With
    `json_response` the server answers each POST with one JSON body instead of an SSE
    stream; it keeps sessions for `initialize` (stateful). With `compress` it gzips
    its answers for clients that accept it."""

    def __init__(self, *, port: int = 0, json_response: bool = False, compress: bool = False) -> None:
        app = build_mcp_server().streamable_http_app(streamable_http_path=MCP_PATH, json_response=json_response,
                                                     stateless_http=False)
        if compress:
            app.add_middleware(GZipMiddleware, minimum_size=0)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="mcp-server", daemon=True)
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the MCP server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}{MCP_PATH}"
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(START_TIMEOUT_S)


@contextlib.contextmanager
def running_mcp_server(*, json_response: bool = False, compress: bool = False):
    """Context manager yielding the endpoint URL of a running MCP server thread."""
    server = McpServerThread(json_response=json_response, compress=compress)
    try:
        yield server.start()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the test MCP server over streamable HTTP.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json-response", action="store_true")
    args = parser.parse_args(argv)
    server = McpServerThread(port=args.port, json_response=args.json_response)
    print(server.start(), flush=True)
    try:
        while server._thread.is_alive():
            server._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
