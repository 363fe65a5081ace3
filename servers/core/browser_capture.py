"""Capture a page with Playwright and the system Chromium into the screenshots convention.

    python -m servers.core.browser_capture URL --task-id T [--label L] [--full-page]
    python -m servers.core.browser_capture URL --dir SCREENSHOTS_DIR/chats/<chat>/T [--label L]

``--task-id`` saves into the screenshots folder of the chat this process serves
(``VALOR_CHAT_ID``, set in a chat's runs; without it the operator's).

Writes ``<dir>/<UTC time>-<label>.png`` atomically (a hidden temporary file renamed into place,
so a lookup never sees half a file) and prints its path. Playwright drives an installed Chromium
(``VALOR_BROWSER_EXECUTABLE`` or ``chromium`` on PATH); it never downloads a browser. Meant for
local pages under development (Claude Code runs it from Bash during a bug report).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core import screenshots
from servers.core.errors import Category, ValorError

if TYPE_CHECKING:
    from servers.core.settings import Settings

# No sandbox: root in containers cannot use Chromium's; no background traffic, no updates.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


def chromium_executable(settings: Settings | None = None) -> str:
    from servers.core.settings import get_settings

    configured = (settings or get_settings()).browser_executable
    if configured is not None:
        if not os.access(configured, os.X_OK):
            raise ValorError(
                Category.CONFIG, f"VALOR_BROWSER_EXECUTABLE={configured} is not an executable."
            )
        return str(configured)
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise ValorError(
        Category.CONFIG,
        "Chromium is not installed: `apt-get install chromium` (or set VALOR_BROWSER_EXECUTABLE).",
    )


def capture(
    url: str,
    target_dir: Path,
    *,
    label: str = "page",
    width: int = 1280,
    height: int = 800,
    full_page: bool = False,
    timeout_seconds: float = 30.0,
    settings: Settings | None = None,
) -> Path:
    """Screenshot ``url`` into ``target_dir``; returns the new file's path."""
    if not url.startswith(("http://", "https://", "file://")):
        raise ValorError(Category.INPUT, "The URL must start with http://, https:// or file://.")
    name = screenshots.screenshot_file_name(label)
    executable = chromium_executable(settings)
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ValorError(
            Category.CONFIG,
            "Playwright is not installed: `pip install 'valor[browser]'` (no browser download "
            "is needed; the system Chromium is used).",
        ) from None
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = target_dir / f".{name}.part"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=executable, args=list(CHROMIUM_ARGS), timeout=timeout_seconds * 1e3
            )
            try:
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(url, timeout=timeout_seconds * 1e3, wait_until="load")
                data = page.screenshot(full_page=full_page, type="png")
            finally:
                browser.close()
    except PlaywrightError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValorError(
            Category.UPSTREAM, f"The browser could not capture {url}: {first_line[:300]}"
        ) from None
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    final = target_dir / name
    os.replace(partial, final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m servers.core.browser_capture", description=__doc__.splitlines()[0]
    )
    parser.add_argument("url")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--task-id", help="save under the chat's screenshots folder (VALOR_CHAT_ID), <task id>/"
    )
    where.add_argument("--dir", type=Path, help="save into this folder")
    parser.add_argument("--label", default="page", help="letters, digits, - and _")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--full-page", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.task_id is not None:
            from servers.core.settings import get_settings

            settings = get_settings()
            base = screenshots.chat_screenshots_folder(settings, settings.chat_id)
            target = screenshots.task_dir(base, args.task_id)
        else:
            target = args.dir
        path = capture(
            args.url,
            target,
            label=args.label,
            width=args.width,
            height=args.height,
            full_page=args.full_page,
        )
    except ValorError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
