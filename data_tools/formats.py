"""Every common record format -> one canonical example, with the checks that catch bad records.

Canonical examples (what the rest of the toolkit consumes):
- chat: {"messages": [{"role", "content", "tool_calls"}]}; content is None only for a tool-call message;
- preference: {"prompt": messages, "chosen": messages, "rejected": messages}; chosen/rejected are assistant turns;
- kto: {"prompt": messages, "completion": messages, "label": bool};
- text: {"text": str}.
"""

import json
from typing import Any

import datasets

from data_tools.errors import RecordError

# format -> the kind of canonical example it becomes
FORMAT_KINDS = {
    "messages": "chat",
    "sharegpt": "chat",
    "alpaca": "chat",
    "prompt_completion": "chat",
    "preference": "preference",
    "kto": "kto",
    "text": "text",
    # Plain-text prompt/completion for the cpt task: no chat template, loss on the completion only (as trl's
    # standard, non-conversational prompt-completion data); declared with `format: text_completion`.
    "text_completion": "text_completion",
}
TASK_KINDS = {"sft": "chat", "dpo": "preference", "kto": "kto", "cpt": "text"}
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}

MESSAGE_FEATURES = {
    "role": datasets.Value("string"),
    "content": datasets.Value("string"),
    "tool_calls": datasets.List(
        {
            "type": datasets.Value("string"),
            "function": {"name": datasets.Value("string"), "arguments": datasets.Value("string")},
        }
    ),
}
MESSAGES = datasets.List(MESSAGE_FEATURES)
KIND_FEATURES = {
    "chat": {"messages": MESSAGES},
    "preference": {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES},
    "kto": {"prompt": MESSAGES, "completion": MESSAGES, "label": datasets.Value("bool")},
    "text": {"text": datasets.Value("string")},
    "text_completion": {"prompt": datasets.Value("string"), "completion": datasets.Value("string")},
}
# Where each row came from, and what was wrong with it: kept until the row is tokenized.
LOCATION_FEATURES = {"_file": datasets.Value("string"), "_line": datasets.Value("int64")}
ERROR_FEATURES = {
    "_error": datasets.Value("string"),
    "_field": datasets.Value("string"),
    "_reason": datasets.Value("string"),
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
    }[kind]


def detect_format(record: dict[str, Any]) -> str:
    """Name the format of a record from its keys."""
    keys = set(record)
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
        return "text"
    raise RecordError("unknown_format", f"cannot detect the format from the keys {sorted(keys)}")


def require(record: dict[str, Any], field: str) -> Any:
    """The value of a required field (absent or null is an error)."""
    value = record.get(field)
    if value is None:
        raise RecordError("missing_field", "missing field", field)
    return value


def build_text(value: Any, field: str) -> str:
    """Message content as a string; OpenAI-style lists of text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise RecordError("bad_type", f"expected a string, got {type(value).__name__}", field)


def build_tool_calls(calls: Any, field: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls with arguments as a JSON string."""
    if not isinstance(calls, list):
        raise RecordError("bad_type", "tool_calls must be a list", field)
    result = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError("bad_type", "each tool call needs function.name", field)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        result.append(
            {"type": call.get("type") or "function", "function": {"name": function["name"], "arguments": arguments}}
        )
    return result


def build_message(message: Any, field: str, role_map: dict[str, str] | None = None) -> dict[str, Any]:
    """One canonical message from an OpenAI-style (role/content) or ShareGPT (from/value) dict."""
    if not isinstance(message, dict):
        raise RecordError("bad_type", f"expected a message object, got {type(message).__name__}", field)
    if role_map is None:
        role = message.get("role")
        if role not in ROLES:
            raise RecordError("unknown_role", f"unknown role {role!r}", field)
        content = message.get("content")
    else:
        source_role = message.get("from")
        role = role_map.get(source_role) if isinstance(source_role, str) else None
        if role is None:
            raise RecordError("unknown_role", f"unknown role {source_role!r}", field)
        content = message.get("value")
    calls = build_tool_calls(message["tool_calls"], field) if message.get("tool_calls") else []
    if role == "assistant" and calls:
        # The template tests `content is none` to render tool calls; "" would drop them.
        text = build_text(content, field) if content is not None else ""
        return {"role": role, "content": text or None, "tool_calls": calls}
    if content is None:
        raise RecordError("missing_field", "message has no content", field)
    return {"role": role, "content": build_text(content, field), "tool_calls": None}


def build_messages(value: Any, field: str, role_map: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A list of canonical messages; a plain string becomes one message of `default_role`."""
    if not isinstance(value, list):
        raise RecordError("bad_type", f"expected a list of messages, got {type(value).__name__}", field)
    return [build_message(m, f"{field}[{i}]", role_map) for i, m in enumerate(value)]


def build_turns(value: Any, field: str, role: str) -> list[dict[str, Any]]:
    """Messages from either a plain string (one `role` turn) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value, "tool_calls": None}]
    return build_messages(value, field)


def check_conversation(messages: list[dict[str, Any]], field: str, end: str = "assistant") -> None:
    """Raise unless the roles alternate: system*, then user, assistant (tool-call -> tool+ -> assistant), ...

    `end` is the role group the conversation must finish on: "assistant" for training chats, "prompt" for a prompt
    awaiting an answer (user or tool).
    """
    if not messages:
        raise RecordError("empty_conversation", "empty conversation", field)
    previous = None
    started = False
    for i, message in enumerate(messages):
        role = message["role"]
        where = f"{field}[{i}]"
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
        raise RecordError("empty_conversation", "conversation has only system messages", field)
    if end == "assistant" and (previous["role"] != "assistant" or previous["tool_calls"]):
        raise RecordError("non_alternating", "conversation does not end with an assistant answer", field)
    if end == "prompt" and previous["role"] not in ("user", "tool"):
        raise RecordError("non_alternating", "prompt must end with a user or tool message", field)


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
    return chosen[:shared], chosen[shared:], rejected[shared:]


def to_canonical(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Convert one record of format `fmt` to its canonical example, checking it; raises RecordError."""
    if fmt == "messages":
        field = "messages" if "messages" in record else "conversations"
        messages = build_messages(require(record, field), field)
        check_conversation(messages, field)
        return {"messages": messages}
    if fmt == "sharegpt":
        messages = build_messages(require(record, "conversations"), "conversations", SHAREGPT_ROLES)
        if isinstance(record.get("system"), str) and record["system"]:
            messages = [{"role": "system", "content": record["system"], "tool_calls": None}, *messages]
        check_conversation(messages, "conversations")
        return {"messages": messages}
    if fmt == "alpaca":
        instruction = build_text(require(record, "instruction"), "instruction")
        extra = record.get("input")
        user = f"{instruction}\n\n{build_text(extra, 'input')}" if extra else instruction
        messages = [
            {"role": "user", "content": user, "tool_calls": None},
            {"role": "assistant", "content": build_text(require(record, "output"), "output"), "tool_calls": None},
        ]
        if isinstance(record.get("system"), str) and record["system"]:
            messages.insert(0, {"role": "system", "content": record["system"], "tool_calls": None})
        check_conversation(messages, "instruction")
        return {"messages": messages}
    if fmt == "prompt_completion":
        prompt = build_turns(require(record, "prompt"), "prompt", "user")
        completion = build_turns(require(record, "completion"), "completion", "assistant")
        check_conversation(prompt + completion, "completion")
        return {"messages": prompt + completion}
    if fmt == "preference":
        chosen = build_turns(require(record, "chosen"), "chosen", "assistant")
        rejected = build_turns(require(record, "rejected"), "rejected", "assistant")
        if record.get("prompt") is not None:
            prompt = build_turns(record["prompt"], "prompt", "user")
        else:
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
        check_conversation(prompt, "prompt", end="prompt")
        check_conversation(prompt + chosen, "chosen")
        check_conversation(prompt + rejected, "rejected")
        if chosen == rejected:
            raise RecordError("chosen_equals_rejected", "chosen and rejected are identical", "rejected")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == "kto":
        prompt = build_turns(require(record, "prompt"), "prompt", "user")
        completion = build_turns(require(record, "completion"), "completion", "assistant")
        check_conversation(prompt, "prompt", end="prompt")
        check_conversation(prompt + completion, "completion")
        label = require(record, "label")
        if not isinstance(label, bool) and label not in (0, 1):
            raise RecordError("bad_type", f"label must be true or false, got {label!r}", "label")
        return {"prompt": prompt, "completion": completion, "label": bool(label)}
    if fmt == "text_completion":
        values = {}
        for field in ("prompt", "completion"):
            values[field] = require(record, field)
            if not isinstance(values[field], str):
                raise RecordError("bad_type", f"expected a string, got {type(values[field]).__name__}", field)
        if not values["completion"].strip():
            raise RecordError("empty_content", "empty completion", "completion")
        return values
    if fmt == "text":
        text = require(record, "text")
        if not isinstance(text, str):
            raise RecordError("bad_type", f"expected a string, got {type(text).__name__}", "text")
        if not text.strip():
            raise RecordError("empty_content", "empty text", "text")
        return {"text": text}
    raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMAT_KINDS)}")
