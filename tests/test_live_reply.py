"""LiveReply (bridge/live.py): coalesced edits, flood waits per chat, finals that always arrive."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from bridge.formatting import FormattedText
from bridge.live import LiveReply, live_reply_factory, tool_label
from bridge.rate import Limits, RateController
from bridge.transport import ReplySink, SentMessage
from servers.core.errors import Category, ValorError
from servers.core.settings import get_settings
from tests.support import configure, wait_until_async

FAST = Limits(time_scale=0.02)  # one call per 22 ms per chat


class RecordingTransport:
    """An in-memory chat network that records every call; failures can be queued per call kind."""

    def __init__(self) -> None:
        self.messages: dict[tuple[int, int], str] = {}
        self.calls: list[tuple[str, int, str, float]] = []
        self.entities_seen: list[tuple] = []
        self.failures: dict[str, list[Exception]] = {"send": [], "edit": [], "file": []}
        self.deleted: list[SentMessage] = []
        self.signals: list[tuple[int, str]] = []
        self.reply_tos: list[int | None] = []
        self._next_id = 100

    def _fail(self, kind: str) -> None:
        if self.failures[kind]:
            raise self.failures[kind].pop(0)

    async def send_text(self, chat_id, text, *, reply_to=None):
        self._fail("send")
        self._next_id += 1
        self.messages[(chat_id, self._next_id)] = str(text)
        self.entities_seen.append(getattr(text, "entities", ()))
        self.calls.append(("send", chat_id, str(text), time.monotonic()))
        self.reply_tos.append(reply_to)
        return SentMessage(chat_id, self._next_id)

    async def edit_text(self, message, text):
        self._fail("edit")
        self.messages[(message.chat_id, message.message_id)] = str(text)
        self.calls.append(("edit", message.chat_id, str(text), time.monotonic()))

    async def send_file(self, chat_id, path, *, caption="", reply_to=None):
        self._fail("file")
        self._next_id += 1
        self.calls.append(("file", chat_id, str(path), time.monotonic()))
        return SentMessage(chat_id, self._next_id)

    async def delete_message(self, message):
        self.deleted.append(message)
        self.messages.pop((message.chat_id, message.message_id), None)

    async def signal(self, chat_id, kind, *, message_id=None):
        self.signals.append((chat_id, kind))

    def sent(self, kind: str, chat_id: int | None = None) -> list[str]:
        return [c[2] for c in self.calls if c[0] == kind and chat_id in (None, c[1])]


def flood(seconds: float) -> ValorError:
    return ValorError(Category.RATE_LIMIT, "Telegram asked to wait", retry_after=seconds)


def reply(transport, chat_id=1, reply_to=55, rate=None, **kwargs) -> LiveReply:
    return LiveReply(
        transport,
        chat_id,
        reply_to,
        rate=rate or RateController(FAST),
        retry_backoff=0.01,
        **kwargs,
    )


async def test_live_reply_is_a_reply_sink():
    assert isinstance(reply(RecordingTransport()), ReplySink)


async def test_bursts_of_text_coalesce_and_the_newest_text_is_shown():
    transport = RecordingTransport()
    # One call per 220 ms: the burst would have to last 13 s for 60 previews to fit.
    live = reply(transport, rate=RateController(Limits(time_scale=0.2)))
    answer = ""
    for i in range(200):
        answer += f"w{i} "
        await live.text(answer)
        await asyncio.sleep(0)  # the preview task gets its turns during the burst

    def previews() -> list[str]:
        return transport.sent("send") + transport.sent("edit")

    # the newest text reaches the chat
    await wait_until_async(lambda: previews()[-1:] and previews()[-1].strip().endswith("w199"))
    assert len(previews()) < 60  # far fewer calls than updates
    stamps = [c[3] for c in transport.calls]
    assert min(b - a for a, b in itertools.pairwise(stamps)) >= 0.22 * 0.9


async def test_unchanged_text_is_not_sent_again():
    transport = RecordingTransport()
    live = reply(transport)
    await live.text("same")
    await wait_until_async(lambda: transport.calls)
    for _ in range(5):
        await live.text("same")
        await asyncio.sleep(0.03)  # room for a wrong resend (one call per 22 ms is allowed)
    assert len(transport.calls) == 1


async def test_tool_progress_shows_in_the_live_message():
    transport = RecordingTransport()
    live = reply(transport, typing=True)
    await live.tool_progress("mcp__social-tools__search_current_info", "weather in Paris")
    await wait_until_async(lambda: transport.sent("send"))
    assert transport.sent("send") == ["🔎 search_current_info weather in Paris…"]
    assert (1, "typing") in transport.signals
    await live.text("It is sunny.")
    await wait_until_async(lambda: transport.sent("edit"))
    assert transport.sent("edit")[-1].startswith("It is sunny.\n\n🔎 search_current_info")


def test_tool_labels():
    assert tool_label("mcp__social-tools__create_image") == "🎨 create_image"
    assert tool_label("Bash") == "💻 Bash"
    assert tool_label("mystery") == "🔧 mystery"


async def test_final_is_a_fresh_message_and_the_preview_goes():
    transport = RecordingTransport()
    live = reply(transport)
    await live.text("Working on **it**")
    await wait_until_async(lambda: transport.sent("send"))
    assert len(transport.sent("send")) == 1  # the preview
    await live.finish("Done: **all good**")
    sends = transport.sent("send")
    assert sends[-1] == "Done: all good"  # formatted, as a new (notifying) message
    assert transport.reply_tos[-1] == 55
    assert any(e.type == "bold" for e in transport.entities_seen[-1])
    await live.settled()
    assert len(transport.deleted) == 1  # the preview is removed
    assert list(transport.messages.values()) == ["Done: all good"]


async def test_fast_answer_without_preview_is_just_sent():
    transport = RecordingTransport()
    live = reply(transport)
    await live.finish("Quick answer")
    assert transport.sent("send") == ["Quick answer"] and not transport.deleted


async def test_long_final_is_split_and_only_the_first_part_replies():
    transport = RecordingTransport()
    live = reply(transport)
    await live.finish("\n\n".join("paragraph " * 300 for _ in range(4)))
    assert len(transport.sent("send")) >= 3
    assert transport.reply_tos[0] == 55 and set(transport.reply_tos[1:]) == {None}


async def test_flood_wait_on_one_chat_does_not_stop_another():
    transport = RecordingTransport()
    rate = RateController(FAST)
    slow = reply(transport, chat_id=1, rate=rate)
    fast = reply(transport, chat_id=2, rate=rate)
    await slow.text("first")
    await fast.text("first")
    await wait_until_async(lambda: len(transport.sent("send")) == 2)
    transport.failures["edit"].append(flood(1.0))  # the next edit (chat 1's) is refused
    await slow.text("second")
    await wait_until_async(lambda: slow.flood_waits == 1)
    blocked_until = time.monotonic() + rate.blocked_for(1)
    for i in range(5):
        await fast.text(f"fast {i}")
        await wait_until_async(lambda i=i: transport.sent("edit", 2)[-1:] == [f"fast {i}"])
    chat_2_edits = [c[3] for c in transport.calls if c[0] == "edit" and c[1] == 2]
    assert chat_2_edits[0] < blocked_until  # chat 2 kept streaming while chat 1 waited
    await wait_until_async(lambda: transport.sent("edit", 1) == ["second"])  # retried
    retry_time = [c[3] for c in transport.calls if c[0] == "edit" and c[1] == 1][-1]
    assert retry_time >= blocked_until - 0.01  # not before retry_after (0.01: clock reads)
    assert slow.flood_waits == 1


async def test_final_survives_repeated_flood_waits():
    transport = RecordingTransport()
    live = reply(transport)
    transport.failures["send"] = [flood(0.1), flood(0.2), flood(0.1)]
    start = time.monotonic()
    await live.finish("the answer")
    assert transport.sent("send") == ["the answer"]
    assert time.monotonic() - start >= 0.4 and live.flood_waits == 3


async def test_final_retries_transient_errors_then_gives_up_loudly():
    transport = RecordingTransport()
    live = reply(transport)
    transport.failures["send"] = [ConnectionError("reset"), ValorError(Category.TIMEOUT, "slow")]
    await live.finish("after two failures")
    assert transport.sent("send") == ["after two failures"]

    stubborn = RecordingTransport()
    stubborn.failures["send"] = [ConnectionError("down")] * 100
    give_up = reply(stubborn, final_retry_seconds=0.05)
    with pytest.raises(ValorError) as caught:
        await give_up.finish("never arrives")
    assert caught.value.category is Category.UPSTREAM


async def test_permanent_error_is_raised_at_once():
    transport = RecordingTransport()
    transport.failures["send"] = [ValorError(Category.INPUT, "chat not found")]
    with pytest.raises(ValorError) as caught:
        await reply(transport).finish("x")
    assert caught.value.category is Category.INPUT


async def test_only_files_in_the_media_dir_are_uploaded(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    image = media / "cat.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not send")
    transport = RecordingTransport()
    live = reply(transport, allowed_file_roots=[media])
    await live.finish(
        "Here it is", [image, secret, media / "missing.png", media / ".." / "secret.txt"]
    )
    assert transport.sent("file") == [str(image.resolve())]


async def test_fail_tells_the_user():
    transport = RecordingTransport()
    await reply(transport).fail("Claude Code timed out after 900 s.")
    assert transport.sent("send") == ["⚠️ Claude Code timed out after 900 s."]


async def test_updates_after_finish_are_ignored():
    transport = RecordingTransport()
    live = reply(transport)
    await live.finish("final")
    await live.text("late text")
    await asyncio.sleep(0.03)  # room for a wrong preview; a slow machine can only hide one
    assert transport.sent("send") == ["final"] and not transport.sent("edit")


async def test_factory_uses_settings_and_shares_one_controller(monkeypatch):
    configure(monkeypatch, VALOR_TELEGRAM_TYPING="false")
    make = live_reply_factory()
    a, b = make(RecordingTransport(), 1, 2), make(RecordingTransport(), -100, None)
    assert a.rate is b.rate and not a.typing
    assert b.is_group and not a.is_group
    # Each reply uploads only from its own chat's media folder.
    assert a.allowed_file_roots == [get_settings().chat_media_path(1).resolve()]
    assert b.allowed_file_roots == [get_settings().chat_media_path(-100).resolve()]


def test_formatted_text_survives_plain_concatenation():
    assert FormattedText("a") + "b" == "ab"


class NoDeleteTransport(RecordingTransport):
    delete_message = None  # a transport that cannot delete


async def test_without_delete_the_preview_becomes_the_tool_summary():
    transport = NoDeleteTransport()
    live = reply(transport)
    await live.tool_progress("mcp__social-tools__create_image")
    await wait_until_async(lambda: transport.sent("send"))  # the preview is shown
    await live.finish("Here is your picture.")
    await live.settled()
    assert list(transport.messages.values()) == ["🎨 create_image ✓", "Here is your picture."]


async def test_attached_tool_images_are_uploaded_once_with_the_final(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    image = media / "made.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    transport = RecordingTransport()
    live = reply(transport, allowed_file_roots=[media])
    live.attach_files([image])
    await live.finish("Your picture:", [image])
    assert transport.sent("send") == ["Your picture:"]
    assert transport.sent("file") == [str(image.resolve())]
    assert live.message_id == 101


async def test_a_broken_preview_never_costs_the_final_answer():
    transport = RecordingTransport()
    transport.failures["send"] = [LookupError("odd transport failure")]
    live = reply(transport)
    await live.text("first")
    await wait_until_async(lambda: not transport.failures["send"])  # the preview broke
    await live.text("second")
    await wait_until_async(lambda: transport.sent("send") == ["second"])  # previews go on
    await live.finish("final")
    assert transport.sent("send")[-1] == "final"


async def test_failure_keeps_the_partial_answer():
    transport = RecordingTransport()
    live = reply(transport)
    await live.text("Half of the answer")
    await live.fail("Claude Code stopped.")
    assert transport.sent("send")[-1] == "Half of the answer\n\n⚠️ Claude Code stopped."


class SlowTransport(RecordingTransport):
    def __init__(self) -> None:
        super().__init__()
        self.first_send_started = asyncio.Event()

    async def send_text(self, chat_id, text, *, reply_to=None):
        if not self.calls:
            self.first_send_started.set()
            await asyncio.sleep(0.1)  # the first preview is still on its way when finish comes
        return await super().send_text(chat_id, text, reply_to=reply_to)


async def test_a_preview_in_flight_at_finish_is_not_left_behind():
    transport = SlowTransport()
    live = reply(transport)
    await live.text("thinking")
    await asyncio.wait_for(transport.first_send_started.wait(), 30)
    await live.finish("answer")
    await live.settled()
    assert transport.sent("send") == ["thinking", "answer"]
    assert list(transport.messages.values()) == ["answer"]  # the preview was deleted
