"""Request → prompt token ids, on the engine thread (it needs the model's tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest
from .types import GenerationRequest, Message


@dataclass(frozen=True, slots=True)
class PromptBuilder:
    """How one model renders chat messages; per-model settings come from config."""

    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def encode(self, tokenizer: Any, request: GenerationRequest) -> list[int]:
        """Render the chat with the tokenizer's own template and tokenize it."""
        text = self.render(tokenizer, request)
        # The template already wrote BOS and every special token; adding them again would double BOS.
        return list(tokenizer.encode(text, add_special_tokens=False))

    def render(self, tokenizer: Any, request: GenerationRequest) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"model '{request.model}' has no chat template")
        kwargs = {**self.template_kwargs, **request.chat_template_kwargs}
        try:
            return str(
                tokenizer.apply_chat_template(
                    [_as_dict(m) for m in request.messages],
                    tools=list(request.tools) or None,
                    add_generation_prompt=True,
                    tokenize=False,
                    **kwargs,
                )
            )
        except Exception as exc:  # Jinja raises many types; the client must see which one
            raise InvalidRequest(f"the chat template could not render these messages: {exc}") from exc


def _as_dict(message: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.name:
        d["name"] = message.name
    return d
