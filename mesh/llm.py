"""The LLM-provider interface agents use through `ctx.llm`.

`OfflineLLM` is deterministic and needs no network: the default without an API key.
`AnthropicLLM` calls Claude through the official `anthropic` SDK.
"""

from __future__ import annotations

import os
import re
from typing import Protocol

from mesh.errors import ConfigError, MeshError
from mesh.settings import Settings

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


class LLM(Protocol):
    name: str

    async def complete(self, *, system: str, prompt: str, max_tokens: int = 512) -> str:
        """Return the model's text for `prompt` under `system` instructions."""
        ...


class LLMError(MeshError):
    """The model provider failed; the message says which provider and why."""


class OfflineLLM:
    """A deterministic, extractive stand-in: the same input always gives the same text.

    It answers with the prompt's bullet points (lines starting ``- ``) joined into prose,
    or else the first sentence of the prompt's last paragraph. No network, no model files.
    """

    name = "offline"

    async def complete(self, *, system: str, prompt: str, max_tokens: int = 512) -> str:
        bullets = [line[2:].strip() for line in prompt.splitlines() if line.startswith("- ")]
        if bullets:
            text = " ".join(b if b.endswith((".", "!", "?")) else b + "." for b in bullets)
        else:
            paragraphs = [p.strip() for p in prompt.split("\n\n") if p.strip()]
            last = " ".join((paragraphs[-1] if paragraphs else "").split())
            text = _SENTENCE.split(last, maxsplit=1)[0]
        return text[: max(16, max_tokens * 4)]


class AnthropicLLM:
    """Claude through the `anthropic` SDK's Messages API."""

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None) -> None:
        import anthropic

        self.name = f"anthropic:{model}"
        self.model = model
        self._anthropic = anthropic
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=2)

    async def complete(self, *, system: str, prompt: str, max_tokens: int = 512) -> str:
        try:
            response = await self._client.messages.create(
                model=self.model,
                max_tokens=max_tokens,
                system=system,
                messages=[{"role": "user", "content": prompt}],
            )
        except self._anthropic.APIError as exc:
            raise LLMError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        return "".join(block.text for block in response.content if block.type == "text")


def make_llm(settings: Settings) -> LLM:
    """The provider the settings ask for (``MESH_LLM``)."""
    key = os.environ.get("ANTHROPIC_API_KEY")
    if settings.llm == "anthropic" or (settings.llm == "auto" and key):
        if not key:
            raise ConfigError("MESH_LLM=anthropic needs ANTHROPIC_API_KEY to be set")
        return AnthropicLLM(settings.anthropic_model)
    return OfflineLLM()
