"""MCP servers over the SSE transport, built with the Python MCP SDK (PyPI `mcp`, pinned in
requirements.txt), as sandboxes behind the gateway in the end-to-end tests.

Every server binds 127.0.0.1, so the SDK turns on its DNS-rebinding protection (its default for
a loopback-bound server): a Host other than 127.0.0.1:*, localhost:* or [::1]:* gets 421.

    mcp_sse_server.py --app NAME=KIND ...

KIND is one of
  root              the SDK's SSE app at /  (GET /sse, POST /messages/?session_id=...)
  mount:PATH        the same app mounted under PATH, where "{port}" stands for the server's own
                    port (a server configured with its public base path)
  forwarded-prefix  at /, taking its base path from x-forwarded-prefix (what a server behind a
                    prefix-stripping proxy that it trusts does)

Each server listens on its own OS-chosen port; once all are listening the script prints one
line per server, `READY NAME PORT`, then serves until its stdin closes (the test process ended,
however it ended), so no server outlives its test.
"""

import argparse
import asyncio
import os
import socket
import sys
import threading

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.routing import Mount


def mcp_app(port: int):
    server = MCPServer("sandbox-gateway-e2e")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Adds two integers."""
        return a + b

    @server.tool()
    def whoami() -> str:
        """Names this server by its port, so a test knows which one answered."""
        return f"mcp-{port}"

    # host="127.0.0.1" is what makes the SDK enable its Host check; it does not bind anything.
    return server.sse_app(host="127.0.0.1")


class ForwardedPrefix:
    """Sets the ASGI root_path from x-forwarded-prefix. The SDK's SSE transport builds the
    message URL it hands the client from root_path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-forwarded-prefix":
                    scope = dict(scope, root_path=value.decode("latin-1"))
        await self.app(scope, receive, send)


def build(kind: str, port: int):
    if kind == "root":
        return mcp_app(port)
    if kind == "forwarded-prefix":
        return ForwardedPrefix(mcp_app(port))
    if kind.startswith("mount:"):
        base = kind[len("mount:") :].replace("{port}", str(port))
        return Starlette(routes=[Mount(base, app=mcp_app(port))])
    raise SystemExit(f"unknown app kind {kind!r}")


def exit_when_stdin_closes():
    sys.stdin.buffer.read()
    os._exit(0)


async def serve(apps):
    servers = []
    for name, kind in apps:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        config = uvicorn.Config(build(kind, port), log_level="warning", lifespan="off")
        servers.append((name, port, sock, uvicorn.Server(config)))
    # Listening already: connections queue in the kernel until uvicorn accepts them.
    for name, port, _, _ in servers:
        print(f"READY {name} {port}", flush=True)
    await asyncio.gather(*(s.serve(sockets=[sock]) for _, _, sock, s in servers))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--app", action="append", required=True, metavar="NAME=KIND")
    args = p.parse_args()
    apps = [a.split("=", 1) for a in args.app]
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    asyncio.run(serve(apps))


if __name__ == "__main__":
    main()
