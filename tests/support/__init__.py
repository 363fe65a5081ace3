"""Helpers shared by the tests: MCP calls, settings from the environment, waiting on conditions.

from tests.support import call, configure, texts, wait_until, wait_until_async

Narrower helpers live beside them: ``tests.support.bridge`` (the fake ``claude`` stand-in,
process checks) and ``tests.support.development`` (development-tools settings, screenshots).
"""

from tests.support.mcp import INITIALIZE_REQUEST, call, texts
from tests.support.network import free_port
from tests.support.settings import configure
from tests.support.waiting import wait_until, wait_until_async

__all__ = [
    "INITIALIZE_REQUEST",
    "call",
    "configure",
    "free_port",
    "texts",
    "wait_until",
    "wait_until_async",
]
