"""Records -> normalised conversations: every data format the trainer reads becomes one schema.

`normalize_record(record, options)` returns (conversation, None) or (None, reason); a reason is a short
fixed text that the data report counts per file. A conversation is

    {"messages": [message, ...], "tools": "<JSON list>" or ""}
    message = {"role": "system" | "user" | "assistant" | "tool", "content": str,
               "reasoning_content": str | None, "tool_calls": "<JSON list>" | None,
               "name": str | None, "loss": bool | None}

JSON-encoded tool calls and tools keep one fixed Arrow schema whatever the tools' shapes;
`template_messages` decodes them for the chat template. Formats recognised, by their fields:

  messages / conversations   ChatML/OpenAI (role/content, tool_calls, tool messages, reasoning_content,
                             content parts) and ShareGPT (from/value: human/gpt/function_call/observation),
                             with top-level `system` and `tools`; LLaMA-Factory v1 content parts
                             ({"type": "text" | "reasoning" | "tool_call", "value": ...})
  instruction/input/output   Alpaca (+ `system`, `history` [[user, assistant], ...])
  prompt/completion          TRL (strings or conversational message lists; only the completion is trained)

Skipped with a reason that says why: preference data (chosen/rejected; KTO records labelled false),
multimodal records (the modality is named), plain text (pre-training) records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    "ipython": "tool",
}
FUNCTION_CALL_ROLES = ("function_call", "tool_call")  # ShareGPT: an assistant turn that is a tool call
MULTIMODAL_KEYS = {"images": "images", "image": "images", "videos": "videos", "video": "videos", "audios": "audio", "audio": "audio"}
MULTIMODAL_PART_TYPES = {"image": "images", "image_url": "images", "input_image": "images", "video": "videos", "video_url": "videos",
                         "audio": "audio", "input_audio": "audio", "audio_url": "audio"}
MULTIMODAL_PLACEHOLDERS = {"<image>": "images", "<video>": "videos", "<audio>": "audio"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


@dataclass(frozen=True)
class FormatOptions:
    """What normalisation does with data that is not plain SFT (part of the cache key)."""

    dpo_chosen_as_sft: bool = False  # preference records: train prompt + chosen answer instead of skipping


class FormatError(ValueError):
    """A record this trainer cannot use; the message is the (short, fixed) skip reason."""


def _multimodal_reason(modality: str) -> str:
    return f"multimodal record ({modality}): text-only training cannot use it"


def _content_parts(content: list) -> tuple[str, str | None, list[dict]]:
    """OpenAI ({"type": "text", "text"}) and LLaMA-Factory v1 ({"type": ..., "value"}) content parts ->
    (text, reasoning or None, tool calls)."""
    texts, reasoning, tool_calls = [], [], []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise FormatError("non-text content")
        kind = part.get("type", "text")
        value = part.get("text", part.get("value"))
        if kind in MULTIMODAL_PART_TYPES:
            raise FormatError(_multimodal_reason(MULTIMODAL_PART_TYPES[kind]))
        if kind == "text" and isinstance(value, str):
            texts.append(value)
        elif kind in ("reasoning", "thinking") and isinstance(value, str):
            reasoning.append(value)
        elif kind == "tool_call":
            tool_calls.append(_tool_call(value))
        else:
            raise FormatError(f"unsupported content part type {str(kind)[:20]!r}")
    return "".join(texts), ("".join(reasoning) if reasoning else None), tool_calls


def _content_text(content: Any) -> str:
    """A message's content as text: strings as they are, numbers printed, None as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    raise FormatError("non-text content")


def _tool_call(call: Any) -> dict:
    """One tool call in OpenAI form {"type": "function", "function": {"name", "arguments": <JSON text>}}.

    Accepts OpenAI's form and LLaMA-Factory/glaive's {"name", "arguments"} (an object or JSON text)."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError:
            raise FormatError("tool call is not JSON") from None
    if not isinstance(call, dict):
        raise FormatError("tool call is not an object")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise FormatError("tool call without a function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise FormatError("tool call arguments are not JSON") from None
    normalised = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        normalised["id"] = call["id"]
    return normalised


def _tools_json(tools: Any) -> str:
    """Top-level tool definitions as JSON text of a list of {"type": "function", "function": {...}}."""
    if tools in (None, "", []):
        return ""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise FormatError("tools is not JSON") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise FormatError("tools is not a list of objects")
    wrapped = [tool if "function" in tool else {"type": "function", "function": tool} for tool in tools]
    return json.dumps(wrapped, ensure_ascii=False) if wrapped else ""


def _loss_flag(message: dict, role: str | None = None) -> bool | None:
    """ms-swift's per-message "loss": true/false, LLaMA-Factory v1's "loss_weight" 0/1, or OpenAI's "weight": 0
    on an assistant message (OpenAI's fine-tuning format: not trained; 1 is its default, and other values are
    not OpenAI's, so both leave the turn to --train_on_turns)."""
    loss = message.get("loss")
    if loss is None and "loss_weight" in message:
        weight = message["loss_weight"]
        if weight not in (0, 1):
            raise FormatError("loss_weight other than 0 or 1")
        loss = bool(weight)
    if loss is None and role == "assistant" and message.get("weight") == 0 and not isinstance(message.get("weight"), bool):
        loss = False
    if loss is not None and not isinstance(loss, bool):
        raise FormatError('"loss" is not true/false')
    return loss


def _message(role: str, content: str, reasoning: str | None = None, tool_calls: list | None = None,
             name: str | None = None, loss: bool | None = None) -> dict:
    return {"role": role, "content": content, "reasoning_content": reasoning,
            "tool_calls": json.dumps(tool_calls, ensure_ascii=False) if tool_calls else None, "name": name, "loss": loss}


def _normalise_message(message: Any, role_key: str, content_key: str) -> dict:
    if not isinstance(message, dict):
        raise FormatError("message is not an object")
    role = message.get(role_key, message.get("role"))
    content = message.get(content_key, message.get("content"))
    tool_calls = [_tool_call(call) for call in message.get("tool_calls") or []]
    reasoning = next((message[key] for key in REASONING_KEYS if isinstance(message.get(key), str)), None)
    if isinstance(role, str) and role in FUNCTION_CALL_ROLES:  # ShareGPT: the content is the call
        calls = content if isinstance(content, list) else [content]
        return _message("assistant", "", reasoning, [_tool_call(call) for call in calls], loss=_loss_flag(message))
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in VALID_ROLES:
        raise FormatError(f"unknown role {str(role)[:30]!r}")
    if isinstance(content, list):
        text, part_reasoning, part_calls = _content_parts(content)
        reasoning = reasoning if reasoning is not None else part_reasoning
        tool_calls += part_calls
    else:
        text = _content_text(content)
    for placeholder, modality in MULTIMODAL_PLACEHOLDERS.items():
        if placeholder in text:
            raise FormatError(_multimodal_reason(modality))
    loss = _loss_flag(message, role)
    if loss and role != "assistant":
        raise FormatError(f'"loss": true on a {role} message (only assistant turns are trained)')
    if tool_calls and role != "assistant":
        raise FormatError(f"tool_calls on a {role} message")
    name = message.get("name") if isinstance(message.get("name"), str) else None
    return _message(role, text, reasoning, tool_calls, name, loss)


def _merge_tool_calls(messages: list[dict]) -> list[dict]:
    """ShareGPT writes an assistant answer and its tool call as two turns; the model generates them as one."""
    merged: list[dict] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if (previous is not None and previous["role"] == "assistant" and message["role"] == "assistant"
                and message["tool_calls"] and not message["content"] and not previous["tool_calls"]):
            previous["tool_calls"] = message["tool_calls"]
            continue
        merged.append(message)
    return merged


def _chat(raw_messages: Any, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(raw_messages, list) or not raw_messages:
        raise FormatError("no messages")
    return _merge_tool_calls([_normalise_message(message, role_key, content_key) for message in raw_messages])


def _alpaca(record: dict) -> list[dict]:
    """Alpaca: instruction + "\\n" + input as the user turn (as LLaMA-Factory joins them), output as the answer."""
    if not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), (str, int, float)):
        if isinstance(record.get("output"), list):
            raise FormatError("preference record (output is a ranked list): use a preference trainer")
        raise FormatError("Alpaca record without a text instruction and output")
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append(_message("system", record["system"]))
    for turn in record.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise FormatError("Alpaca history is not a list of [user, assistant] pairs")
        messages += [_message("user", turn[0]), _message("assistant", turn[1])]
    prompt = record["instruction"]
    if isinstance(record.get("input"), str) and record["input"]:
        prompt = f"{prompt}\n{record['input']}" if prompt else record["input"]
    messages += [_message("user", prompt), _message("assistant", _content_text(record["output"]))]
    return messages


def _prompt_completion(record: dict) -> list[dict]:
    """TRL prompt/completion: strings (one user + one assistant turn) or message lists; only the
    completion is trained (prompt-side assistant turns get loss false)."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [_message("user", prompt), _message("assistant", completion)]
    if isinstance(prompt, list) and isinstance(completion, list):
        head = _chat(prompt, "role", "content")
        for message in head:
            if message["role"] == "assistant" and message["loss"] is None:
                message["loss"] = False
        return head + _chat(completion, "role", "content")
    raise FormatError("prompt/completion are neither both text nor both message lists")


def _preference(record: dict, options: FormatOptions) -> list[dict]:
    """Preference records are skipped, or with --dpo_chosen_as_sft the prompt + chosen answer is trained."""
    if not options.dpo_chosen_as_sft:
        raise FormatError("preference record (chosen/rejected): not SFT data; skipped (--dpo_chosen_as_sft trains the chosen answer)")
    chosen = record["chosen"]
    prompt = record.get("conversations", record.get("messages", record.get("prompt")))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(chosen, str):
        chosen = [{"role": "assistant", "content": chosen}]
    elif isinstance(chosen, dict):
        chosen = [chosen]
    head = _chat(prompt, "from" if "conversations" in record else "role", "value" if "conversations" in record else "content") if prompt else []
    for message in head:
        if message["role"] == "assistant" and message["loss"] is None:
            message["loss"] = False
    tail = _chat(chosen, "from" if isinstance(chosen[0], dict) and "from" in chosen[0] else "role",
                 "value" if isinstance(chosen[0], dict) and "value" in chosen[0] else "content")
    # TRL's conversational chosen repeats the prompt: keep only what follows it.
    if len(tail) > len(head) and [m["content"] for m in tail[: len(head)]] == [m["content"] for m in head]:
        tail = tail[len(head):]
    return head + tail


def normalize_record(record: Any, options: FormatOptions | None = None) -> tuple[dict | None, str | None]:
    """Turns one record of any supported format into {"messages", "tools"} (see the module doc).

    Returns (conversation, None) or (None, reason).
    """
    options = options or FormatOptions()
    if not isinstance(record, dict):
        return None, "record is not a JSON object"
    try:
        for key, modality in MULTIMODAL_KEYS.items():
            if record.get(key):
                raise FormatError(_multimodal_reason(modality))
        if record.get("label") is False:  # KTO: an undesirable answer must not be imitated
            raise FormatError("KTO record labelled false (undesirable answer): not SFT data")
        if "chosen" in record and "rejected" in record:
            messages = _preference(record, options)
        elif record.get("messages") is not None:
            messages = _chat(record["messages"], "role", "content")
        elif record.get("conversations") is not None:  # ShareGPT
            messages = _chat(record["conversations"], "from", "value")
        elif "instruction" in record and "output" in record:
            messages = _alpaca(record)
        elif "prompt" in record and "completion" in record:
            messages = _prompt_completion(record)
        elif isinstance(record.get("text"), str):
            raise FormatError("plain text record (pre-training data): no conversation to supervise")
        else:
            raise FormatError("no messages")
        system = record.get("system")
        if isinstance(system, str) and system.strip() and "instruction" not in record and messages[0]["role"] != "system":
            messages.insert(0, _message("system", system))  # ShareGPT's top-level system prompt
        tools = _tools_json(record.get("tools"))
    except FormatError as err:
        return None, str(err)
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip() and not message["tool_calls"]:
            return None, "empty assistant content"
    if not any(message["role"] == "assistant" for message in messages):
        return None, "no assistant turn"
    return {"messages": messages, "tools": tools}, None


def validate_messages(messages: Any) -> tuple[list[dict] | None, str | None]:
    """`normalize_record` for a bare messages list; returns (messages, None) or (None, reason)."""
    conversation, reason = normalize_record({"messages": messages})
    return (conversation["messages"], None) if conversation else (None, reason)


def template_messages(messages: list[dict]) -> list[dict]:
    """Normalised messages as a chat template expects them: only the fields a message has (templates test
    `'tool_calls' in message`), tool calls decoded."""
    out = []
    for message in messages:
        rendered = {"role": message["role"], "content": message["content"]}
        if message.get("reasoning_content") is not None:
            rendered["reasoning_content"] = message["reasoning_content"]
        if message.get("tool_calls"):
            rendered["tool_calls"] = json.loads(message["tool_calls"])
        if message.get("name"):
            rendered["name"] = message["name"]
        out.append(rendered)
    return out


def template_tools(tools: str | None) -> list[dict] | None:
    return json.loads(tools) if tools else None
