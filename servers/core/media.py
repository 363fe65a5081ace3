"""Images in the media directory: per-chat folders, confined paths, validated formats, bounded
sizes.

Each chat has its own folder (``Settings.chat_media_path``: ``MEDIA_DIR/chats/<chat id>``, the
operator's ``operator``): photos it sent, images made for it, files it may be sent. A chat's
names resolve only inside its folder; the operator's inside the whole media directory
(``names_root``). Every path a tool receives is confined to that root: relative paths are taken
from it, absolute paths must lie inside it, ``..`` is refused outright, and the real path
(symlinks followed) must still be inside it. A name in another chat's folder therefore gets the
same answer as a name that exists nowhere. The file is opened with ``O_NONBLOCK | O_NOFOLLOW``
and its type and size are checked on the descriptor (``servers.core.safe_files``): a FIFO fails at
once instead of blocking; the first bytes must be a JPEG, PNG, GIF or WebP signature, whatever
the name says.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from servers.core.errors import Category, ValorError
from servers.core.safe_files import UnsafeFile, ensure_private_dir, open_regular

if TYPE_CHECKING:
    from servers.core.settings import Settings

EXTENSIONS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
EXTENSIONS |= {".gif": "image/gif", ".webp": "image/webp"}
SUFFIX_FOR_TYPE = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif"}
SUFFIX_FOR_TYPE |= {"image/webp": ".webp"}


@dataclass(frozen=True)
class ImageFile:
    path: Path  # real path inside the media directory
    relative: str  # path relative to the media directory, for messages
    mime_type: str  # from the bytes, not the name
    size: int
    data: bytes


def sniff_image_type(head: bytes) -> str | None:
    """The image type its leading bytes announce, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def names_root(settings: Settings, chat_id: int | None) -> Path:
    """Where a caller's file names resolve: a chat's own folder; with no chat (only the operator
    gets there, see ``trust.resolve_chat_id``) the whole media directory."""
    return settings.media_path if chat_id is None else settings.chat_media_path(chat_id)


def chat_folder(settings: Settings, chat_id: int | None, *parts: str) -> Path:
    """The chat's media folder (or a sub-folder of it), created owner-only."""
    folder = settings.chat_media_path(chat_id)
    levels = [settings.media_path, folder.parent, folder]
    levels += [folder.joinpath(*parts[:depth]) for depth in range(1, len(parts) + 1)]
    for level in levels:  # each level, so no parent is left with the umask's looser mode
        ensure_private_dir(level)
    return levels[-1]


def sendable_file(raw: str | os.PathLike[str], root: Path) -> Path:
    """The real path of ``raw`` when it is a regular file inside ``root`` (symlinks resolved,
    opened without following or blocking); else ``UnsafeFile`` with a reason safe to log.
    A relative ``raw`` is taken from ``root``."""
    base = Path(os.path.realpath(root))
    candidate = Path(raw)
    real = Path(os.path.realpath(candidate if candidate.is_absolute() else base / candidate))
    if not real.is_relative_to(base) or real == base:
        raise UnsafeFile("outside the chat's media folder")
    try:
        os.close(open_regular(real))
    except (FileNotFoundError, NotADirectoryError):
        raise UnsafeFile("missing") from None
    except PermissionError:
        raise UnsafeFile("not readable") from None
    return real


def confine(image_path: str, media_dir: Path, *, folder: str = "media folder") -> tuple[Path, str]:
    """The real path of image_path inside media_dir, and the relative form; refuses escapes.
    ``folder`` names media_dir in messages (the screenshots folder reuses this)."""
    text = (image_path or "").strip()
    if not text:
        raise ValorError(Category.INPUT, "image_path is empty: pass the image's path.")
    if "\x00" in text:
        raise ValorError(Category.INPUT, "image_path contains a NUL byte.")
    base = media_dir.resolve()
    candidate = PurePath(text)
    if ".." in candidate.parts:
        raise ValorError(
            Category.INPUT, f"image_path may not contain '..': pass a path inside the {folder}."
        )
    joined = Path(candidate) if candidate.is_absolute() else base / candidate
    # resolve() without strict follows every symlink that exists; the result must stay inside.
    real = Path(os.path.realpath(joined))
    if not real.is_relative_to(base):
        if candidate.is_absolute() and not Path(os.path.abspath(joined)).is_relative_to(base):
            message = f"image_path is outside the {folder}; only images there can be read."
        else:
            message = f"image_path leads outside the {folder} (through a symlink); refused."
        raise ValorError(Category.INPUT, message)
    return real, str(real.relative_to(base))


def read_image(
    image_path: str, media_dir: Path, max_bytes: int, *, folder: str = "media folder"
) -> ImageFile:
    """Confine, check the extension, open without following a final symlink, check size and
    magic bytes, then read."""
    real, relative = confine(image_path, media_dir, folder=folder)
    suffix = real.suffix.lower()
    if suffix not in EXTENSIONS:
        allowed = ", ".join(sorted(EXTENSIONS))
        raise ValorError(
            Category.INPUT, f"{relative} is not a supported image type (use {allowed})."
        )
    try:
        # O_NONBLOCK | O_NOFOLLOW, type checked on the descriptor: a FIFO fails here, at once.
        fd = open_regular(real)
    except (FileNotFoundError, NotADirectoryError):
        raise ValorError(Category.FILE, f"No image at {relative} in the {folder}.") from None
    except UnsafeFile:
        raise ValorError(Category.FILE, f"{relative} is not a regular file.") from None
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
        raise ValorError(Category.FILE, f"{relative} could not be opened ({reason}).") from None
    info = os.fstat(fd)
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > max_bytes:
            raise ValorError(
                Category.FILE,
                f"{relative} is {info.st_size:,} bytes; the limit is {max_bytes:,} "
                "(VALOR_IMAGE_MAX_BYTES). Send a smaller image.",
            )
        if info.st_size == 0:
            raise ValorError(Category.ENCODING, f"{relative} is empty, not an image.")
        head = handle.read(16)
        mime_type = sniff_image_type(head)
        if mime_type is None:
            raise ValorError(
                Category.ENCODING,
                f"{relative} is named like an image but its content is not JPEG, PNG, GIF or "
                "WebP; it was not sent for analysis.",
            )
        data = head + handle.read(max_bytes + 1 - len(head))
    if len(data) > max_bytes:  # grew while we read it
        raise ValorError(Category.FILE, f"{relative} is larger than {max_bytes:,} bytes.")
    return ImageFile(real, relative, mime_type, len(data), data)


def save_image(data: bytes, media_dir: Path, *, stem: str = "generated") -> tuple[Path, str]:
    """Write image bytes as a new file in media_dir/generated; returns (path, mime type)."""
    mime_type = sniff_image_type(data[:16])
    if mime_type is None:
        raise ValorError(Category.UPSTREAM, "The image service returned data that is not an image.")
    folder = ensure_private_dir(media_dir / "generated")
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    path = folder / (name + SUFFIX_FOR_TYPE[mime_type])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path, mime_type


def image_dimensions(data: bytes, mime_type: str) -> tuple[int, int] | None:
    """Width and height from the header, where the format puts them at a fixed place."""
    if mime_type == "image/png" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if mime_type == "image/gif" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return None
