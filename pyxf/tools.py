"""Tool (function) calling: OpenAI's `tools` and `tool_choice` on top of chat templates and
structured output.

Two ways, chosen by the chat template:
- a template written for tools (it reads `tools`, as Qwen's and Hermes-style ones do) gets them as
  transformers passes them, and calls come back in its `<tool_call>{"name": ..., "arguments": ...}
  </tool_call>` blocks;
- any other template gets a system message that lists the tools and asks for one JSON object,
  either {"tool_call": {"name": ..., "arguments": {...}}} or {"response": "..."}; that reply is
  enforced by a JSON schema, so it always parses.
tool_choice "required" or a named function constrains the call itself: its name and its arguments'
JSON schema; "none" leaves the tools out.
"""

import json
import re
import secrets
from dataclasses import dataclass

_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolPlan:
    """What a request with tools becomes: the messages and template arguments to render, the
    constraint on the reply (a pyxf.constraints grammar argument), and how to read the reply."""

    messages: list
    template_tools: list       # passed to the chat template, or None
    constraint: dict           # keyword arguments for grammar_for (may be empty)
    native: bool               # calls come in <tool_call> blocks (else the generic JSON reply)


def plan(tokenizer, messages, tools, tool_choice):
    """The ToolPlan for a chat request; ValueError for malformed tools or tool_choice."""
    functions = _functions(tools)
    choice = _choice(tool_choice, functions)
    native = "tools" in (tokenizer.chat_template or "")
    if choice == "none":  # the tools are left out; earlier calls and results stay in the conversation
        return ToolPlan(list(messages) if native else _generic_messages(messages), None, {}, native=True)
    if native:
        constraint = {}
        if choice != "auto":
            constraint = {"grammar": _native_call_grammar(_call_schema(functions, choice))}
        return ToolPlan(list(messages), tools, constraint, native=True)
    schema = _call_schema(functions, choice)
    if choice == "auto":
        schema = {"anyOf": [
            {"type": "object", "properties": {"tool_call": schema}, "required": ["tool_call"],
             "additionalProperties": False},
            {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
             "additionalProperties": False},
        ]}
    else:
        schema = {"type": "object", "properties": {"tool_call": schema}, "required": ["tool_call"],
                  "additionalProperties": False}
    messages = _with_tool_listing(_generic_messages(messages), functions, choice)
    return ToolPlan(messages, None, {"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}}, native=False)


def read_reply(text, tool_plan):
    """(content, tool_calls) from a reply: tool_calls in OpenAI's shape, or None."""
    if tool_plan.native:
        calls = [_call_from_json(block) for block in _CALL_BLOCK.findall(text)]
        calls = [c for c in calls if c is not None]
        content = _CALL_BLOCK.sub("", text).strip() if calls else text
        return (content or None) if calls else content, calls or None
    try:
        reply = json.loads(text)
    except json.JSONDecodeError:  # cut short by max_new_tokens
        return text, None
    if "tool_call" in reply:
        return None, [_openai_call(reply["tool_call"]["name"], reply["tool_call"].get("arguments", {}))]
    return reply.get("response", ""), None


def _functions(tools):
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ValueError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    functions = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f"each tool must be {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError("every function needs a name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"the parameters of {fn['name']} must be a JSON schema object")
        if params.get("type") == "object" and "additionalProperties" not in params:
            # Only the declared arguments, as OpenAI's strict mode has it: a function takes no others.
            params = {**params, "additionalProperties": False}
        functions.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    return functions


def _choice(tool_choice, functions):
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "none", "required"):
        return tool_choice
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in {f["name"] for f in functions}:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return name
    raise ValueError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')


def _call_schema(functions, choice):
    """The JSON schema of one call: {"name": <const>, "arguments": <that function's parameters>}."""
    chosen = [f for f in functions if choice in ("auto", "required") or f["name"] == choice]
    options = [
        {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
         "required": ["name", "arguments"], "additionalProperties": False}
        for f in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _native_call_grammar(schema):
    # A Lark grammar around a JSON schema (llguidance's %json): the template's call block.
    return 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)


def _generic_messages(messages):
    """The conversation for a template that knows no tools: calls as the JSON replies they were,
    results as user turns."""
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role == "tool":
            out.append({"role": "user", "content": f"Tool result: {content}"})
        elif role == "assistant" and m.get("tool_calls"):
            call = m["tool_calls"][0]["function"]
            reply = {"tool_call": {"name": call["name"], "arguments": json.loads(call["arguments"])}}
            out.append({"role": "assistant", "content": json.dumps(reply)})
        else:
            out.append({"role": role, "content": content or ""})
    return out


def _with_tool_listing(messages, functions, choice):
    listing = json.dumps(functions, ensure_ascii=False)
    if choice == "auto":
        ask = ('Reply with one JSON object: {"tool_call": {"name": ..., "arguments": {...}}} to call a tool, '
               'or {"response": "..."} to answer directly.')
    else:
        ask = 'Reply with one JSON object: {"tool_call": {"name": ..., "arguments": {...}}}.'
    system = f"You can call these tools:\n{listing}\n{ask}"
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + system}] + messages[1:]
    return [{"role": "system", "content": system}] + messages


def _call_from_json(text):
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return _openai_call(call["name"], call.get("arguments", {}))


def _openai_call(name, arguments):
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": "call_" + secrets.token_hex(12), "type": "function", "function": {"name": name, "arguments": arguments}}
