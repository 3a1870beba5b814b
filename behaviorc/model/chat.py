"""How a prompt reaches a model: as the user's turn of a chat, or as plain text.

A chat model (its tokenizer has a chat template) was trained to answer user turns, so a
prompt of a pair, an example, a distillation prompt or an evaluation is rendered through
the template as one user turn followed by the cue for the assistant's reply; the
completion or response is that reply. A model without a template reads the prompt as
plain text. Two prompts stay as written on every model: an empty one (general text,
scored from the start token) and one that already holds the tokenizer's special tokens
(a transcript its author formatted, like the testbed's data).

This is the one place that applies the template; the engines and the training data call
it where prompt text becomes token ids, so steering, training and measurement read the
same tokens. A template with a thinking mode (Qwen3's and Qwen3.5's `enable_thinking`)
renders with the model's `thinking` setting, kept on its tokenizer (`set_thinking`): off
unless a spec says `thinking on`, so a reply follows an empty thinking block.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

PromptFormat = Literal["chat", "plain"]
_THINKING = "_behaviorc_thinking"


def set_thinking(tokenizer: Any, on: bool) -> None:
    """The model's `thinking` setting, for every prompt this tokenizer renders."""
    setattr(tokenizer, _THINKING, on)


def thinking_mode(tokenizer: Any) -> Literal["on", "off"] | None:
    """How the template renders thinking; None when it has no thinking switch."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "enable_thinking" not in template:
        return None
    return "on" if getattr(tokenizer, _THINKING, False) else "off"


def render_turns(tokenizer: Any, turns: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    """Chat turns as the template renders them, in the model's thinking mode."""
    return tokenizer.apply_chat_template(list(turns), tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=getattr(tokenizer, _THINKING, False))


def prompt_format(tokenizer: Any) -> PromptFormat:
    """`chat` when the tokenizer has a chat template, else `plain`."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def model_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model reads for a user's `prompt`; its reply follows directly."""
    if not prompt or prompt_format(tokenizer) == "plain" or _preformatted(tokenizer, prompt):
        return prompt
    return render_turns(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def system_prompted(tokenizer: Any, system: str, prompt: str) -> str:
    """The text the model reads for `prompt` asked under the system prompt `system`: a
    chat model's system and user turns and its reply cue (the template's tokens in it
    make `model_prompt` keep it as written); a plain model reads the system prompt, a
    blank line, then the prompt."""
    if prompt_format(tokenizer) == "plain":
        return f"{system}\n\n{prompt}"
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        tokenize=False, add_generation_prompt=True)


def _preformatted(tokenizer: Any, prompt: str) -> bool:
    return any(token in prompt for token in _template_tokens(tokenizer))


def _template_tokens(tokenizer: Any) -> tuple[str, ...]:
    cached = getattr(tokenizer, "_behaviorc_template_tokens", None)
    if cached is None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                 tokenize=False, add_generation_prompt=True)
        cached = tuple(t for t in tokenizer.all_special_tokens if t and t in rendered)
        tokenizer._behaviorc_template_tokens = cached
    return cached
