"""Chat messages -> prompt text: the tokenizer's Jinja chat template, or a plain documented fallback.

A tokenizer's ``chat_template`` (from ``tokenizer_config.json``) is rendered the way Hugging Face
``transformers`` renders it: a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``,
the variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, the
``raise_exception`` and ``strftime_now`` helpers and a ``tojson`` filter that keeps non-ASCII text.

Without a template, :data:`FALLBACK_FORMAT` is used::

    <bos>System: {system content}\\n\\nUser: {user content}\\n\\nAssistant: {assistant content}\\n\\n...Assistant:

(the BOS token only when the tokenizer has one) and generation stops at :data:`FALLBACK_STOP`
(``"\\nUser:"``) in addition to the request's own stop strings.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

FALLBACK_STOP = ["\nUser:"]
_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class ChatTemplateError(ValueError):
    """The chat template failed to render these messages (its own ``raise_exception`` or a Jinja error)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the tokenizer's chat template does not compile: {e}") from None


def fallback_prompt(messages: Sequence[dict[str, str]], bos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    """The plain "Role: content" transcript used when the tokenizer has no chat template."""
    parts = [bos_token or ""]
    for m in messages:
        parts.append(f"{_ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}\n\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render_chat(messages: Sequence[dict[str, str]], chat_template: str | None = None, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    """Prompt text for ``messages`` (dicts with ``role`` and ``content`` strings).

    Renders ``chat_template`` when given, else :func:`fallback_prompt`. Template errors raise
    :class:`ChatTemplateError` with the template's own message.
    """
    if not chat_template:
        return fallback_prompt(messages, bos_token, add_generation_prompt)
    from jinja2 import TemplateError

    template = _compile(chat_template)
    try:
        return template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "")
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None


def chat_stop_strings(chat_template: str | None) -> list[str]:
    """Stop strings implied by the prompt format (the fallback's next "User:" turn; none for a template)."""
    return [] if chat_template else list(FALLBACK_STOP)
