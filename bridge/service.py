"""The Telegram bridge as a service: Telethon transport + LiveReply streaming + the pipeline.

``scheduler/daemon.py`` starts it as ``run_bridge(settings, base_url, secret)`` when Telegram is
configured. With ``base_url`` and ``secret`` the pipeline reuses the tools the daemon hosts
(minting its per-run scope tokens with that secret); without them it hosts its own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bridge.live import live_reply_factory
from bridge.telegram import TelegramTransport

if TYPE_CHECKING:
    from servers.core.remote_runs import RunBoard
    from servers.core.settings import Settings

log = logging.getLogger("valor.bridge.service")


async def run_bridge(
    settings: Settings,
    base_url: str | None = None,
    secret: bytes | None = None,
    run_board: RunBoard | None = None,
) -> None:
    """Connect to Telegram, catch up, and answer until cancelled. With ``run_board`` (the
    daemon's, under VALOR_RUN_ON_WORKERS) the runs go to remote workers."""
    from bridge.pipeline import Bridge
    from servers.core.remote_runs import RemoteRunner

    transport = TelegramTransport.from_settings(settings)  # config errors surface here, offline
    remote = RemoteRunner.from_settings(run_board, settings) if run_board is not None else None
    await transport.start()
    try:
        # Reuse the daemon's hosted tools: a second host would replace the process-wide secret.
        external = {"tools_base_url": base_url, "tools_secret": secret} if base_url else {}
        bridge = Bridge(
            transport,
            settings=settings,
            reply_factory=live_reply_factory(None, settings),
            remote_runs=remote,
            **external,
        )
        transport.authorize = bridge.authorized  # files are fetched only for allowed senders
        await bridge.run()
    finally:
        if remote is not None:
            await remote.close()
        await transport.close()
