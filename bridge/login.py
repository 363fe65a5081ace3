"""`valor login`: create a Telethon string session for a user account, interactively.

Telegram sends a login code to the account's app; a two-step password is asked for when the
account has one. The session string is as good as a password, so it is written into the ``.env``
file (owner-only permissions) and never printed unless asked for with ``--print``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from servers.core.errors import Category, ValorError
from servers.core.settings import Settings

SESSION_KEY = "TELEGRAM_SESSION"


def check_login_settings(settings: Settings) -> tuple[int, str]:
    """The API id and hash a login needs, or a config error saying where to get them."""
    if settings.telegram_api_id is None or settings.telegram_api_hash is None:
        raise ValorError(
            Category.CONFIG,
            "Set TELEGRAM_API_ID and TELEGRAM_API_HASH first (create them at my.telegram.org "
            "under 'API development tools'), then run `valor login` again.",
        )
    return settings.telegram_api_id, settings.telegram_api_hash.get_secret_value()


def write_env_value(env_file: Path, key: str, value: str) -> None:
    """Set ``key=value`` in a .env file: replace the active line or append; keep everything else.
    The file ends up readable by its owner only, because the value is a secret."""
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
        raise ValueError(f"not an environment variable name: {key!r}")
    if any(ch in value for ch in "\n\r\"'\\ "):
        raise ValueError("the value may not contain quotes, backslashes, spaces or newlines")
    lines = env_file.read_text(encoding="utf-8").splitlines() if env_file.exists() else []
    pattern = re.compile(rf"^\s*(export\s+)?{key}\s*=")
    replaced = False
    out = []
    for line in lines:
        if pattern.match(line):
            if not replaced:
                out.append(f"{key}={value}")
                replaced = True
            continue  # drop duplicates: the first assignment would shadow ours otherwise
        out.append(line)
    if not replaced:
        out.append(f"{key}={value}")
    tmp = env_file.with_name(env_file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(out) + "\n")
    os.replace(tmp, env_file)
    os.chmod(env_file, 0o600)


async def create_session(
    api_id: int,
    api_hash: str,
    *,
    phone: Callable[[], str],
    code: Callable[[], str],
    password: Callable[[], str],
) -> tuple[str, str]:
    """Log in over the network; returns (session string, display name of the account)."""
    from telethon import TelegramClient, utils
    from telethon.sessions import StringSession

    client = TelegramClient(StringSession(), api_id, api_hash)
    try:
        await client.start(phone=phone, code_callback=code, password=password)
        me = await client.get_me()
        if getattr(me, "bot", False):
            raise ValorError(
                Category.INPUT,
                "That is a bot account: bots need no login, set TELEGRAM_BOT_TOKEN instead.",
            )
        return client.session.save(), utils.get_display_name(me)
    finally:
        await client.disconnect()
