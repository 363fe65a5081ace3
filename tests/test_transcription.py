"""Voice notes, audio and video notes are heard before the run (servers/core/transcription.py,
bridge/attachments.py): a real OGG/Opus voice note, made here with espeak-ng and opusenc, goes
through Telethon's own dispatcher and download code, the openai SDK and a loopback fake
transcription endpoint; the transcript reaches the prompt and the history store."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from telethon import TelegramClient
from telethon.sessions import StringSession
from telethon.tl import functions, types

from bridge import inbox
from bridge.attachments import TRANSCRIPT_MARK
from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from bridge.telegram import TelegramTransport
from servers.core import history, transcription
from servers.core.errors import Category, ValorError
from servers.core.settings import get_settings
from tests.fakes.anthropic_api import turn_text
from tests.support import configure

ANN = types.User(id=42, access_hash=1, first_name="Ann", last_name="Lee")
ME = 999
NOW = dt.datetime(2026, 11, 30, 7, 0, tzinfo=dt.UTC)
SPOKEN = "please water the tomatoes tomorrow"


@pytest.fixture(scope="module")
def voice_ogg(tmp_path_factory) -> bytes:
    """A real Telegram-style voice note: speech synthesized by espeak-ng, Opus in OGG."""
    if not (shutil.which("espeak-ng") and shutil.which("opusenc")):
        pytest.skip("espeak-ng and opusenc are needed (apt-get install espeak-ng opus-tools)")
    folder = tmp_path_factory.mktemp("voice")
    wav, ogg = folder / "speech.wav", folder / "voice.ogg"
    subprocess.run(["espeak-ng", "-w", str(wav), SPOKEN], check=True, timeout=60)
    subprocess.run(["opusenc", "--quiet", str(wav), str(ogg)], check=True, timeout=60)
    data = ogg.read_bytes()
    assert data[:4] == b"OggS" and b"OpusHead" in data[:64]
    return data


def _transcription_env(monkeypatch, fake_openai, **extra: str) -> None:
    configure(
        monkeypatch,
        VALOR_ALLOWED_USER_IDS=json.dumps([ANN.id]),
        VALOR_TRANSCRIPTION_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_TRANSCRIPTION_API_KEY="sk-test-transcription",
        VALOR_TRANSCRIPTION_MODEL="whisper-test",
        VALOR_OPENAI_MAX_RETRIES="0",
        **extra,
    )


# --- Telegram: a voice note through Telethon's dispatcher and download code ------------------
def _telegram(data: bytes) -> TelegramTransport:
    """The transport with a client that never connects: Telethon's own download code asks
    ``_call`` for the file's chunks (upload.getFile), answered here from ``data``."""
    client = TelegramClient(StringSession(), 12345, "0123456789abcdef0123456789abcdef")

    async def call(sender, request, *args, **kwargs):
        assert isinstance(request, functions.upload.GetFileRequest), request
        chunk = data[request.offset : request.offset + request.limit]
        return types.upload.File(type=types.storage.FilePartial(), mtime=0, bytes=chunk)

    client._call = call
    transport = TelegramTransport(client, get_settings())
    transport.set_identity(ME, "ValorBot", bot=True)
    transport.add_handlers()
    transport.authorize = lambda incoming: incoming.sender_id == ANN.id
    return transport


def _recording(transport: TelegramTransport, size: int, *attributes, mime="audio/ogg"):
    document = types.Document(
        id=77,
        access_hash=1,
        file_reference=b"",
        date=NOW,
        mime_type=mime,
        size=size,
        dc_id=transport.client.session.dc_id,
        attributes=list(attributes),
    )
    return types.MessageMediaDocument(document=document)


async def _telegram_voice_note(transport: TelegramTransport, media, *, msg_id: int = 7):
    message = types.Message(
        id=msg_id,
        peer_id=types.PeerUser(ANN.id),
        date=NOW,
        message="",
        from_id=types.PeerUser(ANN.id),
        media=media,
    )
    update = types.UpdateNewMessage(message=message, pts=1, pts_count=1)
    update._entities = {ANN.id: ANN}
    await transport.client._dispatch_update(update)
    if transport._queue.empty():
        return None
    return await transport._complete(transport._queue.get_nowait())


def _voice(seconds: int = 2):
    return types.DocumentAttributeAudio(duration=seconds, voice=True)


@pytest.mark.e2e  # the real Claude Code CLI
async def test_voice_note_is_heard_and_answered(
    store, claude_bin, claude_env, fake_anthropic, fake_openai, voice_ogg, monkeypatch
):
    _transcription_env(
        monkeypatch, fake_openai, VALOR_CLAUDE_BIN=str(claude_bin), VALOR_CLAUDE_MAX_RETRIES="0"
    )
    fake_openai.transcript = "Please water the tomatoes tomorrow."
    fake_anthropic.responder = lambda request: "I will remind you about the tomatoes."
    telegram = _telegram(voice_ogg)
    got = await _telegram_voice_note(telegram, _recording(telegram, len(voice_ogg), _voice()))
    assert got is not None and got.text == "" and len(got.media_paths) == 1
    saved = got.media_paths[0]
    assert saved.name == "42_7_voice.ogg" and saved.read_bytes() == voice_ogg

    chat = MemoryTransport()
    bridge = Bridge(chat, claude_env=claude_env, host_tools=False)
    async with bridge.serving():
        assert await bridge.receive(got) == "queued"
        await asyncio.wait_for(bridge.drain(), 90)

    # The endpoint got the recording as it is (OGG/Opus, named .ogg), through the SDK.
    (upload,) = fake_openai.transcription_uploads
    assert upload.data == voice_ogg and upload.file_name.endswith(".ogg")
    assert upload.fields["model"] == "whisper-test"
    request = fake_openai.requests_to("/v1/audio/transcriptions")[0]
    assert request.headers["authorization"] == "Bearer sk-test-transcription"
    # The model read the transcript, marked as one, in the prompt.
    prompt = turn_text(fake_anthropic.main_requests[-1])
    assert TRANSCRIPT_MARK in prompt and "Please water the tomatoes tomorrow." in prompt
    # The history store has it too, searchable, marked.
    found = history.search_history(store, "water tomatoes", ANN.id)
    assert [(f["message_id"], f["direction"]) for f in found] == [(7, "in")]
    (text,) = store.query("SELECT text FROM messages WHERE message_id = 7")[0]
    assert text.startswith(TRANSCRIPT_MARK)
    # The chat sees a quote of what was heard with the answer; the file stays.
    answer = chat.messages_in(ANN.id)[-1].text
    assert "🎤" in answer and "Please water the tomatoes tomorrow." in answer
    assert answer.rstrip().endswith("I will remind you about the tomatoes.")
    assert saved.read_bytes() == voice_ogg
    assert store.query("SELECT status FROM bridge_inbox")[0]["status"] == "done"


async def test_recording_kinds_the_transport_fetches(valor_env, monkeypatch, fake_openai):
    _transcription_env(monkeypatch, fake_openai)
    telegram = _telegram(b"\x00" * 100)
    cases = [
        ((_voice(),), "audio/ogg", "42_1_voice.ogg"),
        (
            (types.DocumentAttributeVideo(3, 240, 240, round_message=True),),
            "video/mp4",
            "42_2_video_note.mp4",
        ),
        ((types.DocumentAttributeAudio(60, title="Song"),), "audio/mpeg", "42_3_audio.mp3"),
        (
            (types.DocumentAttributeAudio(60), types.DocumentAttributeFilename("talk.m4a")),
            "audio/mp4",
            "42_4_talk.m4a",
        ),
    ]
    for msg_id, (attributes, mime, name) in enumerate(cases, 1):
        media = _recording(telegram, 100, *attributes, mime=mime)
        got = await _telegram_voice_note(telegram, media, msg_id=msg_id)
        assert got is not None and [p.name for p in got.media_paths] == [name]
    # An ordinary video is still not fetched (nothing to answer: the message is dropped).
    plain_video = _recording(
        telegram, 100, types.DocumentAttributeVideo(3, 640, 480), mime="video/mp4"
    )
    assert await _telegram_voice_note(telegram, plain_video, msg_id=9) is None


# --- the endpoint failing: a clear message, the file kept, no run -----------------------------
def _saved_voice(chat_id: int, data: bytes, name: str = "42_7_voice.ogg") -> Path:
    from servers.core.media import chat_folder

    path = chat_folder(get_settings(), chat_id, "telegram") / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("timeout", "did not answer in time"),
        ("500", "failed (HTTP 500)"),
        ("429", "rate limiting"),
    ],
)
async def test_failing_endpoint_tells_the_chat_and_keeps_the_file(
    store, fake_openai, monkeypatch, kind, expected
):
    _transcription_env(monkeypatch, fake_openai, VALOR_TRANSCRIPTION_TIMEOUT_SECONDS="1")
    fake_openai.fail_next(kind, path="/audio/transcriptions")
    voice = _saved_voice(ANN.id, b"OggS fake opus")
    chat = MemoryTransport()
    bridge = Bridge(chat, host_tools=False)  # no run happens: a recording alone was not heard
    async with bridge.serving():
        message = incoming(ANN.id, 7, "", sender_id=ANN.id, media_paths=(voice,))
        assert await bridge.receive(message) == "queued"
        await asyncio.wait_for(bridge.drain(), 30)
    (reply,) = chat.messages_in(ANN.id)
    assert "could not transcribe" in reply.text and expected in reply.text
    assert voice.name in reply.text and reply.reply_to == 7
    assert voice.read_bytes() == b"OggS fake opus"
    assert not transcription.transcript_path(voice).exists()
    row = store.query("SELECT status, error FROM bridge_inbox")[0]
    assert row["status"] == "failed" and expected in row["error"]


async def test_without_an_endpoint_the_chat_is_told_once_and_the_file_saved(store, monkeypatch):
    configure(monkeypatch, VALOR_ALLOWED_USER_IDS=json.dumps([ANN.id]))
    chat = MemoryTransport()
    bridge = Bridge(chat, host_tools=False)
    for message_id in (7, 8):
        voice = _saved_voice(ANN.id, b"OggS", f"42_{message_id}_voice.ogg")
        message = incoming(ANN.id, message_id, "", sender_id=ANN.id, media_paths=(voice,))
        row = inbox.get_row(store, inbox.persist_incoming(store, message))
        heard = await bridge._hear(row, None)  # type: ignore[arg-type]
        assert heard is not None
        prompt_row, _ = heard
        assert "saved but not transcribed" in prompt_row.text and voice.exists()
    hints = [m.text for m in chat.messages_in(ANN.id)]
    assert hints == [transcription.ENABLE_HINT]  # once per chat
    assert "OPENAI_API_KEY" in hints[0] and "VALOR_TRANSCRIPTION_BASE_URL" in hints[0]


# --- long audio ---------------------------------------------------------------------------------
async def test_long_audio_without_ffmpeg_is_a_clear_error(valor_env, fake_openai, monkeypatch):
    _transcription_env(monkeypatch, fake_openai, VALOR_TRANSCRIPTION_MAX_UPLOAD_MB="0.001")
    monkeypatch.setattr(transcription.shutil, "which", lambda name: None)
    voice = _saved_voice(ANN.id, b"OggS" + b"\x00" * 4096)
    with pytest.raises(ValorError) as raised:
        await transcription.transcribe(voice, get_settings())
    assert raised.value.category is Category.CONFIG and "needs ffmpeg" in raised.value.detail
    assert fake_openai.transcription_uploads == []


async def test_long_audio_is_split_within_the_limit(valor_env, fake_openai, voice_ogg, monkeypatch):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg): long audio cannot be split")
    assert len(voice_ogg) > 6000
    limit_mb = 6000 / 1024 / 1024  # the 2 s voice note is "long" here
    _transcription_env(monkeypatch, fake_openai, VALOR_TRANSCRIPTION_MAX_UPLOAD_MB=str(limit_mb))
    parts = iter(["first part.", "second part.", "third part.", "fourth part."])
    fake_openai.transcription_responder = lambda upload: next(parts)
    voice = _saved_voice(ANN.id, voice_ogg)
    heard = await transcription.transcribe(voice, get_settings())
    uploads = fake_openai.transcription_uploads
    assert heard.segments == len(uploads) >= 2
    assert all(len(u.data) <= limit_mb * 1024 * 1024 and u.data[:4] == b"OggS" for u in uploads)
    assert heard.text.startswith("first part.\nsecond part.")
    # Kept beside the recording: asked again (a restarted bridge), no second request.
    again = await transcription.transcribe(voice, get_settings())
    assert again.text == heard.text and len(fake_openai.transcription_uploads) == len(uploads)


async def test_a_message_with_text_still_runs_when_its_recording_fails(
    store, fake_openai, monkeypatch
):
    _transcription_env(monkeypatch, fake_openai)
    fake_openai.fail_next("500", path="/audio/transcriptions")
    voice = _saved_voice(ANN.id, b"OggS fake opus")
    message = incoming(ANN.id, 7, "and this one", sender_id=ANN.id, media_paths=(voice,))
    row = inbox.get_row(store, inbox.persist_incoming(store, message))
    chat = MemoryTransport()
    bridge = Bridge(chat, host_tools=False)
    heard = await bridge._hear(row, bridge.reply_factory(chat, ANN.id, 7))
    assert heard is not None
    prompt_row, quoted = heard
    assert prompt_row.text.startswith("and this one")
    assert "could not be transcribed" in prompt_row.text and "HTTP 500" in prompt_row.text
    await quoted.finish("Here is my answer.")
    (answer,) = chat.messages_in(ANN.id)
    assert answer.text.startswith("⚠️ I could not transcribe the recording")
    assert answer.text.endswith("Here is my answer.") and voice.exists()
