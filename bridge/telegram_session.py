"""Telethon's client and session for Valor: the login and update position that survive restarts.

``PersistentStateSession`` keeps, in ``data_dir/telegram/update_state.json`` (owner-only), the
update position, our own id, peers' ids with access hashes, and for a bot its login key; the
file records the account it belongs to and is ignored for any other. ``build_client`` makes the
TelegramClient the transport uses (no network I/O until connected).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servers.core.errors import Category, ValorError

if TYPE_CHECKING:
    from servers.core.settings import Settings

log = logging.getLogger("valor.bridge.telegram")

_PEERS_KEPT = 5000  # peers whose access hash the stored state keeps


# --- the persisted session: login key (bots), update position, peers --------------------------
def _state_session_class():
    from telethon.sessions import StringSession
    from telethon.tl import types

    class PersistentStateSession(StringSession):
        """A StringSession whose login and update position survive restarts.

        The file (``data_dir/telegram/update_state.json``, owner-only) records which account it
        belongs to (``bot:<id>`` from the token, or a fingerprint of the user's session string);
        a file of another account is ignored and replaced. A bot has no session string in the
        environment, so its login key is kept here too: a restart then reuses the login instead
        of asking Telegram for a new one (frequent bot logins earn flood waits of many minutes,
        and each login resets the update position). It stores the update state, our own id and
        the ids with access hashes of peers seen (so a bare chat id resolves after a restart);
        never names, usernames or phone numbers.
        """

        def __init__(
            self, string: str | None, state_path: Path, account: str, *, keep_key: bool = False
        ):
            super().__init__(string or None)
            self.state_path = Path(state_path)
            self.account = account
            self.keep_key = keep_key
            self.me: dict[str, Any] = {}
            # Set by the transport: true while messages past Telethon's position have not been
            # handed to the bridge. Then saves keep the last written position (keep-alive and
            # stop alike), so a crash or stop fetches those messages again instead of losing
            # them; the inbox drops any it already has.
            self.position_held: Callable[[], bool] = lambda: False
            self._written_states: dict[str, Any] | None = None
            self._load_state()

        def _load_state(self) -> None:
            try:
                data = json.loads(self.state_path.read_text())
            except FileNotFoundError:
                return
            except (OSError, ValueError) as exc:
                log.warning(
                    "ignoring unreadable Telegram update state %s: %s", self.state_path, exc
                )
                return
            if data.get("account") != self.account:
                log.info("the stored Telegram state belongs to another account: starting afresh")
                return
            if self.keep_key and self.auth_key is None and data.get("session"):
                stored = StringSession(data["session"])
                self.set_dc(stored.dc_id, stored.server_address, stored.port)
                self.auth_key = stored.auth_key
            if self.auth_key is None:
                return  # a position without its login would be asked for unauthorized
            self.me = dict(data.get("me") or {})
            self._written_states = dict(data.get("states", {}))
            for key, state in data.get("states", {}).items():
                self._update_states[int(key)] = types.updates.State(
                    pts=int(state["pts"]),
                    qts=int(state["qts"]),
                    date=datetime.fromtimestamp(float(state["date"]), UTC),
                    seq=int(state["seq"]),
                    unread_count=0,
                )
            for entity_id, entity_hash in data.get("entities", []):
                self._entities.add((int(entity_id), int(entity_hash), None, None, None))

        def forget(self) -> None:
            """Drop the stored login and position (the key is no longer authorized)."""
            self._update_states.clear()
            self._entities.clear()
            self.me = {}
            self.auth_key = None

        def save(self):
            current = {
                str(key): {
                    "pts": s.pts,
                    "qts": s.qts,
                    "date": s.date.timestamp() if s.date else 0,
                    "seq": s.seq,
                }
                for key, s in self._update_states.items()
            }
            # Ids and access hashes only (entity 0 is Telethon's note of our own id); what
            # catch-up needs first (ourselves, channels with a position), then other peers.
            channel_ids = {-1_000_000_000_000 - key for key in self._update_states if key}
            needed = [[e[0], e[1]] for e in self._entities if e[0] == 0 or e[0] in channel_ids]
            others = [
                [e[0], e[1]]
                for e in self._entities
                if e[1] is not None and e[0] != 0 and e[0] not in channel_ids
            ]
            held = self.position_held() and self._written_states is not None
            states = self._written_states if held else current
            self._written_states = states
            data: dict[str, Any] = {
                "account": self.account,
                "me": self.me,
                "states": states,
                "entities": sorted(needed) + sorted(others)[: max(0, _PEERS_KEPT - len(needed))],
            }
            string = super().save() if self.server_address else ""
            if self.keep_key and string:
                data["session"] = string
            write_private(self.state_path, json.dumps(data))
            return string

        def close(self):
            # Telethon's disconnect stores the position into the session and then only closes
            # it: writing here keeps the position of every stop, not just the last keep-alive.
            self.save()

    return PersistentStateSession


def write_private(path: Path, text: str) -> None:
    """Write atomically with owner-only permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def account_of(settings: Settings) -> str:
    """Which account the stored state belongs to: the bot id from the token, or a fingerprint
    of the user's session string (never the secret itself)."""
    if settings.telegram_session is not None:
        secret = settings.telegram_session.get_secret_value().encode()
        return "user:" + hashlib.sha256(secret).hexdigest()[:16]
    token = settings.telegram_bot_token.get_secret_value() if settings.telegram_bot_token else ""
    return "bot:" + token.partition(":")[0]


def make_session(settings: Settings):
    """The session a client should use: the user's string session, or the bot's stored login."""
    cls = _state_session_class()
    string = settings.telegram_session.get_secret_value() if settings.telegram_session else None
    state_path = settings.data_dir / "telegram" / "update_state.json"
    try:
        return cls(string, state_path, account_of(settings), keep_key=string is None)
    except ValueError:
        raise ValorError(
            Category.CONFIG,
            "TELEGRAM_SESSION is not a valid Telethon string session: run `valor login` again.",
        ) from None


def build_client(settings: Settings):
    """A TelegramClient for the configured account; does no network I/O until started."""
    from telethon import TelegramClient

    if settings.telegram_api_id is None or settings.telegram_api_hash is None:
        raise ValorError(
            Category.CONFIG,
            "Telegram needs TELEGRAM_API_ID and TELEGRAM_API_HASH (from my.telegram.org).",
        )
    if settings.telegram_session is None and settings.telegram_bot_token is None:
        raise ValorError(
            Category.CONFIG,
            "Set TELEGRAM_SESSION (run `valor login`) for a user account, or TELEGRAM_BOT_TOKEN "
            "for a bot.",
        )
    client = TelegramClient(
        make_session(settings),
        settings.telegram_api_id,
        settings.telegram_api_hash.get_secret_value(),
        catch_up=settings.telegram_catch_up,
        flood_sleep_threshold=0,
        receive_updates=True,
        # One update at a time: the handler only queues (no download, no network), so this
        # costs nothing and keeps Telegram's order (a photo stays before the question on it).
        sequential_updates=True,
        # The last Telegram error after Telethon's own retries (ServerError, TimedOutError),
        # not a bare ValueError("Request was unsuccessful …"), so it maps to a category.
        raise_last_call_error=True,
    )
    client.parse_mode = None  # text is formatted by bridge.formatting, never re-parsed
    return client
