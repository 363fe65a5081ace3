"""Images a tool produced, found in its result, so the reply can upload them.

Only ``create_image`` results count, and only paths that resolve to an existing image file inside
the media directory: a tool result is model-influenced text, and nothing else on the machine may
leave it because a path appeared there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from servers.core.media import sniff_image_type

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
