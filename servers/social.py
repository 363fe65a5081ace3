"""social-tools: web search, image generation and analysis, and saved links."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastmcp import Context
from pydantic import BaseModel, Field

from servers.core import links, media, openai_services
from servers.core.app import always_loaded, create_server
from servers.core.errors import Category, ValorError
from servers.core.model_results import bytes_text, more_note
from servers.core.progress import Steps, from_context
from servers.core.settings import get_settings
from servers.core.store import get_store
from servers.core.trust import ChatIdArg, current_scope, resolve_chat_id

mcp = create_server(
    "social-tools",
    instructions=(
        "Current information from the web (Perplexity), image generation and analysis (OpenAI), "
        "and a searchable store of links people save."
    ),
)


class Citation(BaseModel):
    number: int = Field(description="The [n] the answer uses for this source")
    url: str
    title: str = ""


class SearchAnswer(BaseModel):
    query: str
    answer: str = Field(description="The answer, citing sources as [n]")
    citations: list[Citation]
    model: str


class CreatedImage(BaseModel):
    path: str = Field(description="Absolute path of the new image file in the chat's media folder")
    relative_path: str = Field(
        description="The same path as analyze_shared_image takes it (relative to the chat's "
        "media folder; for the operator, to the media directory)"
    )
    mime_type: str
    size_bytes: int
    size = bytes_text("size_bytes")
    width: int | None = None
    height: int | None = None
    prompt: str
    revised_prompt: str = Field(description="The prompt the image model actually used")
    model: str
    chat_id: int | None = Field(description="The chat the image is for, if any")


class ImageAnalysis(BaseModel):
    image_path: str = Field(
        description="Path relative to the chat's media folder (the operator: the media directory)"
    )
    mime_type: str = Field(description="Detected from the file's bytes")
    size_bytes: int
    size = bytes_text("size_bytes")
    mode: Literal["question", "description"]
    analysis: str
    model: str


class SavedLinkResult(BaseModel):
    url: str = Field(description="The link as saved (normalized)")
    final_url: str = Field(description="Where the page was fetched from after redirects")
    chat_id: int | None
    title: str
    summary: str
    tags: list[str]
    summary_source: Literal["model", "extractive"]
    created: bool = Field(description="False when an earlier save of this URL was updated")
    saved_at: str = Field(description="First saved, ISO 8601 UTC")
    note: str = Field(default="", description="Anything that went partly wrong")


class LinkHit(BaseModel):
    url: str
    final_url: str
    chat_id: int | None
    title: str
    summary: str
    tags: list[str]
    saved_at: str
    updated_at: str
    snippet: str = Field(description="Matching text with [matches] marked")
    score: float = Field(description="BM25 relevance, higher is better")


class LinkSearch(BaseModel):
    query: str
    chat_id: int | None = Field(description="The chat searched; null means every chat")
    hits: list[LinkHit]
    truncated: bool = Field(description="True when more links match than are shown")
    how_to_see_more: str | None = Field(description="When truncated: how to narrow or widen")


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": True},
    meta=always_loaded(max_result_chars=50_000),
)
async def search_current_info(
    query: Annotated[
        str, Field(min_length=1, max_length=2000, description="What to find out, in words")
    ],
    max_results: Annotated[
        int, Field(ge=1, le=20, description="How many numbered sources to return at most")
    ] = 5,
    ctx: Context | None = None,
) -> SearchAnswer:
    """Search the web for current information (Perplexity); an answer with numbered sources."""
    steps = Steps(from_context(ctx), 1)
    async with steps.waiting("searching the web (Perplexity)"):
        result = await openai_services.search_current_info(query.strip(), max_results)
    await steps.done(f"{len(result['citations'])} sources")
    return SearchAnswer(query=query, **result)


@mcp.tool(
    annotations={"readOnlyHint": False, "destructiveHint": False, "openWorldHint": True},
    meta=always_loaded(),
)
async def create_image(
    prompt: Annotated[
        str, Field(min_length=1, max_length=4000, description="What the image should show")
    ],
    size: Annotated[
        Literal["1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536", "auto"],
        Field(description="Width x height in pixels (the model decides which it supports)"),
    ] = "1024x1024",
    quality: Annotated[
        Literal["standard", "high"], Field(description="'high' costs more and takes longer")
    ] = "standard",
    style: Annotated[
        Literal["vivid", "natural"], Field(description="dall-e-3 only: vivid or natural look")
    ] = "vivid",
    chat_id: ChatIdArg = None,
    ctx: Context | None = None,
) -> CreatedImage:
    """Generate an image (OpenAI) into the chat's media folder; returns its path for upload."""
    chat = resolve_chat_id(chat_id, required=False)
    settings = get_settings()
    image_quality = "high" if quality == "high" else "medium"
    if settings.openai_image_model.startswith("dall-e"):
        image_quality = quality
    steps = Steps(from_context(ctx), 2)
    async with steps.waiting(f"generating the image ({settings.openai_image_model})"):
        result = await openai_services.generate_image(prompt, size, image_quality, style)
    await steps.at(1, "saving the image")
    data = result["data"]
    if len(data) > settings.image_max_bytes:
        raise ValorError(Category.UPSTREAM, "The generated image is larger than the image limit.")
    stem = "generated" if chat is None else f"chat{chat}".replace("-", "m")
    path, mime_type = media.save_image(data, media.chat_folder(settings, chat), stem=stem)
    dimensions = media.image_dimensions(data, mime_type) or (None, None)
    await steps.done("image saved")
    return CreatedImage(
        path=str(path),
        relative_path=str(path.relative_to(media.names_root(settings, chat))),
        mime_type=mime_type,
        size_bytes=len(data),
        width=dimensions[0],
        height=dimensions[1],
        prompt=prompt,
        revised_prompt=result["revised_prompt"],
        model=result["model"],
        chat_id=chat,
    )


@mcp.tool(annotations={"readOnlyHint": True, "openWorldHint": True}, meta=always_loaded())
async def analyze_shared_image(
    image_path: Annotated[
        str,
        Field(
            min_length=1,
            max_length=1024,
            description="Path of the image inside this chat's media folder (relative, or "
            "absolute within it), as the prompt or create_image named it. JPEG, PNG, GIF or WebP.",
        ),
    ],
    question: Annotated[
        str,
        Field(max_length=2000, description="A question about the image; empty to describe it"),
    ] = "",
    chat_id: ChatIdArg = "",
    ctx: Context | None = None,
) -> ImageAnalysis:
    """Answer a question about an image in the chat's media folder, or describe it (OpenAI
    vision)."""
    chat = resolve_chat_id(chat_id, required=False)  # a chat outside the session's is refused
    settings = get_settings()
    openai_services.require_key(openai_services.OPENAI, settings)  # before reading the file
    # A chat's names resolve only in its own folder, so another chat's file reads as missing.
    image = await anyio.to_thread.run_sync(
        media.read_image, image_path, media.names_root(settings, chat), settings.image_max_bytes
    )
    steps = Steps(from_context(ctx), 1)
    async with steps.waiting(f"looking at the image ({settings.openai_vision_model})"):
        result = await openai_services.analyze_image(image, question)
    await steps.done("analysed")
    return ImageAnalysis(
        image_path=image.relative,
        mime_type=image.mime_type,
        size_bytes=image.size,
        mode="question" if question.strip() else "description",
        **result,
    )


@mcp.tool(
    annotations={"readOnlyHint": False, "destructiveHint": False, "openWorldHint": True},
    meta=always_loaded(max_result_chars=20_000),
)
async def save_link(
    url: Annotated[
        str, Field(min_length=1, max_length=2048, description="The http(s) link to save")
    ],
    chat_id: ChatIdArg = None,
    ctx: Context | None = None,
) -> SavedLinkResult:
    """Fetch a public web page, summarize it and save it for search; the same URL updates."""
    chat = resolve_chat_id(chat_id, required=False)
    steps = Steps(from_context(ctx), links.SAVE_LINK_STEPS)
    saved = await links.save_link(get_store(), url, chat, progress=steps)
    return SavedLinkResult(
        url=saved.url,
        final_url=saved.final_url,
        chat_id=saved.chat_id,
        title=saved.title,
        summary=saved.summary,
        tags=saved.tags,
        summary_source=saved.summary_source,  # type: ignore[arg-type]
        created=saved.created,
        saved_at=saved.saved_at,
        note=saved.note,
    )


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=always_loaded(max_result_chars=50_000),
)
def search_links(
    query: Annotated[
        str,
        Field(
            min_length=1,
            max_length=500,
            description='Words, "exact phrases", prefix* and AND / OR / NOT with parentheses; '
            "matches title, summary, tags and URL.",
        ),
    ],
    chat_id: ChatIdArg = None,
    max_results: Annotated[int, Field(ge=1, le=100, description="How many hits at most")] = 10,
) -> LinkSearch:
    """Full-text search of saved links, best matches first."""
    scope = current_scope()
    chat = resolve_chat_id(chat_id, required=False)
    everywhere = not scope.fixed and chat is None  # an operator with no chat: all links
    hits = links.search_links(
        get_store(), query, chat, all_chats=everywhere, max_results=max_results + 1
    )
    more = len(hits) > max_results
    return LinkSearch(
        query=query,
        chat_id=chat,
        hits=[LinkHit(**hit) for hit in hits[:max_results]],
        truncated=more,
        how_to_see_more=more_note(
            max_results,
            more,
            'Narrow the query (more words, a "phrase", a tag) or raise max_results (at most 100).',
        ),
    )


if __name__ == "__main__":
    mcp.run(show_banner=False)
