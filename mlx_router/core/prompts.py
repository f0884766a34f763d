"""Request → prompt token ids, on the engine thread (it needs the model's tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .parsing import opens_reasoning
from .templates import detect_family, render_prompt
from .types import GenerationRequest


@dataclass(frozen=True, slots=True)
class PromptBuilder:
    """How one model renders chats: its family, template choice and template kwargs, from config."""

    family: str | None = None  # configured; None: detected from the model's files when loaded
    use_builtin: bool = False  # config named a chat_template family: use our built-in one
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning: str | None = None  # models.<id>.reasoning_response

    def resolve_family(self, model_config: dict[str, Any], tokenizer: Any) -> PromptBuilder:
        """This builder with the family filled in from the model's config.json and template markers."""
        if self.family is not None:
            return self
        template = getattr(tokenizer, "chat_template", None)
        family = detect_family(model_config, template if isinstance(template, str) else None)
        return PromptBuilder(family, self.use_builtin, self.template_kwargs, self.reasoning)

    def encode(self, tokenizer: Any, request: GenerationRequest) -> tuple[list[int], bool]:
        """Prompt token ids, and whether the prompt leaves the model inside a reasoning block."""
        text = render_prompt(
            tokenizer,
            request.messages,
            tools=request.tools,
            family=self.family,
            use_builtin=self.use_builtin,
            template_kwargs={**self.template_kwargs, **request.chat_template_kwargs},
        )
        # The template already wrote BOS and every special token; adding them again would double BOS.
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        return ids, opens_reasoning(text, self.family or "generic")
