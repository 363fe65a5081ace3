"""Workspace screenshots: the task-id naming convention, lookup by task and age, and analysis.

Each chat has its own screenshots folder (``Settings.chat_screenshots_path``:
``SCREENSHOTS_DIR/chats/<chat id>``, the operator's ``operator``). A chat lists and reads only
its own; the operator, with no chat named, every chat's (``screenshot_bases``). So another chat's
task reads exactly as a task with no screenshot.

Convention: a screenshot for task ``T`` is an image file directly inside
``<chat folder>/T/`` (any name; ``<UTC time>-<label>.png`` by convention). The newest file by
modification time is the task's current screenshot. Hidden files (a leading dot) are ignored, so
a writer can write ``.name.part`` and rename it into place. Task ids are strict: letters, digits,
``-`` and ``_`` only, starting with a letter or digit, at most 128 characters — so a task id can
never name a path outside its own folder. Task folders and files that are symlinks are skipped;
reading goes through ``servers.core.media`` (confinement, O_NOFOLLOW, size and format checks).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servers.core import media
from servers.core.errors import Category, ValorError

if TYPE_CHECKING:
    from servers.core.settings import Settings

TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
FOLDER = "screenshots folder"
MAX_LISTED = 500


@dataclass(frozen=True)
class Screenshot:
    task_id: str
    path: Path
    relative: str  # relative to its chat's screenshots folder (``base``)
    size: int
    modified: float  # epoch seconds
    base: Path  # the chat's screenshots folder it was found in

    def age_seconds(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.modified)

    @property
    def modified_iso(self) -> str:
        return datetime.fromtimestamp(self.modified, UTC).isoformat(timespec="seconds")


def validate_task_id(task_id: str) -> str:
    """The task id itself, or an [input] error; never a path, never silently altered."""
    text = task_id if isinstance(task_id, str) else ""
    if TASK_ID_PATTERN.fullmatch(text):
        return text
    shown = repr(text[:60]) + ("…" if len(text) > 60 else "")
    raise ValorError(
        Category.INPUT,
        f"task_id {shown} is not a valid task id: use 1-128 letters, digits, '-' or '_', "
        "starting with a letter or digit (a Notion page id works as it is).",
    )


def validate_label(label: str) -> str:
    if LABEL_PATTERN.fullmatch(label or ""):
        return label
    raise ValorError(
        Category.INPUT,
        "A screenshot label is 1-64 letters, digits, '-' or '_', starting with a letter or digit.",
    )


def screenshot_bases(settings: Settings, chat_id: int | None) -> list[Path]:
    """The screenshots folders a caller sees: a chat's own; with no chat (only the operator gets
    there, see ``trust.resolve_chat_id``) every chat's folder, the operator's included."""
    if chat_id is not None:
        return [settings.chat_screenshots_path(chat_id)]
    chats = settings.screenshots_path / "chats"
    try:
        entries = sorted(os.scandir(chats), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]


def chat_screenshots_folder(settings: Settings, chat_id: int | None) -> Path:
    """The chat's screenshots folder, created owner-only (each level, parents included)."""
    from servers.core.safe_files import ensure_private_dir

    folder = settings.chat_screenshots_path(chat_id)
    try:
        for level in (settings.screenshots_path, folder.parent, folder):
            ensure_private_dir(level)
    except OSError as exc:
        raise _unwritable(settings.screenshots_path, exc) from None
    return folder


def _unwritable(base: Path, exc: OSError) -> ValorError:
    return ValorError(
        Category.FILE,
        f"The screenshots folder {base} cannot be written ({exc.strerror}): fix its "
        "permissions or set VALOR_SCREENSHOTS_DIR.",
    )


def task_dir(base: Path, task_id: str) -> Path:
    """``base/task_id`` (not created). A symlinked task folder is refused."""
    path = base / validate_task_id(task_id)
    try:
        info = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return path
    if not stat.S_ISDIR(info.st_mode):
        raise ValorError(
            Category.FILE,
            f"{task_id} in the {FOLDER} is not a plain folder (a symlink or a file); refused.",
        )
    return path


def ensure_task_dir(base: Path, task_id: str) -> Path:
    path = task_dir(base, task_id)
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _unwritable(base, exc) from None
    return path


def screenshot_file_name(label: str = "screenshot", when: float | None = None) -> str:
    """``20261126T071500123456Z-<label>.png``: sortable, unique enough, safe."""
    moment = datetime.fromtimestamp(time.time() if when is None else when, UTC)
    return f"{moment.strftime('%Y%m%dT%H%M%S%fZ')}-{validate_label(label)}.png"


def _task_folders(base: Path) -> list[tuple[str, Path]]:
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [
        (entry.name, Path(entry.path))
        for entry in entries
        if TASK_ID_PATTERN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
    ]


def _images_in(task_id: str, folder: Path, base: Path) -> list[Screenshot]:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    shots = []
    for entry in entries:
        if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in media.EXTENSIONS:
            continue
        if not entry.is_file(follow_symlinks=False):  # symlinks are never listed
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed while we looked
            continue
        shots.append(
            Screenshot(
                task_id=task_id,
                path=Path(entry.path),
                relative=f"{task_id}/{entry.name}",
                size=info.st_size,
                modified=info.st_mtime,
                base=base,
            )
        )
    return shots


def list_screenshots(
    bases: Path | list[Path],
    task_id: str | None = None,
    *,
    since: float | None = None,
    limit: int = MAX_LISTED,
) -> list[Screenshot]:
    """Screenshots newest first in the given folder(s), for one task or every task; ``since``
    drops older ones."""
    shots = []
    for base in [bases] if isinstance(bases, Path) else bases:
        if task_id is not None:
            folders = [(validate_task_id(task_id), task_dir(base, task_id))]
        else:
            folders = _task_folders(base)
        shots += [shot for name, folder in folders for shot in _images_in(name, folder, base)]
    if since is not None:
        shots = [shot for shot in shots if shot.modified >= since]
    shots.sort(key=lambda shot: (shot.modified, shot.relative), reverse=True)
    return shots[:limit]


def newest_screenshot(
    bases: Path | list[Path], task_id: str, max_age_minutes: float, *, now: float | None = None
) -> Screenshot:
    """The task's newest screenshot if it is fresh enough; else a [file] error that says why.
    The message names only the task, never a folder, so it reads the same for every caller."""
    shots = list_screenshots(bases, task_id, limit=1)
    if not shots:
        raise ValorError(
            Category.FILE,
            f"No screenshot for task {task_id}: none is saved under {task_id}/ in the "
            "screenshots folder of this session. Take one with Playwright and save it there "
            "(see docs/tools/development-tools.md).",
        )
    shot = shots[0]
    age_minutes = shot.age_seconds(now) / 60
    if age_minutes > max_age_minutes:
        raise ValorError(
            Category.FILE,
            f"The newest screenshot for task {task_id} ({shot.relative}) is "
            f"{age_minutes:.1f} minutes old, older than max_age_minutes={max_age_minutes:g}: "
            "take a new one, or raise max_age_minutes to accept it.",
        )
    return shot


def read_screenshot(shot: Screenshot, max_bytes: int) -> media.ImageFile:
    """Read through the media module's checks (confinement to the shot's own chat folder,
    O_NONBLOCK | O_NOFOLLOW, regular files only, size, magic bytes)."""
    return media.read_image(shot.relative, shot.base, max_bytes, folder=FOLDER)


def screenshot_question(task_id: str, context: str = "") -> str:
    about = f" while working on: {context.strip()[:1500]}" if context.strip() else ""
    return (
        f"This is a screenshot of a workspace (task {task_id}) taken{about}. Describe what the "
        "screen shows, quote any error messages or visible text exactly, and point out anything "
        "that looks broken, missing or wrong."
    )


async def analyze_screenshot(shot: Screenshot, question: str, settings: Settings) -> dict[str, Any]:
    """``{"analysis", "model", "mime_type"}`` from the vision model (OpenAI)."""
    import anyio

    from servers.core import openai_services

    openai_services.require_key(openai_services.OPENAI, settings)
    image = await anyio.to_thread.run_sync(read_screenshot, shot, settings.image_max_bytes)
    result = await openai_services.analyze_image(image, question)
    return {**result, "mime_type": image.mime_type}
