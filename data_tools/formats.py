"""Every common record format -> one canonical example, with the checks that catch bad records.

Canonical examples (what the rest of the toolkit consumes). Conversational ones get the chat template:
- chat: {"messages": [{"role", "content", "tool_calls", "train"}]}; content is None only for a tool-call message;
  `train` False marks an assistant turn that is context only (OpenAI's `weight: 0`);
- preference: {"prompt": messages, "chosen": messages, "rejected": messages}; chosen/rejected are assistant turns;
- kto: {"prompt": messages, "completion": messages, "label": bool};
Standard (plain-string) ones are raw text, tokenized as trl tokenizes them (no chat template):
- text: {"text": str} (cpt documents);
- text_completion: {"prompt": str, "completion": str} (loss on the completion; sft and cpt);
- text_preference: {"prompt": str, "chosen": str, "rejected": str};
- text_kto: {"prompt": str, "completion": str, "label": bool};
- segments: {"segments": [{"text": str, "label": bool}]} (axolotl's template-free input_output format: the texts
  concatenated as they are, loss on the segments labelled true; sft and cpt).

A record's fields are read through `Record`, which remembers which keys were used: the others are reported (with
counts) by the pipeline, never dropped in silence.
"""

import json
from typing import Any

import datasets

from data_tools.errors import RecordError

# format -> the kind of canonical example it becomes (the standard variants are chosen from the record's values)
FORMAT_KINDS = {
    "messages": "chat",
    "sharegpt": "chat",
    "alpaca": "chat",
    "prompt_completion": "chat",
    "preference": "preference",
    "kto": "kto",
    "text": "text",
    "text_completion": "text_completion",
    "segments": "segments",
}
# The kinds each task trains on; the first is the conversational one.
TASK_KINDS = {
    "sft": ("chat", "text_completion", "segments"),
    "dpo": ("preference", "text_preference"),
    "kto": ("kto", "text_kto"),
    "cpt": ("text", "text_completion", "segments"),
}
STANDARD_KINDS = {"chat": "text_completion", "preference": "text_preference", "kto": "text_kto"}
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "ipython": "tool",
    "function_call": "function_call",  # an assistant turn whose value is the call(s) as JSON (LLaMA-Factory)
}
MODALITY_KEYS = ("images", "image", "videos", "video", "audios", "audio")
MODALITY_PARTS = ("image", "image_url", "input_image", "video", "audio", "input_audio", "file")

MESSAGE_FEATURES = {
    "role": datasets.Value("string"),
    "content": datasets.Value("string"),
    "tool_calls": datasets.List(
        {
            "type": datasets.Value("string"),
            "function": {"name": datasets.Value("string"), "arguments": datasets.Value("string")},
        }
    ),
    "train": datasets.Value("bool"),
}
MESSAGES = datasets.List(MESSAGE_FEATURES)
TEXT = datasets.Value("string")
KIND_FEATURES = {
    "chat": {"messages": MESSAGES},
    "preference": {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES},
    "kto": {"prompt": MESSAGES, "completion": MESSAGES, "label": datasets.Value("bool")},
    "text": {"text": TEXT},
    "text_completion": {"prompt": TEXT, "completion": TEXT},
    "text_preference": {"prompt": TEXT, "chosen": TEXT, "rejected": TEXT},
    "text_kto": {"prompt": TEXT, "completion": TEXT, "label": datasets.Value("bool")},
    "segments": {"segments": datasets.List({"text": TEXT, "label": datasets.Value("bool")})},
}
# Where each row came from, what was wrong with it, and the record keys it did not use: kept until tokenizing.
LOCATION_FEATURES = {"_file": datasets.Value("string"), "_line": datasets.Value("int64")}
ERROR_FEATURES = {
    "_error": datasets.Value("string"),
    "_field": datasets.Value("string"),
    "_reason": datasets.Value("string"),
    "_ignored": datasets.List(datasets.Value("string")),
}


def build_features(kind: str) -> datasets.Features:
    """Arrow schema of canonical rows of `kind`, with location and error columns."""
    return datasets.Features({**KIND_FEATURES[kind], **LOCATION_FEATURES, **ERROR_FEATURES})


def empty_example(kind: str) -> dict[str, Any]:
    """The canonical placeholder stored in a row that failed."""
    return {
        "chat": {"messages": []},
        "preference": {"prompt": [], "chosen": [], "rejected": []},
        "kto": {"prompt": [], "completion": [], "label": False},
        "text": {"text": ""},
        "text_completion": {"prompt": "", "completion": ""},
        "text_preference": {"prompt": "", "chosen": "", "rejected": ""},
        "text_kto": {"prompt": "", "completion": "", "label": False},
        "segments": {"segments": []},
    }[kind]


class Record(dict):
    """A record that remembers which of its keys were read (membership tests do not count)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.used: set[str] = set()
        self.unmapped: list[str] = []  # keys left out by an only-mapped rename (LLaMA-Factory columns)

    def __getitem__(self, key: str) -> Any:
        self.used.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return super().get(key, default)

    def ignored(self) -> list[str]:
        """The keys with a value that nothing read."""
        unread = [k for k, v in self.items() if k not in self.used and v not in (None, "", [], {})]
        return sorted(unread + self.unmapped)


class FormatOptions:
    """How a source's records are read: renamed columns, extra role names, standard strings as chat."""

    def __init__(
        self,
        columns: dict[str, str] | None = None,
        roles: dict[str, str] | None = None,
        as_chat: bool = False,
        join: str = "\n\n",
        only_mapped: bool = False,
        exclusive_roles: bool = False,
    ):
        self.columns = dict(columns or {})  # canonical key -> the record's key
        # exclusive_roles: only the given role names (LLaMA-Factory's tags), else ours and the common ones too
        self.roles = dict(roles or {}) if exclusive_roles else {**SHAREGPT_ROLES, **(roles or {})}
        self.as_chat = as_chat
        self.join = join  # between an alpaca instruction and its input
        self.only_mapped = only_mapped  # read the mapped columns only (as LLaMA-Factory does); report the others

    def rename(self, raw: dict[str, Any]) -> Record:
        """The record with its columns under the canonical names (mapped columns only; the rest as they are)."""
        if not self.columns:
            return Record(raw)
        sources = set(self.columns.values())
        record = Record() if self.only_mapped else Record({k: v for k, v in raw.items() if k not in sources})
        for canonical, source in self.columns.items():
            if canonical not in ("role", "content") and source in raw:
                record[canonical] = raw[source]
        if self.only_mapped:
            record.unmapped = sorted(k for k, v in raw.items() if k not in sources and v not in (None, "", [], {}))
        return record


DEFAULT_OPTIONS = FormatOptions()


def detect_format(record: dict[str, Any]) -> str:
    """Name the format of a record from its keys."""
    keys = set(record)
    if "segments" in keys:
        return "segments"
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "completion" in keys and "label" in keys:
        return "kto"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        turns = record["conversations"]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return "messages"
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        if "role" in keys and ("parent_id" in keys or "message_id" in keys):
            raise RecordError(
                "unknown_format",
                "these are flat message rows of a conversation tree (OpenAssistant style: text, role, parent_id), "
                "not documents; build the conversations first, or declare format: text to train each row as text",
            )
        return "text"
    hint = ""
    if "conversation" in keys:
        hint = " ('conversation' with input/output turns: map it with columns: {messages: conversation})"
    raise RecordError("unknown_format", f"cannot detect the format from the keys {sorted(keys)}{hint}")


def is_standard(value: Any) -> bool:
    """A plain-string (trl "standard") value, as opposed to messages."""
    return isinstance(value, str)


def resolve_kind(fmt: str, record: dict[str, Any], kinds: tuple[str, ...] | None, options: FormatOptions) -> str:
    """The canonical kind records of `fmt` become, from the first record's values and the task's kinds."""
    kind = FORMAT_KINDS[fmt]
    record = options.rename(record)
    if not options.as_chat:
        if fmt == "prompt_completion" and is_standard(record.get("completion")):
            kind = "text_completion"
        elif fmt == "preference" and is_standard(record.get("chosen")) and "instruction" not in record:
            kind = "text_preference"
        elif fmt == "kto" and is_standard(record.get("completion")):
            kind = "text_kto"
    if kinds is None:
        return kind
    if "text_completion" in kinds and kind == "text" and "text" not in kinds:
        return "text_completion"  # sft on plain documents: trl's standard language modelling, loss on all of it
    if "kto" in kinds and kind == "chat" and fmt != "prompt_completion" and "label" in record:
        return "kto"  # a conversation with its label (LLaMA-Factory's kto_tag): the last answer is the completion
    if "kto" in kinds and kind in ("preference", "text_preference"):
        return "kto" if kind == "preference" else "text_kto"  # unpaired, as trl's unpair_preference_dataset does
    return kind


def require(record: dict[str, Any], field: str) -> Any:
    """The value of a required field (absent or null is an error)."""
    value = record.get(field)
    if value is None:
        raise RecordError("missing_field", "missing field", field)
    return value


def build_text(value: Any, field: str) -> str:
    """Content as a string: a string, a number, or a list of text parts ({type: text, text | value})."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type", "text")
            if kind in MODALITY_PARTS:
                raise RecordError(
                    "unsupported_modality", f"content part {i} is {kind!r}: DeepSeek-V3 reads text only", field
                )
            if kind != "text":
                raise RecordError("bad_type", f"content part {i} has unknown type {kind!r}", field)
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise RecordError("bad_type", f"content part {i} has no text", field)
            texts.append(text)
        return "".join(texts)
    raise RecordError("bad_type", f"expected a string, got {type(value).__name__}", field)


def build_tool_calls(calls: Any, field: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls (or LLaMA-Factory's {name, arguments}) with arguments as a JSON string."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise RecordError("bad_type", "tool_calls must be a list", field)
    result = []
    for call in calls:
        function = None
        if isinstance(call, dict):
            function = call["function"] if "function" in call else call if "name" in call else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError("bad_type", "each tool call needs function.name", field)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        kind = call.get("type") if "function" in call else None
        result.append({"type": kind or "function", "function": {"name": function["name"], "arguments": arguments}})
    return result


def parse_function_call(value: Any, field: str) -> list[dict[str, Any]]:
    """The tool calls of a LLaMA-Factory function_call turn: JSON {name, arguments} or a list of them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError("bad_type", "a function_call turn must hold JSON {name, arguments}", field) from None
    return build_tool_calls(value, field)


def message_key(message: dict[str, Any], options: FormatOptions, name: str, fallback: str) -> str:
    """The key holding a message's role or content: the source's mapping, else `name`, else `fallback`."""
    if name in options.columns:
        return options.columns[name]
    return name if message.get(name) is not None else fallback


def build_message(message: Any, field: str, options: FormatOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
    """One canonical message from an OpenAI-style (role/content) or ShareGPT-style (from/value) dict."""
    if isinstance(message, str):
        raise RecordError("bad_type", "expected a message object, got a string (give role and content)", field)
    if not isinstance(message, dict):
        raise RecordError("bad_type", f"expected a message object, got {type(message).__name__}", field)
    role_key = message_key(message, options, "role", "from")
    content_key = message_key(message, options, "content", "value")
    source_role = message.get(role_key)
    role = options.roles.get(source_role) if isinstance(source_role, str) else None
    if role is None:
        if source_role is None:
            raise RecordError(
                "unknown_role", f"message has no role (no '{role_key}' key; keys {sorted(message)})", field
            )
        raise RecordError("unknown_role", f"unknown role {source_role!r}", field)
    content = message.get(content_key)
    train = None
    if message.get("weight") is not None and role == "assistant":
        if message["weight"] not in (0, 1):
            raise RecordError("bad_type", f"weight must be 0 or 1, got {message['weight']!r}", field)
        train = bool(message["weight"])
    if role == "function_call":
        return {"role": "assistant", "content": None, "tool_calls": parse_function_call(content, field), "train": train}
    calls = build_tool_calls(message["tool_calls"], field) if message.get("tool_calls") else []
    if role == "assistant" and calls:
        # The template tests `content is none` to render tool calls; "" would drop them.
        text = build_text(content, field) if content is not None else ""
        return {"role": role, "content": text or None, "tool_calls": calls, "train": train}
    if content is None:
        raise RecordError("missing_field", f"message has no content ('{content_key}')", field)
    return {"role": role, "content": build_text(content, field), "tool_calls": None, "train": train}


def build_messages(value: Any, field: str, options: FormatOptions = DEFAULT_OPTIONS) -> list[dict[str, Any]]:
    """A list of canonical messages (one message object counts as a list of one)."""
    if isinstance(value, dict):
        return [build_message(value, field, options)]
    if not isinstance(value, list):
        raise RecordError("bad_type", f"expected a list of messages, got {type(value).__name__}", field)
    return [build_message(m, f"{field}[{i}]", options) for i, m in enumerate(value)]


def plain(role: str, content: str) -> dict[str, Any]:
    """A canonical message without tool calls."""
    return {"role": role, "content": content, "tool_calls": None, "train": None}


def build_turns(value: Any, field: str, role: str, options: FormatOptions = DEFAULT_OPTIONS) -> list[dict[str, Any]]:
    """Messages from either a plain string (one `role` turn) or messages."""
    if isinstance(value, str):
        return [plain(role, value)]
    return build_messages(value, field, options)


def name_position(i: int, parts: list[tuple[str, int]]) -> str:
    """`chosen[0]` rather than an index into prompt + chosen: the field and index a combined position falls in."""
    for name, length in parts:
        if i < length:
            return f"{name}[{i}]"
        i -= length
    return parts[-1][0]


def check_conversation(
    messages: list[dict[str, Any]], field: str | list[tuple[str, int]], end: str = "assistant"
) -> None:
    """Raise unless the roles alternate: system*, then user, assistant (tool-call -> tool+ -> assistant), ...

    `field` names the messages' field, or lists (field, count) of the parts they were joined from. `end` is the role
    group the conversation must finish on: "assistant" for training chats, "prompt" for a prompt awaiting an answer.
    """
    parts = [(field, len(messages))] if isinstance(field, str) else field
    whole = parts[-1][0]
    if not messages:
        raise RecordError("empty_conversation", "empty conversation", whole)
    previous = None
    started = False
    for i, message in enumerate(messages):
        role = message["role"]
        where = name_position(i, parts)
        if role == "system":
            if started:
                raise RecordError("non_alternating", "system message after the conversation started", where)
            continue
        if role in ("user", "assistant") and message["content"] is not None and not message["content"].strip():
            raise RecordError("empty_content", f"empty {role} message", where)
        if previous is None or previous["role"] == "assistant" and not previous["tool_calls"]:
            expected = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "assistant":
            expected = ("tool",)
        else:  # tool
            expected = ("tool", "assistant")
        if role not in expected:
            after = f"after '{previous['role']}'" if previous else "first"
            raise RecordError("non_alternating", f"expected {' or '.join(expected)} {after}, got '{role}'", where)
        previous = message
        started = True
    if previous is None:
        raise RecordError("empty_conversation", "conversation has only system messages", whole)
    if end == "assistant" and previous["role"] != "assistant":
        # An answer or a tool call: OpenAI's tool-calling fine-tuning examples end on the call they teach.
        raise RecordError("non_alternating", "conversation does not end with an assistant answer", whole)
    if end == "prompt" and previous["role"] not in ("user", "tool"):
        raise RecordError("non_alternating", "prompt must end with a user or tool message", whole)


def split_shared_prompt(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt, chosen, rejected) from two full conversations that share their beginning (implicit prompt)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The answer starts at the last assistant turn before the point where they differ.
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if not shared:
        raise RecordError(
            "empty_conversation",
            "chosen and rejected share no prompt: add a 'prompt' field, or give both as full conversations that "
            "begin with the same user turn",
            "prompt",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """trl's extract_prompt for strings: the longest common prefix is the prompt (less a space before the split)."""
    index = 0
    while index < min(len(chosen), len(rejected)) and chosen[index] == rejected[index]:
        index += 1
    if index and index < len(chosen) and chosen[index - 1] == " ":
        index -= 1
    if not index:
        raise RecordError(
            "empty_conversation", "chosen and rejected share no prompt text: add a 'prompt' field", "prompt"
        )
    return chosen[:index], chosen[index:], rejected[index:]


def standard_text(record: Record, field: str, required: bool = True) -> str:
    """A plain-string field of a standard (trl) record."""
    value = record.get(field)
    if value is None:
        if required:
            raise RecordError("missing_field", "missing field", field)
        return ""
    if isinstance(value, (list, dict)):
        raise RecordError(
            "mixed_kinds",
            "holds messages, but this source's first record holds plain strings (trl's standard type); one "
            "source is either conversational or standard",
            field,
        )
    return build_text(value, field)


def system_turns(record: Record, options: FormatOptions) -> list[dict[str, Any]]:
    """The record's `system` column and `tools` definitions as system messages."""
    turns = []
    system = record.get("system")
    if system is not None and not (isinstance(system, str) and not system):
        turns.append(plain("system", build_text(system, "system")))
    tools = record.get("tools")
    if tools not in (None, "", []):
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError:
                raise RecordError("bad_type", "tools must be a JSON list of function definitions", "tools") from None
        if not isinstance(tools, list):
            tools = [tools]
        if tools:  # "[]": no tools
            turns.append(plain("system", render_tools(tools)))
    return turns


TOOLS_PREAMBLE = "You can call the following tools. Each line is one tool's JSON definition:"


def render_tools(tools: list[Any]) -> str:
    """Tool definitions as system text (the official DeepSeek-V3 template has no place for them)."""
    return "\n".join([TOOLS_PREAMBLE, *(json.dumps(tool, ensure_ascii=False) for tool in tools)])


def check_modalities(record: Record) -> None:
    """Images, audio and video cannot be trained: an error, never a silent drop."""
    for key in MODALITY_KEYS:
        if record.get(key) not in (None, "", []):
            raise RecordError(
                "unsupported_modality", f"the record has {key}: DeepSeek-V3 reads text only; remove them", key
            )


def with_system(messages: list[dict[str, Any]], system: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System turns first; a conversation's own leading system turns stay after the record's."""
    return [*system, *messages] if system else messages


def alpaca_prompt(record: Record, options: FormatOptions) -> list[dict[str, Any]]:
    """history pairs, then instruction (+ input) as the user turn."""
    instruction = build_text(require(record, "instruction"), "instruction")
    extra = record.get("input")
    extra = build_text(extra, "input") if extra not in (None, "") else ""
    user = options.join.join(t for t in (instruction, extra) if t)
    turns = []
    history = record.get("history")
    if history not in (None, []):
        if not isinstance(history, list):
            raise RecordError("bad_type", "history must be a list of [question, answer] pairs", "history")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RecordError("bad_type", "history must be a list of [question, answer] pairs", f"history[{i}]")
            turns += [
                plain("user", build_text(pair[0], f"history[{i}][0]")),
                plain("assistant", build_text(pair[1], f"history[{i}][1]")),
            ]
    return with_system([*turns, plain("user", user)], system_turns(record, options))


def conversation(record: Record, field: str, options: FormatOptions) -> list[dict[str, Any]]:
    """The messages of a messages / conversations field, with the record's system and tools."""
    return with_system(build_messages(require(record, field), field, options), system_turns(record, options))


def build_chat(record: Record, fmt: str, options: FormatOptions) -> list[dict[str, Any]]:
    """The messages of a chat-format record (messages, sharegpt, alpaca, conversational prompt_completion)."""
    if fmt in ("messages", "sharegpt"):
        field = "messages" if "messages" in record or "messages" in options.columns else "conversations"
        messages = conversation(record, field, options)
        check_conversation(messages, field)
        return messages
    if fmt == "alpaca":
        messages = [
            *alpaca_prompt(record, options),
            plain("assistant", build_text(require(record, "output"), "output")),
        ]
        check_conversation(messages, "instruction")
        return messages
    prompt = with_system(
        build_turns(require(record, "prompt"), "prompt", "user", options), system_turns(record, options)
    )
    completion = build_turns(require(record, "completion"), "completion", "assistant", options)
    check_conversation(prompt + completion, [("prompt", len(prompt)), ("completion", len(completion))])
    return prompt + completion


def prompt_conversation_field(record: Record) -> str | None:
    """The messages / conversations field holding a preference pair's prompt (it ends awaiting an answer); a full
    conversation there (UltraFeedback-binarized's `messages`) is not the prompt."""
    for field in ("messages", "conversations"):
        turns = dict.get(record, field)
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            last = turns[-1].get("role", turns[-1].get("from"))
            if last not in ("assistant", "gpt", "bot", "model", "chatgpt"):
                return field
    return None


def build_preference(record: Record, options: FormatOptions) -> dict[str, Any]:
    """prompt / chosen / rejected messages: explicit prompt, alpaca instruction, or shared beginning."""
    chosen = build_turns(require(record, "chosen"), "chosen", "assistant", options)
    rejected = build_turns(require(record, "rejected"), "rejected", "assistant", options)
    prompt_value = record.get("prompt")
    if "instruction" in record:
        prompt = alpaca_prompt(record, options)
    elif (field := prompt_conversation_field(record)) is not None:  # LLaMA-Factory ranking: the prompt turns
        prompt = conversation(record, field, options)
    elif isinstance(prompt_value, (str, list)) and (not chosen or chosen[0]["role"] == "assistant"):
        prompt = with_system(build_turns(prompt_value, "prompt", "user", options), system_turns(record, options))
    else:
        # No prompt, or a string prompt beside full conversations (UltraFeedback-binarized): the conversations'
        # shared beginning is the prompt, as trl's maybe_extract_prompt does.
        prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
        prompt = with_system(prompt, system_turns(record, options))
    check_conversation(prompt, "prompt", end="prompt")
    check_conversation(prompt + chosen, [("prompt", len(prompt)), ("chosen", len(chosen))])
    check_conversation(prompt + rejected, [("prompt", len(prompt)), ("rejected", len(rejected))])
    if chosen == rejected:
        raise RecordError("chosen_equals_rejected", "chosen and rejected are identical", "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def build_label(record: Record, field: str = "label") -> bool:
    """A KTO label: true/false or 1/0."""
    label = require(record, field)
    if not isinstance(label, bool) and label not in (0, 1):
        raise RecordError("bad_type", f"label must be true or false, got {label!r}", field)
    return bool(label)


def build_segments(value: Any) -> list[dict[str, Any]]:
    """axolotl's input_output segments: a list of {"text": str, "label": bool}, at least one labelled true."""
    if not isinstance(value, list) or not value:
        raise RecordError("bad_type", "expected a non-empty list of {text, label} segments", "segments")
    segments = []
    for i, segment in enumerate(value):
        where = f"segments[{i}]"
        if not isinstance(segment, dict):
            raise RecordError(
                "bad_type", f"expected an object with text and label, got {type(segment).__name__}", where
            )
        unknown = sorted(set(segment) - {"text", "label"})
        if unknown:
            raise RecordError("unknown_field", f"unknown keys {unknown} (a segment has text and label)", where)
        text, label = segment.get("text"), segment.get("label")
        if not isinstance(text, str):
            raise RecordError("bad_type", "text must be a string", f"{where}.text")
        if not isinstance(label, bool):
            raise RecordError("bad_type", "label must be true or false", f"{where}.label")
        segments.append({"text": text, "label": label})
    if not any(s["label"] and s["text"].strip() for s in segments):
        raise RecordError("no_target", "no segment with label true and text to train", "segments")
    return segments


def to_canonical(
    record: dict[str, Any], fmt: str, kind: str | None = None, options: FormatOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    """Convert one record of format `fmt` to its canonical example of `kind`, checking it; raises RecordError."""
    examples = to_canonical_examples(options.rename(record), fmt, kind or FORMAT_KINDS[fmt], options)
    return examples[0]


def to_canonical_examples(record: Record, fmt: str, kind: str, options: FormatOptions) -> list[dict[str, Any]]:
    """The canonical examples of one record (two when a preference pair is unpaired for KTO)."""
    if fmt not in FORMAT_KINDS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMAT_KINDS)}")
    check_modalities(record)
    if kind == "chat":
        return [{"messages": build_chat(record, fmt, options)}]
    if kind == "preference":
        return [build_preference(record, options)]
    if kind == "kto" and fmt == "preference":
        pair = build_preference(record, options)
        return [
            {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
        ]
    if kind == "kto":
        if fmt in ("messages", "sharegpt", "alpaca"):  # LLaMA-Factory KTO: a conversation and its kto_tag
            messages = build_chat(record, fmt, options)
            prompt, completion = messages[:-1], messages[-1:]
        else:
            prompt = with_system(
                build_turns(require(record, "prompt"), "prompt", "user", options), system_turns(record, options)
            )
            completion = build_turns(require(record, "completion"), "completion", "assistant", options)
            check_conversation(prompt, "prompt", end="prompt")
            check_conversation(prompt + completion, [("prompt", len(prompt)), ("completion", len(completion))])
        return [{"prompt": prompt, "completion": completion, "label": build_label(record)}]
    if kind == "text_preference" or (kind == "text_kto" and fmt == "preference"):
        chosen, rejected = standard_text(record, "chosen"), standard_text(record, "rejected")
        if record.get("prompt") is not None:
            prompt = standard_text(record, "prompt")
        else:
            prompt, chosen, rejected = split_shared_text(chosen, rejected)
        if not chosen.strip() or not rejected.strip():
            raise RecordError("empty_content", "empty answer", "chosen" if not chosen.strip() else "rejected")
        if chosen == rejected:
            raise RecordError("chosen_equals_rejected", "chosen and rejected are identical", "rejected")
        if kind == "text_kto":
            return [
                {"prompt": prompt, "completion": chosen, "label": True},
                {"prompt": prompt, "completion": rejected, "label": False},
            ]
        return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
    if kind in ("text_completion", "text_kto"):
        if fmt == "text":
            prompt, completion = "", standard_text(record, "text")
        else:
            prompt, completion = standard_text(record, "prompt"), standard_text(record, "completion")
        if not completion.strip():
            raise RecordError("empty_content", "empty completion", "text" if fmt == "text" else "completion")
        if kind == "text_kto":
            return [{"prompt": prompt, "completion": completion, "label": build_label(record)}]
        return [{"prompt": prompt, "completion": completion}]
    if kind == "segments":
        return [{"segments": build_segments(require(record, "segments"))}]
    if kind == "text":
        text = require(record, "text")
        if not isinstance(text, str):
            raise RecordError("bad_type", f"expected a string, got {type(text).__name__}", "text")
        if not text.strip():
            raise RecordError("empty_content", "empty text", "text")
        return [{"text": text}]
    raise ValueError(f"format {fmt!r} cannot give {kind} examples")
