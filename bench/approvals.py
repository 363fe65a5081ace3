"""Approvals: Valor's own time between Claude Code asking and the answer reaching it.

A real bridge (in-memory transport, Valor's tools hosted over HTTP on loopback) and a real MCP
HTTP client with a chat token, calling approve_tool_use as Claude Code does. A "person" answers
`yes CODE` the moment the question arrives, so everything measured is Valor's overhead:

  ask    the tool call starting → the question sent to the chat (tool, store, bridge wake-up)
  answer the answer handed to the bridge → the tool's result back at the client
  total  both (target: ≤ 50 ms median)

    .venv/bin/python bench/approvals.py              # 50 questions
    .venv/bin/python bench/approvals.py --rounds 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import ms  # noqa: E402

CHAT, OWNER = 4242, 1


async def measure(rounds: int) -> None:
    from fastmcp import Client
    from fastmcp.client.transports import StreamableHttpTransport

    from bridge.memory import MemoryTransport, incoming
    from bridge.pipeline import Bridge
    from servers.core import approvals
    from servers.core.mcp_config import endpoint
    from servers.core.trust import mint_scope_token

    transport = MemoryTransport()
    bridge = Bridge(transport, persona="")
    ask, answer, total = [], [], []
    async with bridge.serving():
        assert bridge.tools is not None
        token = mint_scope_token(bridge.tools.secret, CHAT)
        client_transport = StreamableHttpTransport(
            endpoint(bridge.tools.base_url, approvals.SERVER_NAME),
            headers={"Authorization": f"Bearer {token}"},
        )
        async with Client(client_transport) as client:
            for round_number in range(rounds + 3):  # the first three warm up
                seen = len(transport.sent)
                started = time.perf_counter()
                call = asyncio.create_task(
                    client.call_tool(
                        approvals.TOOL_NAME,
                        {"tool_name": "Bash", "input": {"command": f"echo {round_number}"}},
                    )
                )
                await transport.wait_for(lambda seen=seen: len(transport.sent) > seen, 30)
                asked = time.perf_counter()
                code = transport.sent[-1].text.split("`yes ", 1)[1][:5]
                answering = time.perf_counter()
                reply = incoming(CHAT, 10_000 + round_number, f"yes {code}", sender_id=OWNER)
                await bridge.receive(reply)
                result = await call
                finished = time.perf_counter()
                assert json.loads(result.content[0].text)["behavior"] == "allow"
                if round_number >= 3:
                    ask.append(asked - started)
                    answer.append(finished - answering)
                    total.append((asked - started) + (finished - answering))
    print(f"approvals over hosted HTTP, {rounds} questions answered at once:")
    print(f"  ask    (call → question in the chat)   {ms(ask)}")
    print(f"  answer (answer → result at the client) {ms(answer)}")
    print(f"  total  (Valor's own overhead)          {ms(total)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        os.environ["VALOR_DATA_DIR"] = data_dir
        os.environ["VALOR_ENV_FILE"] = str(Path(data_dir) / "empty.env")
        os.environ["VALOR_ALLOWED_USER_IDS"] = json.dumps([OWNER])
        asyncio.run(measure(args.rounds))


if __name__ == "__main__":
    main()
