"""Images from create_image results, confined to the media directory (bridge/attachments.py)."""

from __future__ import annotations

import json
from pathlib import Path

from bridge.attachments import generated_images, is_image_tool

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def test_structured_result_path_is_found(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    image = media / "generated" / "cat.png"
    image.parent.mkdir()
    image.write_bytes(PNG)
    content = json.dumps({"path": str(image), "relative_path": "generated/cat.png"})
    assert generated_images("mcp__social-tools__create_image", content, media) == [image]


def test_paths_in_plain_text_are_found(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    image = media / "a.png"
    image.write_bytes(PNG)
    assert generated_images("create_image", f"Saved to {image}.", media) == [image]


def test_nothing_outside_the_media_dir_or_not_an_image(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    fake = media / "fake.png"
    fake.write_text("not an image")
    escape = f"{media}/../secret.png"
    for content in (json.dumps({"path": str(outside)}), f"{fake}", escape, "/etc/passwd.png"):
        assert generated_images("create_image", content, media) == []


def test_other_tools_never_upload(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    image = media / "a.png"
    image.write_bytes(PNG)
    assert generated_images("mcp__social-tools__analyze_shared_image", str(image), media) == []
    assert not is_image_tool("Bash") and is_image_tool("mcp__x__create_image")
