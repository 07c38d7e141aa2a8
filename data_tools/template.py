"""The DeepSeek-V3 chat format: canonical messages -> token ids with loss masks on the assistant's tokens.

The renderer is a port of the official chat template (tokenizer_config.json of deepseek-ai/DeepSeek-V3), quirks
included, so that `render_chat(m) == tokenizer.apply_chat_template(m, tokenize=False)`:
- every system message, wherever it stands, is joined with "\\n\\n" and placed right after the bos token;
- no newlines between turns, content is not stripped, no `<think>` handling;
- tool calls: only the first tool call of the whole conversation opens with `<｜tool▁calls▁begin｜>`, and
  `<｜tool▁calls▁end｜><｜end▁of▁sentence｜>` follows every tool call but the first; so a message with a single tool
  call is never closed. `fix_tool_calls=True` renders every tool-call message as a closed block instead
  (`<｜Assistant｜>[content]<｜tool▁calls▁begin｜>call\\ncall<｜tool▁calls▁end｜><｜end▁of▁sentence｜>`) and opens
  every group of tool outputs with `<｜tool▁outputs▁begin｜>`; use it to train tool use.

Token ids are built segment by segment: every piece of content lies between two special tokens, and the tokenizer
splits on special tokens before anything else, so encoding the pieces apart gives exactly the ids of the whole
string, and tells us which tokens belong to the assistant.
"""

import json
import re
from typing import Any, Literal, NamedTuple

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from data_tools.errors import RecordError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
SPECIAL_TOKENS = (
    BOS,
    EOS,
    USER,
    ASSISTANT,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_SEP,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
)

IGNORE_INDEX = -100
TrainOn = Literal["all", "last"]


class Segment(NamedTuple):
    """A special token or a run of text, whether the model learns to produce it, and the message it belongs to."""

    text: str
    special: bool
    trained: bool
    message: int  # index in the messages list; -1 for the header (bos, system), len(messages) for a prompt suffix


def build_chat_segments(
    messages: list[dict[str, Any]], add_generation_prompt: bool = False, fix_tool_calls: bool = False
) -> list[Segment]:
    """Render canonical messages as segments, exactly as the official template orders them."""
    segments: list[Segment] = []

    def context_only(index: int) -> bool:  # an assistant turn marked train: false (OpenAI's weight 0)
        return 0 <= index < len(messages) and messages[index].get("train") is False

    def special(token: str, trained: bool, index: int) -> None:
        segments.append(Segment(token, True, trained and not context_only(index), index))

    def text(value: str, trained: bool, index: int) -> None:
        if value:
            segments.append(Segment(value, False, trained and not context_only(index), index))

    def tool_call(call: dict[str, Any], index: int) -> None:
        function = call["function"]
        special(TOOL_CALL_BEGIN, True, index)
        text(call.get("type") or "function", True, index)
        special(TOOL_SEP, True, index)
        text(function["name"] + "\n```json\n" + function["arguments"] + "\n```", True, index)
        special(TOOL_CALL_END, True, index)

    special(BOS, False, -1)
    text("\n\n".join(m["content"] for m in messages if m["role"] == "system"), False, -1)
    tool_call_seen = False  # the template's ns.is_first: never reset, so only the first call opens a block
    after_tool = False  # ns.is_tool
    first_output = True  # ns.is_output_first
    for index, message in enumerate(messages):
        role, content = message["role"], message.get("content")
        calls = message.get("tool_calls") or []
        if role == "user":
            after_tool = False
            special(USER, False, index)
            text(content, False, index)
        elif role == "assistant" and fix_tool_calls and calls:
            special(TOOL_OUTPUTS_END if after_tool else ASSISTANT, False, index)
            text(content or "", True, index)
            special(TOOL_CALLS_BEGIN, True, index)
            for number, call in enumerate(calls):
                if number:
                    text("\n", True, index)
                tool_call(call, index)
            special(TOOL_CALLS_END, True, index)
            special(EOS, True, index)
            after_tool = False
        elif role == "assistant" and content is None:
            after_tool = False
            for call in calls:
                if not tool_call_seen:
                    special(ASSISTANT, False, index)
                    special(TOOL_CALLS_BEGIN, True, index)
                    tool_call(call, index)
                    tool_call_seen = True
                else:
                    text("\n", True, index)
                    tool_call(call, index)
                    special(TOOL_CALLS_END, True, index)
                    special(EOS, True, index)
        elif role == "assistant":
            if calls:
                raise RecordError(
                    "unsupported",
                    f"message {index + 1}: assistant message has both content and tool_calls; the official "
                    "DeepSeek-V3 template drops the tool calls (render with fix_tool_calls=True)",
                    "tool_calls",
                )
            special(TOOL_OUTPUTS_END if after_tool else ASSISTANT, False, index)
            after_tool = False
            text(content, True, index)
            special(EOS, True, index)
        elif role == "tool":
            if fix_tool_calls:
                first_output = not after_tool
            after_tool = True
            if first_output:
                special(TOOL_OUTPUTS_BEGIN, False, index)
                first_output = False
            else:
                text("\n", False, index)
            special(TOOL_OUTPUT_BEGIN, False, index)
            text(content, False, index)
            special(TOOL_OUTPUT_END, False, index)
    if after_tool:
        special(TOOL_OUTPUTS_END, False, len(messages))
    elif add_generation_prompt:
        special(ASSISTANT, False, len(messages))
    return segments


def render_chat(
    messages: list[dict[str, Any]], add_generation_prompt: bool = False, fix_tool_calls: bool = False
) -> str:
    """The chat as the string the official template renders."""
    return "".join(s.text for s in build_chat_segments(messages, add_generation_prompt, fix_tool_calls))


class ChatTokenizer:
    """Turns canonical examples into token ids and labels in the DeepSeek-V3 chat format, a batch at a time."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, fix_tool_calls: bool = False, parse_special_tokens: bool = False
    ):
        self.tokenizer = tokenizer
        self.fix_tool_calls = fix_tool_calls
        self.parse_special_tokens = parse_special_tokens
        self.special_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
        self.bos_id = self.special_ids[BOS]
        self.eos_id = self.special_ids[EOS]
        # The Rust tokenizer directly: one call per batch, no Python-side offsets.
        self.backend = getattr(tokenizer, "_tokenizer", None)
        self.text_backend = self.backend
        self.control, self.max_token_chars = tokenizer_facts(tokenizer)
        if self.backend is not None and not parse_special_tokens:
            self.text_backend = build_text_backend(self.backend)

    def __setstate__(self, state: dict) -> None:
        # datasets' num_proc workers get a pickled copy: the Rust tokenizer's encode_special_tokens flag is not part
        # of what it serialises, so it is set again (else typed control strings become control tokens there).
        self.__dict__.update(state)
        if self.text_backend is not None and not self.parse_special_tokens:
            self.text_backend.encode_special_tokens = True

    def has_control(self, text: str | None) -> bool:
        """Whether `text` holds a control-token string (e.g. a typed `<｜Assistant｜>`)."""
        return (
            bool(text)
            and self.control is not None
            and ("<｜" in text or "<|" in text)
            and bool(self.control.search(text))
        )

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of plain text pieces (no bos or eos added). Control-token strings inside the text stay text
        unless parse_special_tokens is set."""
        if not texts:
            return []
        if self.text_backend is not None:
            return [e.ids for e in self.text_backend.encode_batch_fast(texts, add_special_tokens=False)]
        if not self.parse_special_tokens and any(self.has_control(t) for t in texts):
            raise ValueError("control-token strings in text need a fast tokenizer to be encoded as text")
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_segments(self, batch: list[list[Segment]]) -> list[tuple[list[int], list[bool]]]:
        """Token ids and trained flags for each segment list of a batch.

        Adjacent text segments (the official template puts no special token between a user turn and a later tool
        call) are encoded together, as tokenizing the rendered string does; a token that spans trained and
        untrained text is not trained."""
        texts: list[str] = []
        plans = []
        for segments in batch:
            plan = []  # (special id or None, trained flag or None when mixed, the joined parts when mixed)
            i, n = 0, len(segments)
            while i < n:
                segment = segments[i]
                if segment.special:
                    plan.append((self.special_ids[segment.text], segment.trained, None))
                    i += 1
                    continue
                j = i + 1
                while j < n and not segments[j].special:
                    j += 1
                if j == i + 1:
                    texts.append(segment.text)
                    plan.append((None, segment.trained, None))
                else:
                    parts = segments[i:j]
                    texts.append("".join(p.text for p in parts))
                    same = all(p.trained == segment.trained for p in parts)
                    plan.append((None, segment.trained if same else None, None if same else parts))
                i = j
            plans.append(plan)
        encoded = iter(self.encode_texts(texts))
        results = []
        for plan in plans:
            ids: list[int] = []
            trained: list[bool] = []
            for special_id, flag, parts in plan:
                if special_id is not None:
                    ids.append(special_id)
                    trained.append(flag)
                    continue
                piece = next(encoded)
                ids.extend(piece)
                trained.extend([flag] * len(piece) if flag is not None else self.mixed_flags(parts))
            results.append((ids, trained))
        return results

    def mixed_flags(self, parts: list[Segment]) -> list[bool]:
        """Per-token trained flags of adjacent trained and untrained text: a token is trained when every character
        it covers is."""
        text = "".join(p.text for p in parts)
        chars = [p.trained for p in parts for _ in p.text]
        encoding = (self.text_backend or self.backend).encode(text, add_special_tokens=False)
        return [all(chars[a:b]) if b > a else chars[min(a, len(chars) - 1)] for a, b in encoding.offsets]

    def segments(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, train_on: TrainOn = "all"
    ) -> list[Segment]:
        """Segments of a chat; with train_on="last" only the last assistant turn stays trained."""
        segments = build_chat_segments(messages, add_generation_prompt, self.fix_tool_calls)
        if train_on == "last":
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
            segments = [s if s.message >= last else s._replace(trained=False) for s in segments]
        elif train_on != "all":
            raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
        return segments

    def tokenize_chats(
        self, chats: list[list[dict[str, Any]]], train_on: TrainOn = "all"
    ) -> list[dict[str, list[int]]]:
        """input_ids and labels (-100 where not trained) for each chat; labels[0] is always -100."""
        encoded = self.encode_segments([self.segments(messages, train_on=train_on) for messages in chats])
        return [build_labeled(ids, trained) for ids, trained in encoded]

    def tokenize_chat(self, messages: list[dict[str, Any]], train_on: TrainOn = "all") -> dict[str, list[int]]:
        """input_ids and labels of one chat."""
        return self.tokenize_chats([messages], train_on)[0]

    def tokenize_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of a prompt with the generation prompt appended, as for inference."""
        return self.encode_segments([build_chat_segments(messages, True, self.fix_tool_calls)])[0][0]

    def tokenize_completions(
        self, prompts: list[list[dict[str, Any]]], completions: list[list[dict[str, Any]]]
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt_ids, completion_ids) pairs: the prompt ends with the generation prompt, the completion is what the
        model must produce (its content, tool calls and eos)."""
        batch = []
        for prompt, completion in zip(prompts, completions):
            # Only the completion's own trained tokens count: assistant turns inside the prompt are context here.
            segments = build_chat_segments(prompt + completion, False, self.fix_tool_calls)
            batch.append([s._replace(trained=s.trained and s.message >= len(prompt)) for s in segments])
        results = []
        for ids, trained in self.encode_segments(batch):
            # The completion starts at its first trained token; its generation prompt stays with the prompt.
            start = next((i for i, t in enumerate(trained) if t), len(ids))
            results.append((ids[:start], ids[start:]))
        return results


FACTS: dict[int, tuple[Any, "re.Pattern | None", int]] = {}  # id(tokenizer) -> (tokenizer kept alive, facts...)


def tokenizer_facts(tokenizer: PreTrainedTokenizerBase) -> tuple["re.Pattern | None", int]:
    """(a pattern matching every added token's string, the most characters one token can span), once per tokenizer.

    No token spans more characters than its byte-level string has bytes: a text of more than max_token_chars * n
    characters has more than n tokens, known without tokenizing it."""
    cached = FACTS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1], cached[2]
    specials = {a.content for a in getattr(tokenizer, "added_tokens_decoder", {}).values() if a.special}
    added = sorted(
        (t for t in tokenizer.get_added_vocab() if t in specials or t in SPECIAL_TOKENS), key=len, reverse=True
    )
    control = re.compile("|".join(re.escape(t) for t in added)) if added else None
    vocab = tokenizer.get_vocab()
    longest = max((len(token) for token in vocab), default=1)
    FACTS[id(tokenizer)] = (tokenizer, control, longest)
    return control, longest


TEXT_BACKENDS: dict[int, tuple[Tokenizer, Tokenizer]] = {}  # id(backend) -> (backend kept alive, its text copy)


def build_text_backend(backend: Tokenizer) -> Tokenizer:
    """A copy of the Rust tokenizer that encodes every added token's string as plain text: chat content is text,
    and a user typing `<｜Assistant｜>` must not open an assistant turn. Built once per tokenizer (1.6 s)."""
    cached = TEXT_BACKENDS.get(id(backend))
    if cached is not None and cached[0] is backend:
        return cached[1]
    spec = json.loads(backend.to_str())
    for token in spec.get("added_tokens", []):
        # The chat template's control tokens are text in content; other non-special added tokens (a `<think>` a
        # reasoning tokenizer adds) stay tokens, as the official tokenization has them.
        token["special"] = bool(token.get("special")) or token["content"] in SPECIAL_TOKENS
    text_backend = Tokenizer.from_str(json.dumps(spec))
    text_backend.encode_special_tokens = True
    TEXT_BACKENDS[id(backend)] = (backend, text_backend)
    return text_backend


def build_labeled(ids: list[int], trained: list[bool]) -> dict[str, list[int]]:
    """input_ids and labels from trained flags; the first label is masked so packed samples never predict across."""
    labels = [token if flag else IGNORE_INDEX for token, flag in zip(ids, trained)]
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}
