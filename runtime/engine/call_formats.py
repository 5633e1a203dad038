"""How a model family writes tool calls: found from its chat template, the grammar its
calls must match, and the calls read back out of a reply.

Each family marks where its calls begin (its trigger) and writes them its own way:

- ``hermes`` (Hermes 2/3, Qwen 2.5, Qwen 3): ``<tool_call>`` + a newline, then
  ``{"name": N, "arguments": {..}}``, a newline and ``</tool_call>``, per call;
- ``qwen3-coder`` (Qwen3-Coder, Qwen 3.5, Nemotron 3): ``<tool_call>``, ``<function=N>``,
  then per argument ``<parameter=K>``, its value and ``</parameter>``, each on its own
  line: string values raw, others JSON;
- ``llama3`` (Llama 3.1-3.3): ``{"name": N, "parameters": {..}}``, bare or after
  ``<|python_tag|>``; one call a reply;
- ``mistral-nemo``: ``[TOOL_CALLS][{"name": N, "arguments": {..}, "id": "9 alnum"}, ..]``;
- ``mistral`` (Small 3.2, Devstral, Ministral): ``[TOOL_CALLS]N[CALL_ID]id[ARGS]{..}``
  per call (``mistral-no-ids``: without ``[CALL_ID]``);
- ``generic`` (templates with no tools, such as SmolLM2's): a reply of
  ``{"tool_calls": [{"name": N, "arguments": {..}}]}``, taught by a system block
  (``pcrt.runtime.server.serving.tool_calls``).

``detect`` renders the template with a probe call and reads the markup around it, as
llama.cpp's autoparser does; ``models.toml`` may name the family instead (``tool_format``).

``call_grammar`` writes llguidance's Lark grammar of a reply's calls: each call's
arguments valid against its tool's schema. Forced calls start at the first token; with
``auto`` the grammar is lazy (``SamplingParams.grammar_triggers``): free text until the
trigger, then the calls. A trigger that is one special token in the vocabulary (Qwen's
``<tool_call>``, Mistral's ``[TOOL_CALLS]``) is accepted as that token or spelled out.
``read_reply`` splits a reply, whole or growing, into content and calls. Pure: no model.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from pcrt.runtime.engine.constraints import JSON_OPTIONS, close_objects

__all__ = [
    "FORMATS",
    "CallFormat",
    "ParsedCall",
    "ParsedReply",
    "ToolSpec",
    "call_grammar",
    "detect",
    "read_reply",
]

_EMPTY: dict[str, Any] = {"type": "object", "properties": {}}
PROBE_TOOL = "pcrt_probe_tool"
PROBE_ARGUMENT = "pcrt_probe_argument"


@dataclass(frozen=True)
class ToolSpec:
    """A tool as a call format sees it: its name and its arguments' schema."""

    name: str
    parameters: dict[str, Any] | None = None
    description: str = ""

    @property
    def schema(self) -> dict[str, Any]:
        return self.parameters or _EMPTY


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments so far (whole once ``complete``)
    complete: bool
    call_id: str | None = None  # the id the model wrote (Mistral's), when it writes one


@dataclass
class ParsedReply:
    content: str  # the text before the calls (all of it when there are none)
    calls: list[ParsedCall] = field(default_factory=list)
    # trailing content characters that may yet begin a trigger: a stream holds them back
    pending: int = 0


Marker = Callable[[str], str]  # a marker's text -> its Lark expression (token or text)


class CallFormat:
    """One family's call markup. Subclasses say how calls look after the trigger."""

    name: ClassVar[str]
    triggers: ClassVar[tuple[str, ...]]
    # of the triggers, those that count only at the reply's start, after whitespace
    anchored: ClassVar[tuple[str, ...]] = ()
    markers: ClassVar[tuple[str, ...]] = ()  # every special marker its calls may contain
    parallel: ClassVar[bool] = True  # whether a reply may hold more than one call
    native: ClassVar[bool] = True  # the chat template writes tools and calls itself

    def opening(self, mark: Marker) -> str:
        """Lark: the trigger, as its calls start."""
        return mark(self.triggers[0])

    def rest(self, tools: Sequence[ToolSpec], most: int, mark: Marker) -> str:
        """Lark rules: ``calls``, what follows the opening."""
        raise NotImplementedError

    def read(self, section: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        """The calls in ``section`` (the reply from its first trigger on), the last one
        perhaps unfinished."""
        raise NotImplementedError

    def call_id(self) -> str:
        return "call_" + secrets.token_hex(12)


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _named_calls(
    tools: Sequence[ToolSpec], args_key: str, extra: dict[str, Any] | None = None
) -> str:
    """One JSON schema for a call of any of ``tools``: its name, then its arguments. Each
    tool's ``$defs`` move to the root under names of their own (``t0_Loc``), since its
    schema now sits below the root and ``#/$defs/Loc`` would point nowhere."""
    variants, defs = [], {}
    for i, tool in enumerate(tools):
        schema, own = _without_defs(close_objects(tool.schema), f"t{i}_")
        defs.update(own)
        properties: dict[str, Any] = {"name": {"const": tool.name}, args_key: schema}
        if extra:
            properties.update(extra)
        variants.append(
            {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            }
        )
    root: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    if defs:
        root = {**root, "$defs": defs}
    return _json(root)


def _without_defs(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``schema`` without its ``$defs`` (or ``definitions``), its refs to them renamed
    with ``prefix``; and those definitions, renamed, for the root that holds them."""
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not defs:
        return schema, {}
    renamed = {f"{prefix}{name}": value for name, value in defs.items()}

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            ref = value.get("$ref")
            out = {k: rewrite(v) for k, v in value.items() if k not in ("$defs", "definitions")}
            if isinstance(ref, str):
                for base in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(base):
                        out["$ref"] = "#/$defs/" + prefix + ref[len(base) :]
            return out
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    return rewrite(schema), {name: rewrite(value) for name, value in renamed.items()}


def _repeat(first: str, more: str, most: int) -> str:
    return first if most <= 1 else f"{first} ({more}){{0,{most - 1}}}"


# -- reading JSON-shaped calls ----------------------------------------------------------


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at ``start`` ends (one past it), or None while it
    is unfinished. json's C decoder: a stream re-reads its reply at every token, and a
    Python loop over a long argument would cost the event loop milliseconds a token."""
    try:
        _, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return int(end)


_DECODER = json.JSONDecoder()


def _scan(section: str, head: re.Pattern[str], decode_name: bool = True) -> list[ParsedCall]:
    """Each ``head`` match (group 1 the name) followed by the arguments' JSON value."""
    calls: list[ParsedCall] = []
    at = 0
    while (found := head.search(section, at)) is not None:
        name = json.loads(f'"{found.group(1)}"') if decode_name else found.group(1)
        end = _value_end(section, found.end())
        stop = end if end is not None else len(section)
        call = ParsedCall(name, section[found.end() : stop], end is not None)
        if "id" in head.groupindex:  # written before the arguments (Mistral's [CALL_ID])
            call.call_id = found.group("id")
        elif end is not None and (after := _ID_AFTER.match(section, end)) is not None:
            call.call_id = after.group(1)  # written after them (Mistral Nemo's "id")
        calls.append(call)
        if end is None:
            break
        at = end
    return calls


_JSON_NAME = r'"((?:[^"\\]|\\.)*)"'
_ID_AFTER = re.compile(r'\s*,\s*"id"\s*:\s*"([A-Za-z0-9]+)"')


class Hermes(CallFormat):
    name = "hermes"
    triggers = ("<tool_call>",)
    markers = ("<tool_call>", "</tool_call>")
    _head = re.compile(
        r'<tool_call>\s*\{\s*"name"\s*:\s*' + _JSON_NAME + r'\s*,\s*"arguments"\s*:\s*'
    )

    def rest(self, tools: Sequence[ToolSpec], most: int, mark: Marker) -> str:
        return "\n".join(
            [
                "calls: " + _repeat("body", f'"\\n"? {mark("<tool_call>")} body', most) + ' "\\n"?',
                f'body: "\\n" call "\\n" {mark("</tool_call>")}',
                "call: " + _named_calls(tools, "arguments"),
            ]
        )

    def read(self, section: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        return _scan(section, self._head)


class Generic(CallFormat):
    name = "generic"
    triggers = ('{"tool_calls"',)
    native = False
    _head = re.compile(r'\{\s*"name"\s*:\s*' + _JSON_NAME + r'\s*,\s*"arguments"\s*:\s*')

    def rest(self, tools: Sequence[ToolSpec], most: int, mark: Marker) -> str:
        return "\n".join(
            [
                "calls: /: ?\\[/ " + _repeat("call", "/, ?/ call", most) + ' "]}"',
                "call: " + _named_calls(tools, "arguments"),
            ]
        )

    def read(self, section: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        return _scan(section, self._head)


class Llama3(CallFormat):
    name = "llama3"
    triggers = ("<|python_tag|>", '{"name":')
    anchored = ('{"name":',)  # bare JSON is a call only as the whole reply
    markers = ("<|python_tag|>",)
    parallel = False  # its templates raise on more than one call
    _head = re.compile(r'\{\s*"name"\s*:\s*' + _JSON_NAME + r'\s*,\s*"parameters"\s*:\s*')

    def opening(self, mark: Marker) -> str:
        return f"{mark('<|python_tag|>')} {_lit(self.triggers[1])} | {mark(self.triggers[1])}"

    def rest(self, tools: Sequence[ToolSpec], most: int, mark: Marker) -> str:
        variants = " | ".join(f"tool{i}" for i in range(len(tools)))
        rules = [f'calls: " " ({variants})']
        for i, tool in enumerate(tools):
            head = _lit(f'{json.dumps(tool.name)}, "parameters": ')
            rules.append(f'tool{i}: {head} {_json(close_objects(tool.schema))} "}}"')
        return "\n".join(rules)

    def read(self, section: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        return _scan(section, self._head)


class MistralNemo(CallFormat):
    name = "mistral-nemo"
    triggers = ("[TOOL_CALLS]",)
    markers = ("[TOOL_CALLS]",)
    _head = re.compile(r'\{\s*"name"\s*:\s*' + _JSON_NAME + r'\s*,\s*"arguments"\s*:\s*')
    _id = {"id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}}

    def rest(self, tools: Sequence[ToolSpec], most: int, mark: Marker) -> str:
        return "\n".join(
            [
                'calls: "[" ' + _repeat("call", '", " call', most) + ' "]"',
                "call: " + _named_calls(tools, "arguments", self._id),
            ]
        )

    def read(self, section: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        return _scan(section, self._head)

    def call_id(self) -> str:
        return mistral_id()


class Mistral(CallFormat):
    """Mistral Small 3.2 (with ``[CALL_ID]``), Devstral and Ministral (without)."""

    name = "mistral"
    triggers = ("[TOOL_CALLS]",)
    markers = ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]")
    with_call_id: ClassVar[bool] = True
    _head = re.compile(
        r"\[TOOL_CALLS\]([A-Za-z0-9_.-]+)(?:\[CALL_ID\](?P<id>[A-Za-z0-9]*))?\[ARGS\]"
    )

    def rest(self, tools: Sequence[ToolSpec], most: int, mark: Marker) -> str:
        call_id = f" {mark('[CALL_ID]')} /[a-zA-Z0-9]{{9}}/" if self.with_call_id else ""
        variants = " | ".join(f"tool{i}" for i in range(len(tools)))
        rules = ["calls: " + _repeat("call", f"{mark('[TOOL_CALLS]')} call", most)]
        rules.append(f"call: {variants}")
        for i, tool in enumerate(tools):
            rules.append(
                f"tool{i}: {_lit(tool.name)}{call_id} {mark('[ARGS]')} "
                + _json(close_objects(tool.schema))
            )
        return "\n".join(rules)

    def read(self, section: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        return _scan(section, self._head, decode_name=False)

    def call_id(self) -> str:
        return mistral_id()


class MistralNoIds(Mistral):
    name = "mistral-no-ids"
    with_call_id = False


class Qwen3Coder(CallFormat):
    name = "qwen3-coder"
    triggers = ("<tool_call>",)
    markers = ("<tool_call>", "</tool_call>")
    _function = re.compile(r"<function=([^>\n]+)>\n")
    _parameter = re.compile(r"<parameter=([^>\n]+)>\n(.*?)\n</parameter>\n", re.DOTALL)

    def rest(self, tools: Sequence[ToolSpec], most: int, mark: Marker) -> str:
        variants = " | ".join(f"tool{i}" for i in range(len(tools)))
        rules = [
            "calls: " + _repeat("body", f'"\\n"? {mark("<tool_call>")} body', most) + ' "\\n"?',
            f'body: "\\n" ({variants}) "\\n" {mark("</tool_call>")}',
        ]
        for i, tool in enumerate(tools):
            # each parameter is a schema of its own: it takes the tool's $defs along
            schema, defs = _without_defs(close_objects(tool.schema), "")
            required = set(schema.get("required", []))
            parts = []
            for j, (key, sub) in enumerate((schema.get("properties") or {}).items()):
                head = _lit(f"<parameter={key}>" + "\n")
                if _is_plain_string(sub):  # raw, up to the closing tag: lengths still hold
                    low, high = sub.get("minLength", 0), sub.get("maxLength", "")
                    end = _lit("\n</parameter>\n")
                    rules.append(f"p{i}_{j}: {head} raw{i}_{j}")
                    rules.append(f"raw{i}_{j}[suffix={end}]: /(?s:.{{{low},{high}}})/")
                else:
                    own = {**sub, "$defs": defs} if defs else sub
                    rules.append(f'p{i}_{j}: {head} {_json(own)} "\\n</parameter>\\n"')
                parts.append(f"p{i}_{j}" + ("" if key in required else "?"))
            params = " ".join(parts)
            opening = _lit(f"<function={tool.name}>" + "\n")
            rules.append(f'tool{i}: {opening} {params} "</function>"')
        return "\n".join(rules)

    def read(self, section: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        schemas = {t.name: t.schema for t in tools}
        calls: list[ParsedCall] = []
        for found in self._function.finditer(section):
            name = found.group(1)
            end = section.find("</function>", found.end())
            body = section[found.end() : end if end >= 0 else len(section)]
            properties = (schemas.get(name) or {}).get("properties") or {}
            values = []
            for parameter in self._parameter.finditer(body):
                key, raw = parameter.group(1), parameter.group(2)
                plain = _is_plain_string(properties.get(key, {}))
                value = raw if plain else _loads_or_text(raw)
                values.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
            arguments = "{" + ", ".join(values)
            done = end >= 0
            calls.append(ParsedCall(name, arguments + "}" if done else arguments, done))
        return calls


def _is_plain_string(schema: dict[str, Any]) -> bool:
    """A string parameter written raw (no JSON quotes), as Qwen3-Coder writes them."""
    return schema.get("type") == "string" and not (
        {"enum", "const", "pattern", "format"} & set(schema)
    )


def _loads_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def mistral_id(seed: str | None = None) -> str:
    """A call id as Mistral's templates require: 9 letters or digits. From ``seed`` (an
    id a client chose) when given, so the same id always maps to the same one."""
    alphabet = string.ascii_letters + string.digits
    if seed is None:
        return "".join(secrets.choice(alphabet) for _ in range(9))
    if re.fullmatch(r"[A-Za-z0-9]{9}", seed):
        return seed
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:9])


# read-only: the families are stateless, and one table serves every model
FORMATS: Mapping[str, CallFormat] = MappingProxyType(
    {
        f.name: f
        for f in (
            Hermes(),
            Qwen3Coder(),
            Llama3(),
            MistralNemo(),
            Mistral(),
            MistralNoIds(),
            Generic(),
        )
    }
)


def call_grammar(
    fmt: CallFormat,
    tools: Sequence[ToolSpec],
    *,
    lazy: bool,
    most: int,
    special: Callable[[str], int | None],
) -> str:
    """llguidance's Lark grammar of a reply's calls, at most ``most`` of them. ``lazy``:
    it starts at a trigger (the engine leaves the text before it free, and the lazy head
    takes what of that text shares the trigger's first token); else at the first token.
    ``special``: a marker's token id when it is one special token of the vocabulary."""

    def mark(text: str) -> str:
        token = special(text)
        return _lit(text) if token is None else f"(<[{token}]> | {_lit(text)})"

    heads: dict[str, str] = {}

    def trigger(text: str) -> str:
        i = fmt.triggers.index(text)
        token = special(text)
        heads[f"head{i}"] = f"head{i}[lazy]: TEXT {_lit(text)}"
        heads[f"lazy{i}"] = f"lazy{i}: " + (
            f"<[{token}]> | head{i}" if token is not None else f"head{i}"
        )
        return f"lazy{i}"

    opening = fmt.opening(trigger if lazy else mark)
    lines = ["start: opening calls", f"opening: {opening}", *heads.values()]
    lines.append(fmt.rest(tools, most if fmt.parallel else 1, mark))
    if lazy:
        # the lazy head takes only what of the reply shares the trigger's first token: a
        # bound keeps a refused pick from wandering on as prose inside the grammar
        lines.append("TEXT: /(?s:.{0,256})/")
    return "\n".join(lines) + "\n"


def read_reply(fmt: CallFormat, text: str, tools: Sequence[ToolSpec]) -> ParsedReply:
    """A reply as content and calls: the content is the text before the first trigger."""
    starts = [i for i in (_found(fmt, text, t) for t in fmt.triggers) if i >= 0]
    if not starts:
        pending = max(
            (
                n
                for t in fmt.triggers
                for n in range(len(t) - 1, 0, -1)
                if text.endswith(t[:n]) and (t not in fmt.anchored or not text[:-n].strip())
            ),
            default=0,
        )
        return ParsedReply(text, [], pending)
    first = min(starts)
    return ParsedReply(text[:first], fmt.read(text[first:], tools))


def _found(fmt: CallFormat, text: str, trigger: str) -> int:
    at = text.find(trigger)
    if at > 0 and trigger in fmt.anchored and text[:at].strip():
        return -1  # JSON in an answer, not a call
    return at


# -- finding the family from the template -------------------------------------------------

Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]


def detect(render: Render) -> CallFormat:
    """The family a chat template writes calls in: the template is rendered with a probe
    call, and the markup around it names the family; generic when the template writes
    no calls (or fails on them)."""
    probe_call = {
        "id": "abcdefghi",
        "type": "function",
        "function": {"name": PROBE_TOOL, "arguments": {PROBE_ARGUMENT: "x"}},
    }
    tool = {
        "type": "function",
        "function": {
            "name": PROBE_TOOL,
            "description": "probe",
            "parameters": {"type": "object", "properties": {PROBE_ARGUMENT: {"type": "string"}}},
        },
    }
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [probe_call]},
        {"role": "tool", "tool_call_id": "abcdefghi", "name": PROBE_TOOL, "content": "ok"},
    ]
    try:
        text = render(messages, [tool])
    except Exception:  # a template that cannot take calls at all
        return FORMATS["generic"]
    name = re.escape(PROBE_TOOL)
    for pattern, found in (
        (r"<tool_call>\s*<function=" + name + r">\s*<parameter=", FORMATS["qwen3-coder"]),
        (
            r'<tool_call>\s*\{\s*"name"\s*:\s*"' + name + r'"\s*,\s*"arguments"\s*:\s*\{',
            FORMATS["hermes"],
        ),
        (r"\[TOOL_CALLS\]" + name + r"\[CALL_ID\]\w+\[ARGS\]\{", FORMATS["mistral"]),
        (r"\[TOOL_CALLS\]" + name + r"\[ARGS\]\{", FORMATS["mistral-no-ids"]),
        (
            r'\[TOOL_CALLS\]\s*\[\s*\{\s*"name"\s*:\s*"' + name + r'"\s*,\s*"arguments"',
            FORMATS["mistral-nemo"],
        ),
        (r'\{\s*"name"\s*:\s*"' + name + r'"\s*,\s*"parameters"\s*:\s*\{', FORMATS["llama3"]),
    ):
        if re.search(pattern, text):
            return found
    # no template call, or a markup no family here writes (GLM's <arg_key>, Kimi's
    # sections, gpt-oss channels): the generic format, taught by a system block
    return FORMATS["generic"]
