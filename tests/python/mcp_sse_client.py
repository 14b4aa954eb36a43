"""Drives MCP servers over SSE with the Python MCP SDK's own client (`sse_client` and
`ClientSession`): initialize, list_tools, then call_tool for `add` and `whoami`.

    mcp_sse_client.py SCENARIOS_JSON

SCENARIOS_JSON is a list of {"name": ..., "url": "http://.../sse", "headers": {...}}. The script
runs them one after another and prints one JSON list: per scenario {"name", "ok", and either
"tools", "add", "whoami" or "error"}, plus "responses", every HTTP response the client got
("METHOD PATH -> STATUS"), so a failing test shows where the session broke. It exits 0 whether
or not a scenario failed: the test decides which ones must.

The SDK's client logs and swallows a failed message POST and would wait for the reply that
never comes; a failed POST therefore ends the scenario at once.
"""

import json
import sys

import anyio
import httpx2
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client

# Only a bound for a server that stops answering; a refused request fails the scenario at once.
STEP_TIMEOUT_S = 20


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def scenario(s: dict) -> dict:
    responses: list[str] = []
    post_failed = anyio.Event()

    async def record(resp: httpx2.Response):
        req = resp.request
        responses.append(f"{req.method} {req.url.raw_path.decode()} -> {resp.status_code}")
        if req.method == "POST" and resp.status_code >= 300:
            await resp.aread()
            responses.append(f"  body: {resp.text[:300]}")
            post_failed.set()

    def client_factory(headers=None, timeout=None, auth=None):
        return httpx2.AsyncClient(
            headers=headers, timeout=timeout, auth=auth, event_hooks={"response": [record]}
        )

    out: dict = {"name": s["name"]}

    async def drive():
        async with sse_client(
            s["url"], headers=s.get("headers") or None, httpx_client_factory=client_factory
        ) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=STEP_TIMEOUT_S) as session:
                await session.initialize()
                tools = await session.list_tools()
                add = await session.call_tool("add", {"a": 2, "b": 3})
                who = await session.call_tool("whoami", {})
        out["tools"] = sorted(t.name for t in tools.tools)
        out["add"] = [c.text for c in add.content if getattr(c, "text", None) is not None]
        out["whoami"] = [c.text for c in who.content if getattr(c, "text", None) is not None]

    try:
        with anyio.fail_after(STEP_TIMEOUT_S * 3):
            async with anyio.create_task_group() as tg:

                async def stop_on_failed_post():
                    await post_failed.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_on_failed_post)
                await drive()
                tg.cancel_scope.cancel()
        out["ok"] = "tools" in out
        if not out["ok"]:
            out["error"] = "a message POST was refused"
    except BaseException as exc:  # the scenario's failure is the result, not a crash
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        out["ok"] = False
        out["error"] = describe(exc)
    out["responses"] = responses
    return out


async def main():
    scenarios = json.loads(sys.argv[1])
    results = [await scenario(s) for s in scenarios]
    print(json.dumps(results))


if __name__ == "__main__":
    anyio.run(main)
