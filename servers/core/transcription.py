"""Speech to text for voice notes, audio files and video notes, before the bridge runs Claude Code.

Any OpenAI-compatible ``/audio/transcriptions`` endpoint through the openai SDK: OpenAI's own
(``whisper-1``, ``gpt-4o-transcribe``) or a local Whisper-compatible server, chosen by
``VALOR_TRANSCRIPTION_BASE_URL`` / ``_MODEL`` / ``_API_KEY`` (the OpenAI ones by default). Errors
are categorized like every OpenAI call (``openai_services.translate_error``).

Formats: the endpoint takes what Telegram sends (OGG/Opus voice notes, M4A, MP3, MP4 video notes)
as they are, so nothing is converted; only the file name's extension is normalized (Telegram's
``.oga`` is OGG, which OpenAI knows by ``.ogg``). A file over the endpoint's request limit
(``VALOR_TRANSCRIPTION_MAX_UPLOAD_MB``, OpenAI: 25 MB) is split by ffmpeg into mono 32 kbit/s
Opus segments that each fit; without ffmpeg such a file is a clear error, and smaller ones need
nothing installed.

A transcript is kept beside its recording (``<file>.transcript.txt``), so a message run again
after a restart does not pay for the same audio twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core.errors import Category, ValorError
from servers.core.openai_services import Service, translate_error

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from servers.core.settings import Settings

log = logging.getLogger("valor.transcription")

TRANSCRIPTION = Service("The transcription service", "VALOR_TRANSCRIPTION_API_KEY")
# Extension → the name and type the endpoint is given (OpenAI decides the format by extension).
AUDIO_TYPES = {
    ".ogg": (".ogg", "audio/ogg"),
    ".oga": (".ogg", "audio/ogg"),
    ".opus": (".ogg", "audio/ogg"),
    ".mp3": (".mp3", "audio/mpeg"),
    ".mpga": (".mpga", "audio/mpeg"),
    ".mpeg": (".mpeg", "audio/mpeg"),
    ".m4a": (".m4a", "audio/mp4"),
    ".mp4": (".mp4", "video/mp4"),  # Telegram's video notes
    ".wav": (".wav", "audio/wav"),
    ".webm": (".webm", "audio/webm"),
    ".flac": (".flac", "audio/flac"),
}
TRANSCRIPT_SUFFIX = ".transcript.txt"
SEGMENT_BITRATE = 32_000  # bit/s of the Opus segments a long file is cut into
SEGMENT_FILL = 0.9  # a segment's planned size against the limit (Ogg overhead, VBR peaks)
ENABLE_HINT = (
    "I saved your voice message but cannot listen to it: transcription is not set up. The "
    "operator can enable it by setting OPENAI_API_KEY (OpenAI's Whisper), or "
    "VALOR_TRANSCRIPTION_BASE_URL and VALOR_TRANSCRIPTION_MODEL for a local Whisper-compatible "
    "server. I tell each chat this once."
)


@dataclass(frozen=True)
class Transcript:
    path: Path
    text: str
    segments: int  # requests it took (1 unless the file was split)


def is_audio(path: Path) -> bool:
    """A recording the bridge transcribes: voice notes, audio files, video notes (by extension,
    which the Telegram transport sets from the media kind)."""
    return path.suffix.lower() in AUDIO_TYPES


def configured(settings: Settings) -> bool:
    """An endpoint is known: its own URL (a local server may need no key) or an API key."""
    return bool(
        settings.transcription_base_url or settings.transcription_api_key or settings.openai_api_key
    )


def client_for(settings: Settings) -> AsyncOpenAI:
    from openai import AsyncOpenAI

    key = settings.transcription_api_key or settings.openai_api_key
    return AsyncOpenAI(
        # A local server without keys still gets a header; the SDK refuses no key at all.
        api_key=key.get_secret_value() if key is not None else "none",
        base_url=settings.transcription_base_url or settings.openai_base_url,
        timeout=settings.transcription_timeout_seconds,
        max_retries=settings.openai_max_retries,
    )


def transcript_path(path: Path) -> Path:
    return path.with_name(path.name + TRANSCRIPT_SUFFIX)


async def transcribe(path: Path, settings: Settings) -> Transcript:
    """The recording's text (cached beside it). Raises a categorized ValorError; the recording
    itself is never touched."""
    cached = transcript_path(path)
    if cached.is_file():
        return Transcript(path, cached.read_text(encoding="utf-8"), 0)
    if not configured(settings):
        raise ValorError(Category.CONFIG, ENABLE_HINT)
    limit = int(settings.transcription_max_upload_mb * 1024 * 1024)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValorError(Category.FILE, f"Cannot read the recording: {exc.strerror}.") from None
    client = client_for(settings)
    try:
        if size <= limit:
            texts = [await _request(client, settings, path)]
        else:
            with tempfile.TemporaryDirectory(prefix="valor-audio-", dir=path.parent) as scratch:
                parts = await split_audio(path, Path(scratch), limit)
                texts = [await _request(client, settings, part) for part in parts]
    finally:
        await client.close()
    text = "\n".join(t.strip() for t in texts if t.strip())
    cached.write_text(text, encoding="utf-8")
    cached.chmod(0o600)
    return Transcript(path, text, len(texts))


async def _request(client: AsyncOpenAI, settings: Settings, path: Path) -> str:
    name, mime = AUDIO_TYPES.get(path.suffix.lower(), (path.suffix, "application/octet-stream"))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValorError(Category.FILE, f"Cannot read the recording: {exc.strerror}.") from None
    try:
        result = await client.audio.transcriptions.create(
            model=settings.transcription_model,
            file=(path.stem + name, data, mime),
            response_format="json",
        )
        text = result.text
        if not isinstance(text, str):
            raise ValueError("no text in the transcription")
    except Exception as exc:
        raise translate_error(exc, TRANSCRIPTION) from None
    return text


async def split_audio(path: Path, folder: Path, limit_bytes: int) -> list[Path]:
    """Cut ``path`` into Opus segments under ``limit_bytes`` each with ffmpeg (audio only, so a
    video note loses its picture, not its words)."""
    ffmpeg = shutil.which("ffmpeg")
    megabytes = path.stat().st_size / 1024 / 1024
    if ffmpeg is None:
        raise ValorError(
            Category.CONFIG,
            f"The recording is {megabytes:.1f} MB, over the transcription limit of "
            f"{limit_bytes / 1024 / 1024:.1f} MB per request; splitting it needs ffmpeg, which "
            "is not installed (apt-get install ffmpeg).",
        )
    seconds = max(0.5, math.floor(limit_bytes * 8 * SEGMENT_FILL / SEGMENT_BITRATE * 100) / 100)
    process = await asyncio.create_subprocess_exec(
        ffmpeg,
        *("-nostdin", "-loglevel", "error", "-i", str(path), "-vn", "-ac", "1"),
        *("-c:a", "libopus", "-b:a", str(SEGMENT_BITRATE), "-vbr", "constrained"),
        *("-f", "segment", "-segment_time", str(seconds), str(folder / "part%04d.ogg")),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await process.communicate()
    parts = sorted(folder.glob("part*.ogg"))
    if process.returncode != 0 or not parts:
        detail = errors.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ValorError(Category.INPUT, f"ffmpeg could not read the recording: {detail[0]}")
    too_big = [p for p in parts if p.stat().st_size > limit_bytes]
    if too_big:
        raise ValorError(
            Category.INTERNAL, "A split part of the recording is still over the limit."
        )
    log.info("split a %.1f MB recording into %d parts", megabytes, len(parts))
    return parts


def quote(text: str, max_chars: int = 200) -> str:
    """What the chat sees of a transcript: a short quote."""
    flat = " ".join(text.split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 1].rstrip() + "…"
