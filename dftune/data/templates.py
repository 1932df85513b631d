"""Chat templates: the built-in ChatML template, `--chat_template` (a file or a built-in name), and
`ChatRenderer`, which renders conversations (with `tools=` and `--chat_template_kwargs`) the way
`apply_chat_template(tokenize=False)` does, faster. Which rendered characters are supervised is
spans.py's business.
"""

from __future__ import annotations

import json
import logging
import os

from dftune.data.files import DataError

logger = logging.getLogger("dft.data")

# The ChatML template used when a tokenizer has none or `--chat_template chatml` is given: Qwen-style,
# without the default system prompt; tools in the system turn, tool calls in <tool_call> tags, tool
# results in a user turn, reasoning in <think> tags (as Qwen2.5/Qwen3 write them).
CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n"
    "</tool_call><|im_end|>\\n' }}{%- endif %}"
    "{% for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message.get('reasoning_content') %}{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- else %}{{ message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set call = call.function if call.function is defined else call %}"
    "{{ ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}
# Control tokens each built-in template writes; a tokenizer that lacks them gets them added (tokenizer_setup).
BUILTIN_CONTROL_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}


def check_template_syntax(text: str, where: str) -> None:
    """Compiles a template once, so a syntax error is one line naming the file and line, not a skip reason
    on every record.

    Raises:
        DataError: `where:LINE: template syntax error: ...`.
    """
    from jinja2 import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without the helper: the first render reports it instead
        return
    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as err:
        raise DataError(f"{where}:{err.lineno}: template syntax error: {err.message}") from None


def resolve_chat_template(spec: str) -> tuple[str, str]:
    """`--chat_template` (a built-in name or a .jinja file) -> (template text, name for logs).

    Raises:
        DataError: neither a built-in name nor a readable file.
    """
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"built-in {spec}"
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        check_template_syntax(text, f"--chat_template {spec}")
        return text, spec
    raise DataError(f"--chat_template {spec}: not a file and not a built-in template ({', '.join(BUILTIN_TEMPLATES)})")


def ensure_chat_template(tokenizer, chat_template: str | None = None) -> str | None:
    """Installs `--chat_template` (built-in name or file), or the built-in ChatML template when the
    tokenizer has none (with a warning).

    Returns the name of the built-in template installed ("chatml"), or None when the tokenizer's own
    template or a template file is used.
    """
    if chat_template:
        text, name = resolve_chat_template(chat_template)
        tokenizer.chat_template = text
        logger.info("chat template: %s (--chat_template)", name)
        return chat_template if chat_template in BUILTIN_TEMPLATES else None
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("The tokenizer has no chat_template; using the built-in ChatML template.")
        tokenizer.chat_template = CHATML_TEMPLATE
        return "chatml"
    return None


def _template_of(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: training uses the default one
        template = template.get("default") or next(iter(template.values()))
    if not template:
        raise DataError("the tokenizer has no chat template; call ensure_chat_template first")
    return template



class ChatRenderer:
    """Renders conversations with a tokenizer's chat template, like `apply_chat_template(tokenize=False)`.

    It compiles the template once and calls it directly (about 2x faster than apply_chat_template,
    which re-validates its arguments on every call). The compiled template is not pickled: each
    `datasets.map` worker compiles its own. `template_kwargs` are passed to every render.
    """

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.template = _template_of(tokenizer)
        self.template_kwargs = dict(template_kwargs or {})
        self._compiled = None

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}

    def _compile(self):
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            special_tokens = json.loads(json.dumps(self.tokenizer.special_tokens_map, default=str))
            self._compiled = lambda messages, tools, add_generation_prompt: compiled.render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                **{**special_tokens, **self.template_kwargs},
            )
        except ImportError:  # a transformers without the helper: the public API, slower
            self._compiled = lambda messages, tools, add_generation_prompt: self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template,
                **self.template_kwargs,
            )

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        if not messages and not add_generation_prompt:
            return ""
        if self._compiled is None:
            self._compile()
        return self._compiled(messages, tools, add_generation_prompt)

