"""Records -> normalised messages: every data format the trainer reads becomes [{"role", "content"}].

`normalize_record(record)` returns (messages, None) or (None, reason); a reason is a short fixed text
that the data report counts per file. Formats: ChatML/OpenAI `messages`, ShareGPT `conversations`.
"""

from __future__ import annotations

from typing import Any

VALID_ROLES = ("system", "user", "assistant", "tool")
# Role names other tools write, mapped onto ours (ShareGPT's human/gpt, Gemma's model, OpenAI's developer).
ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "developer": "system",
    "function": "tool",
    "observation": "tool",
}


def _content_text(content: Any) -> str | None:
    """A message's content as text: strings as they are, numbers printed, text parts joined; None if not text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None
        return "".join(texts)
    return None


def normalize_record(record: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """Turns one ChatML (`messages`) or ShareGPT (`conversations`) record into [{"role", "content"}].

    Returns (messages, None) or (None, reason). Extra top-level and message fields are dropped, numbers
    become text and None becomes "", so records from any file share one Arrow schema.
    """
    if not isinstance(record, dict):
        return None, "record is not a JSON object"
    if record.get("messages") is not None:
        raw_messages, role_key, content_key = record["messages"], "role", "content"
    elif record.get("conversations") is not None:  # ShareGPT
        raw_messages, role_key, content_key = record["conversations"], "from", "value"
    else:
        return None, "no messages"
    if not isinstance(raw_messages, list) or not raw_messages:
        return None, "no messages"
    messages = []
    for message in raw_messages:
        if not isinstance(message, dict):
            return None, "message is not an object"
        role = message.get(role_key, message.get("role"))
        content = message.get(content_key, message.get("content"))
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in VALID_ROLES:
            return None, f"unknown role {str(role)[:30]!r}"
        text = _content_text(content)
        if text is None:
            return None, "non-text content"
        if role == "assistant" and not text.strip():
            return None, "empty assistant content"
        messages.append({"role": role, "content": text})
    if not any(message["role"] == "assistant" for message in messages):
        return None, "no assistant turn"
    return messages, None


def validate_messages(messages: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """`normalize_record` for a bare messages list."""
    return normalize_record({"messages": messages})

