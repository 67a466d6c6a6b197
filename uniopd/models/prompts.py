"""Turning a record's prompt (text or chat messages) into token ids for one model.

With a chat template the prompt becomes messages and the template adds the generation
prompt; without one, messages are joined as plain text. Each model renders with its own
tokenizer, which is what makes teacher-aligned prompts possible.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

Prompt = str | list[dict[str, Any]]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def as_messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, *, chat_template: bool = True,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt, ready for the model to continue with its response."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{**m, "content": _text_of(m["content"])} for m in as_messages(prompt, system_prompt)]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, str):
        text = prompt if not system_prompt else f"{system_prompt}\n\n{prompt}"
    else:
        text = "\n".join(_text_of(m["content"]) for m in as_messages(prompt, system_prompt))
    return tokenizer(text)["input_ids"]
