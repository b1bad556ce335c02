"""Tool calling with SmolLM2: its own chat template (which knows no tools: pyxf's generic JSON
protocol) and a Hermes-style template written for tools (rendered as transformers renders it, calls
in <tool_call> blocks). Required and named calls are generated under their arguments' schema, so
they validate with `jsonschema`."""

import json
import shutil

import pytest

pytest.importorskip("llguidance")
transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

import helpers

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# A Hermes-style template (as Qwen 2.5 and SmolLM3 write theirs): tools in the system turn, calls in
# <tool_call> blocks, results in tool turns.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions. Signatures:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Return each call as <tool_call>\n{\"name\": <name>, \"arguments\": <args>}\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}\n<|im_start|>assistant"
    "{%- for call in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments }}}\n</tool_call>{%- endfor %}<|im_end|>"
    "{%- elif message.role == 'tool' %}\n<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>"
    "{%- else %}\n<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}\n<|im_start|>assistant\n{%- endif %}"
)

WEATHER = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


@pytest.fixture(scope="module")
def smol():
    helpers.require_core()
    import pyxf
    from pyxf import hub

    return pyxf.load(hub.default_model_path())


@pytest.fixture(scope="module")
def hermes(smol, tmp_path_factory):
    """SmolLM2 with the Hermes-style template in its config."""
    import pyxf

    target = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(smol.path, target)
    config = json.loads((target / "config.json").read_text())
    config["chat_template"] = HERMES_TEMPLATE
    (target / "config.json").write_text(json.dumps(config))
    return pyxf.load(target)


def check_call(call, names):
    assert call["type"] == "function" and call["id"].startswith("call_")
    name = call["function"]["name"]
    assert name in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[name])


def test_a_template_written_for_tools_renders_as_in_transformers(hermes):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hermes.path / "tokenizer.json"))
    hf.chat_template = HERMES_TEMPLATE
    messages = WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert hermes.tokenizer.apply_chat_template(messages, tools=TOOLS) == expected


@pytest.mark.parametrize("template", ["generic", "hermes"])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_calls_follow_the_schema(smol, hermes, template, tool_choice):
    import pyxf

    model = smol if template == "generic" else hermes
    result = pyxf.generate(model, messages=WEATHER, tools=TOOLS, tool_choice=tool_choice, max_new_tokens=80,
                           return_details=True)
    assert result.finish_reason == "tool_calls", result
    assert len(result.tool_calls) == 1
    names = {"add"} if isinstance(tool_choice, dict) else set(PARAMS)
    check_call(result.tool_calls[0], names)


def test_auto_calls_or_answers_and_none_answers(smol):
    import pyxf

    auto = pyxf.generate(smol, messages=WEATHER, tools=TOOLS, max_new_tokens=80, return_details=True)
    if auto.tool_calls:
        assert auto.finish_reason == "tool_calls"
        check_call(auto.tool_calls[0], set(PARAMS))
    else:
        assert isinstance(auto.text, str) and auto.text
    none = pyxf.generate(smol, messages=WEATHER, tools=TOOLS, tool_choice="none", max_new_tokens=20,
                         return_details=True)
    assert none.tool_calls is None and none.text


def test_a_tool_result_goes_back_into_the_conversation(smol, hermes):
    import pyxf

    for model in (smol, hermes):
        first = pyxf.generate(model, messages=WEATHER, tools=TOOLS, tool_choice="required", max_new_tokens=80,
                              return_details=True)
        messages = WEATHER + [
            {"role": "assistant", "content": None, "tool_calls": first.tool_calls},
            {"role": "tool", "tool_call_id": first.tool_calls[0]["id"], "content": "18 C and sunny"},
        ]
        second = pyxf.generate(model, messages=messages, tools=TOOLS, tool_choice="none", max_new_tokens=30,
                               return_details=True)
        assert second.finish_reason in ("stop", "length") and second.text


def test_bad_tools_are_value_errors(smol):
    import pyxf

    with pytest.raises(ValueError, match="tools must be"):
        pyxf.generate(smol, messages=WEATHER, tools=[])
    with pytest.raises(ValueError, match="not among the tools"):
        pyxf.generate(smol, messages=WEATHER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    with pytest.raises(ValueError, match="tools need messages"):
        pyxf.generate(smol, "prompt", tools=TOOLS)
