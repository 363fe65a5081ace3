"""Importing chat history: Telegram Desktop exports and JSON lines, into the conversation store.

Two formats:

- Telegram Desktop's ``result.json`` ("Export chat history", or "Export Telegram data" for a full
  export with ``chats.list`` and ``left_chats.list``). A message's ``text`` is a string or a list
  of entity segments (strings and ``{"type", "text", "href"?}`` objects); service messages
  (``"type": "service"``) become a bracketed line naming the action; media become placeholders
  (``[photo]``, ``[voice message, 4 s]``, ``[file: report.pdf]``) before any caption; forwarded
  messages say whom from. Chat ids are Telegram's marked ids (a group's negative id, a
  supergroup's or channel's -100… id), the ids the bridge records, so imported history and live
  history meet in one chat.
- JSON lines, one message a line: ``{"chat_id", "message_id", "sender", "date", "text"}`` (date as
  Unix seconds or ISO 8601; optional ``direction`` "in"/"out" and ``sender_id``).

The whole file is read and checked before anything is written; a problem is an ``ImportFileError``
naming the file, the place (``line 12``, ``chats.list[3].messages[41]``) and what is wrong. Then
every message is written in one transaction (in batches, so progress can be reported): a failure
midway leaves the store as it was. Importing the same file again adds nothing (messages are keyed
by chat and message id), and the chat memory learns from the new messages as they are written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from servers.core import history
from servers.core.store import Store

BATCH = 20_000
Progress = Callable[[int, int], None]  # (messages written so far, messages in the file)

# Telegram Desktop's chat types, and how each maps to the id the Bot API and Telethon use.
_USER_TYPES = {"personal_chat", "bot_chat", "saved_messages", "self"}
_GROUP_TYPES = {"private_group"}
_CHANNEL_TYPES = {"private_supergroup", "public_supergroup", "private_channel", "public_channel"}

_MEDIA = {
    "sticker": "sticker",
    "animation": "GIF",
    "video_file": "video",
    "video_message": "video message",
    "voice_message": "voice message",
    "audio_file": "audio",
}


class ImportFileError(ValueError):
    """The file cannot be imported; the text names the file, the place and the problem."""


@dataclass(frozen=True)
class ImportResult:
    path: str
    format: str  # "telegram-desktop" or "json-lines"
    chats: int
    messages: int  # messages in the file
    added: int  # new in the store
    memory_items: int  # chat memory rows after the import, for the chats imported


def read_messages(path: Path | str, chat_id: int | None = None) -> tuple[str, list[tuple]]:
    """Parse and check a file; returns its format and the rows ``history.write_rows`` takes.

    ``chat_id`` puts every message of a single-chat file into that chat (a full export, with
    many chats, cannot be given one)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ImportFileError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise ImportFileError(f"{path}: is a folder; give the result.json file in it.") from None
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{path}: not UTF-8 text (byte {exc.start}).") from None
    if not text.strip():
        raise ImportFileError(f"{path}: the file is empty.")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole:
        if _first_line_is_object(text):  # JSON lines (or a JSON-lines file with a bad line)
            return "json-lines", _json_lines(path, text, chat_id)
        raise ImportFileError(
            f"{path}: not valid JSON (line {whole.lineno}, column {whole.colno}: {whole.msg})."
        ) from None
    if isinstance(document, dict) and "message_id" in document and "messages" not in document:
        return "json-lines", _json_lines(path, text, chat_id)  # a JSON-lines file of one line
    return "telegram-desktop", _telegram_export(path, document, chat_id)


def import_file(
    store: Store,
    path: Path | str,
    *,
    chat_id: int | None = None,
    progress: Progress | None = None,
    batch: int = BATCH,
) -> ImportResult:
    """Import ``path`` into the store in one transaction (see the module text)."""
    kind, rows = read_messages(path, chat_id)
    chats = sorted({row[0] for row in rows})
    added = 0
    if progress:
        progress(0, len(rows))
    with store.transaction() as conn:
        for offset in range(0, len(rows), batch):
            added += history.write_rows(conn, rows[offset : offset + batch])
            if progress:
                progress(min(offset + batch, len(rows)), len(rows))
    memory = sum(
        store.query("SELECT count(*) FROM chat_memory WHERE chat_id = ?", (chat,))[0][0]
        for chat in chats
    )
    return ImportResult(str(path), kind, len(chats), len(rows), added, memory)


def _first_line_is_object(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


# -- JSON lines ----------------------------------------------------------------------------------
def _json_lines(path: Path, text: str, chat_id: int | None) -> list[tuple]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_json_line(line, chat_id))
        except _Bad as exc:
            raise ImportFileError(f"{path}: line {number}: {exc}") from None
    if not rows:
        raise ImportFileError(f"{path}: no messages in the file.")
    return rows


def _json_line(line: str, chat_id: int | None) -> tuple:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _Bad(f"not valid JSON ({exc.msg}, column {exc.colno}).") from None
    if not isinstance(item, dict):
        raise _Bad("expected an object with chat_id, message_id, date, text.")
    missing = [key for key in ("chat_id", "message_id", "date", "text") if key not in item]
    if missing and not (missing == ["chat_id"] and chat_id is not None):
        raise _Bad(f"missing {', '.join(missing)}.")
    direction = item.get("direction", "in")
    if direction not in ("in", "out"):
        raise _Bad(f"direction must be 'in' or 'out', not {direction!r}.")
    sender_id = item.get("sender_id")
    return (
        chat_id if chat_id is not None else _whole(item["chat_id"], "chat_id"),
        _whole(item["message_id"], "message_id"),
        _sender(item.get("sender")),
        None if sender_id is None else _whole(sender_id, "sender_id"),
        direction,
        _text(item["text"]),
        _date(item["date"]),
    )


# -- Telegram Desktop ----------------------------------------------------------------------------
def _telegram_export(path: Path, document: Any, chat_id: int | None) -> list[tuple]:
    if not isinstance(document, dict):
        raise ImportFileError(
            f"{path}: not a Telegram Desktop export (the top level is not an object)."
        )
    chats = list(_chats(path, document))
    if not chats:
        raise ImportFileError(
            f"{path}: not a Telegram Desktop export: no 'messages' list, and no 'chats.list' of "
            "a full export. Export a chat as JSON (Telegram Desktop: ⋮ → Export chat history → "
            "Format: JSON), or give JSON lines of {chat_id, message_id, sender, date, text}."
        )
    if chat_id is not None and len(chats) > 1:
        raise ImportFileError(
            f"{path}: a full export holds {len(chats)} chats; a chat id can only be given for one."
        )
    rows: list[tuple] = []
    for where, chat in chats:
        try:
            target = chat_id if chat_id is not None else _chat_id(chat)
        except _Bad as exc:
            raise ImportFileError(f"{path}: {where}: {exc}") from None
        messages = chat.get("messages")
        if not isinstance(messages, list):
            raise ImportFileError(f"{path}: {where}.messages is not a list.")
        k = 0
        try:
            for k, message in enumerate(messages):  # noqa: B007 (k names the bad message)
                row = _export_row(message, target)
                if row is not None:
                    rows.append(row)
        except _Bad as exc:
            raise ImportFileError(f"{path}: {where}.messages[{k}]: {exc}") from None
    return rows


def _chats(path: Path, document: dict) -> Iterator[tuple[str, dict]]:
    if "messages" in document:
        yield "chat", document
        return
    for section in ("chats", "left_chats"):
        container = document.get(section)
        if container is None:
            continue
        listed = container.get("list") if isinstance(container, dict) else None
        if not isinstance(listed, list):
            raise ImportFileError(f"{path}: {section}.list is missing or not a list.")
        for k, chat in enumerate(listed):
            if not isinstance(chat, dict):
                raise ImportFileError(f"{path}: {section}.list[{k}] is not an object.")
            yield f"{section}.list[{k}]", chat


def _chat_id(chat: dict) -> int:
    """Telegram's marked id: a user's id, a basic group's negative id, -100… for the rest."""
    raw = _whole(chat.get("id"), "id")
    kind = chat.get("type", "personal_chat")
    if kind in _USER_TYPES:
        return raw
    if kind in _GROUP_TYPES:
        return -raw
    if kind in _CHANNEL_TYPES:
        return -(10**12 + raw)
    raise _Bad(f"unknown chat type {kind!r}.")


def _export_row(message: Any, chat_id: int) -> tuple | None:
    """One message of an export as a row (None for a kind this version does not know)."""
    if type(message) is not dict:
        raise _Bad("not an object.")
    get = message.get
    message_id = get("id")
    if type(message_id) is not int:
        message_id = _whole(message_id, "id")
    unixtime = get("date_unixtime")
    if unixtime is not None:
        sent_at = float(_whole(unixtime, "date_unixtime"))
    elif "date" in message:
        sent_at = _date(message["date"])
    else:
        raise _Bad("no date.")
    kind = get("type", "message")
    text = get("text", "")
    if type(text) is not str:
        text = _text(text)
    if kind == "message":
        sender = _sender(get("from"))
        if not _MEDIA_KEYS.isdisjoint(message):
            text = f"{_media(message)} {text}".rstrip()
        forwarded = get("forwarded_from")
        if forwarded:
            text = f"[forwarded from {forwarded}] {text}".rstrip()
        peer = get("from_id")
    elif kind == "service":
        sender = _sender(get("actor"))
        text = _service_text(message, text)
        peer = get("actor_id")
    else:
        return None  # a kind this version does not know: skipped, not guessed
    return (
        chat_id,
        message_id,
        sender,
        _peer_number(peer),
        "in",
        text or "[empty message]",
        sent_at,
    )


def _service_text(message: dict, text: str) -> str:
    action = str(message.get("action") or "service").replace("_", " ")
    details = [
        str(message[key])
        for key in ("title", "inviter", "game_title", "reason_domain")
        if message.get(key)
    ]
    members = message.get("members")
    if isinstance(members, list) and members:
        details.append(", ".join(str(m) for m in members if m))
    body = f"[service: {action}{': ' + '; '.join(details) if details else ''}]"
    return f"{body} {text}".rstrip()


_MEDIA_KEYS = frozenset(
    {"photo", "media_type", "file", "poll", "contact_information", "location_information"}
)


def _media(message: dict) -> str:
    """A placeholder for the message's media (the files are not imported)."""
    if "photo" in message:
        return "[photo]"
    kind = message.get("media_type")
    if kind in _MEDIA:
        label = _MEDIA[kind]
        if kind == "sticker" and message.get("sticker_emoji"):
            label += f" {message['sticker_emoji']}"
        seconds = message.get("duration_seconds")
        if isinstance(seconds, int):
            label += f", {seconds} s"
        return f"[{label}]"
    if "file" in message or kind:
        name = message.get("file_name") or (kind or "file")
        return f"[file: {name}]"
    if isinstance(message.get("poll"), dict):
        return f"[poll: {message['poll'].get('question', '')}]"
    if isinstance(message.get("contact_information"), dict):
        return "[contact]"
    if isinstance(message.get("location_information"), dict):
        place = message["location_information"]
        return f"[location {place.get('latitude')}, {place.get('longitude')}]"
    return ""


# -- values --------------------------------------------------------------------------------------
class _Bad(ValueError):
    """A value is wrong; the caller adds where (``ImportFileError``)."""


def _text(value: Any) -> str:
    """A string, or Telegram's list of entity segments (strings and {type, text, href})."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for k, segment in enumerate(value):
            if isinstance(segment, str):
                parts.append(segment)
            elif isinstance(segment, dict) and isinstance(segment.get("text", ""), str):
                part = segment.get("text", "")
                href = segment.get("href")
                if href and href != part:
                    part = f"{part} ({href})"
                parts.append(part)
            else:
                raise _Bad(f"text[{k}] is neither a string nor a segment.")
        return "".join(parts)
    if value is None:
        return ""
    raise _Bad("text must be a string or a list of segments.")


def _whole(value: Any, field: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    elif isinstance(value, float) and value.is_integer():
        return int(value)
    shown = "missing" if value is None else f"{value!r}"
    raise _Bad(f"{field} must be a whole number ({shown}).")


def _sender(value: Any) -> str:
    if type(value) is str:
        return value
    if value is None:
        return ""  # a deleted account
    raise _Bad("the sender must be text.")


def _peer_number(value: Any) -> int | None:
    """``user123`` → 123 (Telegram Desktop's from_id); anything else → None."""
    if type(value) is str and value.startswith("user") and value[4:].isdigit():
        return int(value[4:])
    return None


def _date(value: Any) -> float:
    """Unix seconds, or ISO 8601 (Telegram Desktop's ``date`` is local time, without a zone)."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                seconds = None
    if seconds is not None and 0 <= seconds < 1e11:  # finite, from 1970 to year 5000
        return seconds
    raise _Bad(f"date {value!r} is neither Unix seconds nor ISO 8601.")
