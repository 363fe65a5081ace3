"""Files around a run: images a tool produced (so the reply can upload them), and recordings
a message brought (voice notes, audio, video notes), heard before the run.

Only ``create_image`` results count, and only paths that resolve to an existing image file inside
the media directory: a tool result is model-influenced text, and nothing else on the machine may
leave it because a path appeared there.

Recordings are transcribed by ``servers.core.transcription``; ``Heard`` says what goes into the
prompt and the history (marked as a transcript) and what the chat sees with the answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.transport import ReplySink
from servers.core.media import chat_folder, sniff_image_type

if TYPE_CHECKING:
    from servers.core.settings import Settings
    from servers.core.transcription import Transcript

IMAGE_TOOLS = ("create_image",)
_PATH_IN_TEXT = re.compile(r"""(/[^\s"'`<>]+?\.(?:png|jpe?g|gif|webp))""", re.IGNORECASE)


def is_image_tool(tool_name: str) -> bool:
    """``create_image`` or Claude Code's ``mcp__social-tools__create_image``."""
    return tool_name.rsplit("__", 1)[-1] in IMAGE_TOOLS


def _candidates(content: str) -> list[str]:
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        return [data["path"]]
    return _PATH_IN_TEXT.findall(content)


def generated_images(tool_name: str, content: str, media_root: Path) -> list[Path]:
    """The image files a create_image result names, confined to ``media_root``."""
    if not is_image_tool(tool_name):
        return []
    root = media_root.resolve()
    found: list[Path] = []
    for raw in _candidates(content):
        path = Path(raw).resolve()
        if not path.is_relative_to(root) or not path.is_file() or path in found:
            continue
        with path.open("rb") as handle:
            if sniff_image_type(handle.read(16)) is None:
                continue
        found.append(path)
    return found


# -- recordings ---------------------------------------------------------------------------------
TRANSCRIPT_MARK = "[Voice transcript]"  # marks heard text in the prompt and the history
HINT_MARKER = ".transcription-hint-sent"  # in the chat's media folder: the chat was told once


@dataclass(frozen=True)
class Heard:
    """What the recordings of one message said, or why they could not be heard."""

    transcripts: tuple[Transcript, ...] = ()
    failures: tuple[tuple[Path, str], ...] = ()  # (recording, the error a person can act on)
    unconfigured: tuple[Path, ...] = ()  # no endpoint: saved, not heard

    def with_transcripts(self, text: str) -> str:
        """The message text with each transcript after it, marked (prompt and history)."""
        parts = [text] if text.strip() else []
        for transcript in self.transcripts:
            parts.append(
                f"{TRANSCRIPT_MARK} (speech-to-text of {transcript.path.name}; it may contain "
                f"recognition errors)\n{transcript.text or '(no speech recognised)'}"
            )
        return "\n\n".join(parts)

    def prompt_text(self, text: str) -> str:
        parts = [self.with_transcripts(text)] if text.strip() or self.transcripts else []
        for path, error in self.failures:
            parts.append(f"[The recording {path.name} could not be transcribed: {error}]")
        for path in self.unconfigured:
            parts.append(
                f"[The recording {path.name} was saved but not transcribed: no transcription "
                "service is configured]"
            )
        return "\n\n".join(parts)

    def chat_quote(self) -> str:
        """Markdown the answer starts with: a short quote of what was heard, and any failure."""
        from servers.core.transcription import quote

        lines = [f"> 🎤 “{quote(t.text)}”" for t in self.transcripts if t.text.strip()]
        lines += [f"⚠️ {failure_text(path, error)}" for path, error in self.failures]
        return "\n".join(lines) + "\n\n" if lines else ""


def failure_text(path: Path, error: str) -> str:
    return (
        f"I could not transcribe the recording: {error} It is saved ({path.name}); send it "
        "again later, or type the message."
    )


async def hear_recordings(paths: tuple[Path, ...], chat_id: int, settings: Settings) -> Heard:
    """Transcribe the message's recordings (only those inside the chat's own media folder)."""
    from servers.core.errors import ValorError, mask_unexpected, redact
    from servers.core.transcription import configured, is_audio, transcribe

    recordings = [p for p in paths if is_audio(p)]
    root = settings.chat_media_path(chat_id).resolve() if recordings else None
    recordings = [p for p in recordings if root and p.resolve().is_relative_to(root)]
    if not recordings:
        return Heard()
    if not configured(settings):
        return Heard(unconfigured=tuple(recordings))
    transcripts: list[Transcript] = []
    failures: list[tuple[Path, str]] = []
    for path in recordings:
        try:
            transcripts.append(await transcribe(path, settings))
        except ValorError as exc:
            failures.append((path, redact(exc.detail)))
        except Exception as exc:  # e.g. the transcript could not be written: the file stays
            failures.append((path, mask_unexpected(exc, "transcription").detail))
    return Heard(tuple(transcripts), tuple(failures))


def first_hint(settings: Settings, chat_id: int) -> bool:
    """True once per chat: the first time it sends a recording with no endpoint configured."""
    marker = chat_folder(settings, chat_id) / HINT_MARKER
    try:
        marker.touch(mode=0o600, exist_ok=False)
    except FileExistsError:
        return False
    return True


class QuotedReply:
    """A reply sink whose text starts with what was heard, live and in the final answer."""

    def __init__(self, inner: ReplySink, prefix: str):
        self._inner = inner
        self._prefix = prefix

    @property
    def message_id(self) -> int | None:
        return self._inner.message_id

    def attach_files(self, paths: Sequence[Path]) -> None:
        self._inner.attach_files(paths)

    async def text(self, text: str) -> None:
        await self._inner.text(self._prefix + text)

    async def tool_progress(self, tool_name: str, detail: str = "") -> None:
        await self._inner.tool_progress(tool_name, detail)

    async def finish(self, final_text: str, files: list[Path] | None = None) -> None:
        await self._inner.finish(self._prefix + final_text, files)

    async def fail(self, message: str) -> None:
        await self._inner.fail(self._prefix + message)
