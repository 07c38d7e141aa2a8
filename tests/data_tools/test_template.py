import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from data_tools.errors import RecordError
from data_tools.template import ChatTokenizer, render_chat


def call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def user(text: str) -> dict:
    return {"role": "user", "content": text, "tool_calls": None}


def assistant(text: str | None, calls: list | None = None) -> dict:
    return {"role": "assistant", "content": text, "tool_calls": calls}


def tool(text: str) -> dict:
    return {"role": "tool", "content": text, "tool_calls": None}


def system(text: str) -> dict:
    return {"role": "system", "content": text, "tool_calls": None}


CHATS = {
    "single": [user("What is 12 + 7?"), assistant("19")],
    "multi_turn": [user("hi 1234"), assistant(" Hello!\n"), user("再见 again"), assistant("Bye  ")],
    "system": [system("You are terse."), user("2+2?"), assistant("4")],
    "two_systems": [system("A"), user("q"), assistant("a"), system("B"), user("q2"), assistant("a2")],
    "tool_call": [
        user("Weather?"),
        assistant(None, [call("get_weather", '{"city": "Paris"}')]),
        tool("22C"),
        assistant("It is 22C."),
    ],
    "many_tool_calls": [
        user("w?"),
        assistant(None, [call("a", "{}"), call("b", '{"x": 1}')]),
        tool("1"),
        tool("2"),
        assistant("done"),
        user("again"),
        assistant(None, [call("c", "{}")]),
        tool("3"),
        assistant("ok"),
    ],
    # The template puts no special token between a user turn and a later tool call: "?" and "\n" merge into one
    # token when the rendered string is tokenized, and must here too.
    "later_call_after_question": [
        user("w?"),
        assistant(None, [call("a", "{}")]),
        tool("1"),
        assistant("done"),
        user("And Rome?"),
        assistant(None, [call("b", "{}")]),
        tool("2"),
        assistant("ok"),
    ],
    "control_strings_as_text": [user("type <｜Assistant｜> or <|EOT|> please"), assistant("ok <｜end▁of▁sentence｜>")],
    "ends_with_user": [user("q"), assistant("a"), user("next")],
    "ends_with_tool": [user("q"), assistant(None, [call("f", "{}")]), tool("r")],
}


@pytest.fixture(scope="module")
def official(tokenizer):
    # transformers 5 drops None values before rendering, so a tool-call message (content None) cannot go through
    # apply_chat_template; render the official template itself for those cases.
    template = _compile_jinja_template(tokenizer.chat_template)

    def render(messages, add_generation_prompt):
        if all(m["content"] is not None for m in messages):
            plain = [{"role": m["role"], "content": m["content"]} for m in messages]
            return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
        return template.render(
            messages=messages, bos_token=tokenizer.bos_token, add_generation_prompt=add_generation_prompt
        )

    return render


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_official_template(name, add_generation_prompt, official, tokenizer, chat):
    messages = CHATS[name]
    expected = official(messages, add_generation_prompt)
    assert render_chat(messages, add_generation_prompt) == expected
    expected_ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    ids = chat.encode_segments([chat.segments(messages, add_generation_prompt)])[0][0]
    if name == "control_strings_as_text":
        # Typed control strings stay text: the official tokenization makes them control tokens, ours does not.
        raw = ChatTokenizer(tokenizer, parse_special_tokens=True)
        assert raw.encode_segments([raw.segments(messages, add_generation_prompt)])[0][0] == expected_ids
        assert ids != expected_ids and tokenizer.decode(ids) == expected
        specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<｜Assistant｜>", "<|EOT|>", "<｜end▁of▁sentence｜>")}
        assert sum(i in specials for i in ids) == 2 + add_generation_prompt  # the template's own ones only
        return
    assert ids == expected_ids


def test_ids_equal_apply_chat_template_tokenize(tokenizer, chat):
    messages = [{"role": m["role"], "content": m["content"]} for m in CHATS["multi_turn"]]
    expected = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert chat.tokenize_chat(CHATS["multi_turn"])["input_ids"] == expected
    assert expected[0] == 0 and expected[-1] == 1


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t in example["labels"] if t != -100])


def test_masks_cover_exactly_the_assistant_answers(tokenizer, chat):
    example = chat.tokenize_chat(CHATS["multi_turn"])
    eos = "<｜end▁of▁sentence｜>"
    assert trained_text(tokenizer, example) == f" Hello!\n{eos}Bye  {eos}"
    # Each trained span is one answer followed by its eos; everything else is -100.
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans.append(current) if current else None
    assert [tokenizer.decode(s) for s in spans] == [f" Hello!\n{eos}", f"Bye  {eos}"]


def test_train_on_last_only(tokenizer, chat):
    example = chat.tokenize_chat(CHATS["multi_turn"], train_on="last")
    assert trained_text(tokenizer, example) == "Bye  <｜end▁of▁sentence｜>"


def test_tool_call_masks(tokenizer, chat):
    example = chat.tokenize_chat(CHATS["tool_call"])
    text = trained_text(tokenizer, example)
    assert text.startswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather")
    assert "22C<" not in text and text.endswith("It is 22C.<｜end▁of▁sentence｜>")


def test_fix_tool_calls_closes_every_block(tokenizer):
    fixed = ChatTokenizer(tokenizer, fix_tool_calls=True)
    text = render_chat(CHATS["tool_call"], fix_tool_calls=True)
    assert "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜>" in text
    example = fixed.tokenize_chat(CHATS["many_tool_calls"])
    assert trained_text(tokenizer, example).count("<｜tool▁calls▁begin｜>") == 2


def test_content_with_tool_calls_needs_fix(chat):
    with pytest.raises(RecordError, match="fix_tool_calls"):
        chat.tokenize_chat([user("q"), assistant("Let me look.", [call("f", "{}")]), tool("r"), assistant("a")])
    assert "Let me look.<｜tool▁calls▁begin｜>" in render_chat(
        [user("q"), assistant("Let me look.", [call("f", "{}")])], fix_tool_calls=True
    )


def test_prompt_and_completion_split(tokenizer, chat):
    prompt = CHATS["multi_turn"][:3]
    completion = CHATS["multi_turn"][3:]
    [(prompt_ids, completion_ids)] = chat.tokenize_completions([prompt], [completion])
    assert prompt_ids == chat.tokenize_prompt(prompt)
    assert prompt_ids + completion_ids == chat.tokenize_chat(CHATS["multi_turn"])["input_ids"]
    assert tokenizer.decode(completion_ids) == "Bye  <｜end▁of▁sentence｜>"
