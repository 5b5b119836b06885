#!/usr/bin/env python3
"""Writes golden.json for tests/engine/chat_template_test.cc.

Every case is rendered by the real jinja2 (3.1), set up the way Hugging Face transformers sets it
up for `apply_chat_template`: an ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and
the loopcontrols extension, the globals raise_exception and strftime_now, and a tojson filter that
is plain json.dumps (no HTML escaping, ensure_ascii off, indent/separators/sort_keys honoured).

Usage: python3 make_goldens.py   (needs only python3 and jinja2)
Output: {"reference", "templates": {name: source}, "cases": [{template, context, expected | error,
error_type, phase}]}. phase "parse" means jinja2 refused to compile the template; phase "render"
means rendering failed. error_type is the Python exception class: TemplateError is
raise_exception() (the C++ message must contain the text); for the others the text is Python's own
and the C++ renderer is only required to fail in the same phase.
"""
import datetime
import json
import pathlib

import jinja2
import jinja2.ext
import jinja2.sandbox

HERE = pathlib.Path(__file__).resolve().parent
TOKENIZERS = HERE.parent / "tokenizers"


def json_dumps_filter(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers swaps jinja2's HTML-safe tojson for json.dumps with these keyword defaults.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def make_env():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = json_dumps_filter
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def fixture_template(name):
    config = json.loads((TOKENIZERS / name / "tokenizer_config.json").read_text())
    return config["chat_template"]


# ---- conversations (all written for these tests)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city — with \"quotes\" and ünïcödé",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
CLOCK_TOOL = {
    "type": "function",
    "function": {"name": "now", "description": "Local time", "parameters": {"type": "object", "properties": {}}},
}

BASIC = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there, how is the weather?"},
]
MULTI = [
    {"role": "system", "content": "  Be kind.\n"},
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "4, of course."},
    {"role": "user", "content": "And the weather in Paris?"},
    {"role": "assistant", "content": "Sunny, 21°C."},
    {"role": "user", "content": "Thanks a lot."},
]
NO_SYSTEM = [{"role": "user", "content": "Just one question?"}]
UNICODE = [
    {"role": "user", "content": "Héllo 👋🏽 — \"double\" and 'single' quotes, a \\ backslash,\ttab, 中文, العربية"},
    {"role": "assistant", "content": "Ünïcödé back: 🎉 ✓ «ok» \u2028line-sep ß"},
    {"role": "user", "content": "  padded with spaces and newlines \n\n"},
]
TOOLS_DICT_ARGS = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius", "days": 2}}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}},
    ]},
    {"role": "tool", "content": "{\"temp\": 18.5, \"sky\": \"cloudy\"}", "tool_call_id": "call_1"},
    {"role": "tool", "content": "14:05", "tool_call_id": "call_2"},
    {"role": "assistant", "content": "It is 18.5 °C and cloudy at 14:05."},
    {"role": "user", "content": "<tool_response>not really a tool</tool_response>"},
]
TOOLS_STRING_ARGS = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
    ]},
    {"role": "tool", "content": "-3 and snow"},
]
REASONING_FIELD = [
    {"role": "user", "content": "Is 17 prime?"},
    {"role": "assistant", "content": "Yes.", "reasoning_content": "17 has no divisors\nbetween 2 and 4."},
    {"role": "user", "content": "And 21?"},
    {"role": "assistant", "content": "<think>\n21 = 3 * 7\n</think>\n\nNo, 21 = 3 × 7."},
    {"role": "user", "content": "Hello again, what about 23?"},
]
THINK_LAST = [
    {"role": "user", "content": "Think first?"},
    {"role": "assistant", "content": "<think>\nshort thought\n</think>\n\nDone thinking."},
]
PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "System as parts."}]},
    {"role": "user", "content": [
        {"type": "text", "text": "Describe"},
        {"type": "image", "url": "https://example.invalid/cat.png"},
        {"type": "text", "text": "this picture."},
    ]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "And these?"}]},
]
BAD_ORDER = [
    {"role": "user", "content": "One"},
    {"role": "user", "content": "Two"},
]
BAD_ROLE = [{"role": "user", "content": "x"}, {"role": "narrator", "content": "y"}]
ONLY_SYSTEM = [{"role": "system", "content": "Just a system prompt."}]
ENDS_WITH_ASSISTANT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def ctx(messages, gen=True, **extra):
    c = {"messages": messages, "add_generation_prompt": gen, "bos_token": "<s>", "eos_token": "</s>"}
    c.update(extra)
    return c


GENERAL = [
    ctx(BASIC), ctx(BASIC, gen=False), ctx(MULTI), ctx(MULTI, gen=False), ctx(NO_SYSTEM),
    ctx(UNICODE), ctx(UNICODE, gen=False), ctx(REASONING_FIELD), ctx(THINK_LAST, gen=False),
    ctx(ENDS_WITH_ASSISTANT, gen=False), ctx(ONLY_SYSTEM),
]
TOOLISH = [
    ctx(TOOLS_DICT_ARGS, tools=[WEATHER_TOOL, CLOCK_TOOL]),
    ctx(TOOLS_STRING_ARGS, tools=[WEATHER_TOOL]),
    ctx(TOOLS_DICT_ARGS, gen=False),
    ctx(TOOLS_STRING_ARGS, gen=False, tools=[]),
]
ERRORS = [ctx(BAD_ORDER), ctx(BAD_ROLE), ctx([]), ctx(ENDS_WITH_ASSISTANT)]

PLAN = {
    "chatml_basic.jinja": GENERAL + [ctx(BAD_ORDER)],
    "strict_alternation.jinja": GENERAL + ERRORS + [ctx(TOOLS_STRING_ARGS)],
    "tools_json.jinja": GENERAL + TOOLISH,
    "macros_parts.jinja": GENERAL + [ctx(PARTS), ctx(PARTS, gen=False)],
    "think_strings.jinja": GENERAL + [ctx(PARTS)],
    "lstrip_trim.jinja": GENERAL,
    "loops_control.jinja": GENERAL + TOOLISH,
    "numbers_tests.jinja": [ctx(BASIC), ctx(MULTI), ctx(UNICODE), ctx(TOOLS_DICT_ARGS)],
    "llama3_1": GENERAL + [ctx(BAD_ORDER), ctx(TOOLS_STRING_ARGS)],
    "qwen3": GENERAL + TOOLISH + [
        ctx(REASONING_FIELD, enable_thinking=False),
        ctx(BASIC, enable_thinking=False),
        ctx(BASIC, enable_thinking=True),
        ctx(THINK_LAST),
        ctx([]),
    ],
}

# Small templates pinning down one behaviour each; the context is the second element.
SNIPPETS = [
    ("{{ x }}|{{ x | length }}|{{ x | default('d') }}|{{ x is defined }}|{{ x ~ 'y' }}", {}),
    ("{{ x.y is defined }}", {}),
    ("{{ x.y }}", {}),
    ("{{ d.missing }}|{{ d.missing is defined }}|{{ d['k'] }}", {"d": {"k": "v"}}),
    ("{{ d.missing.deeper }}", {"d": {"k": "v"}}),
    ("{{ 'a' + [1] }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{{ 1 + undefined_thing }}", {}),
    ("{{ 1 < 'a' }}", {}),
    ("{{ 1 // 0 }}", {}),
    ("{{ [1, 2].append(3) }}", {}),
    ("{{ none.attr }}", {}),
    ("{{ 5() }}", {}),
    ("{% for x in 5 %}{% endfor %}", {}),
    ("{% set a, b = [1] %}", {}),
    ("{{ 1.0 }} {{ 100.0 }} {{ 1e16 }} {{ 1e15 }} {{ 0.0001 }} {{ 0.00001 }} {{ -0.0 }} {{ 2.5e-5 }} {{ 1/7 }} {{ 1e300 * 1e10 }}", {}),
    ("{{ 12345678901234567890.5 }} {{ 0.1 * 3 }} {{ 9007199254740993.0 }} {{ 4.35 * 100 }}", {}),
    ("{{ ['a\"', \"b'\", 'c\\'\"', '\\n\\t\\x01', 'é\u00a0'] }}", {}),
    ("{{ {'k': none, 2: true, 'l': [1.5, (1, 2)]} }}", {}),
    ("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(indent=0) }}", {"x": {"b": [1, {"c": None}], "a": "é\n\"", "e": [], "f": {}, "g": 1.0, "h": -0.5, "i": True}}),
    ("{{ x | tojson(ensure_ascii=true) }}|{{ x | tojson(separators=(',', ':')) }}|{{ x | tojson(indent='\t') }}", {"x": {"z": "😀é", "a": [1, 2]}}),
    ("{{ 'abc' | tojson }} {{ none | tojson }} {{ [1, 'a', false] | tojson }} {{ 3.0 | tojson }} {{ ('t', 1) | tojson }} {{ {1: 'int key', none: 0} | tojson }}", {}),
    ("{{ undefined_var | tojson }}", {}),
    ("{{ s | length }} {{ s[1] }} {{ s[-1] }} {{ s[1:4] }} {{ s[::-1] }} {{ s[::2] }} {{ s[-3:] }} {{ s[10:] }}|{{ s[5:1] }}|{{ s[5:1:-1] }}", {"s": "h😀llö wörld"}),
    ("{{ l[1:] }} {{ l[:-1] }} {{ l[::-1] }} {{ l[-1] }} {{ l[10] }}|{{ l[1::2] }} {{ l[-100:100] }} {{ (1, 2, 3)[1:] }}", {"l": [1, 2, 3, 4]}),
    ("{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' x') }}|{{ s | trim }}|{{ s | trim('x ') }}", {"s": "  xx hi there x \u00a0\n"}),
    ("{{ s.split() }} {{ s.split(none, 1) }} {{ s.split(',') }} {{ s.split(',', 1) }} {{ s.rsplit(',', 1) }} {{ s.rsplit(none, 1) }} {{ ''.split() }} {{ ''.split(',') }}", {"s": " a,b  c,d "}),
    ("{{ s.upper() }} {{ s.lower() }} {{ s.title() }} {{ s.capitalize() }} {{ s | title }} {{ s | capitalize }} {{ s | upper }}", {"s": "hELLO wOrld they're ß-straße (x)"}),
    ("{{ s.replace('o', '0') }} {{ s.replace('o', '0', 1) }} {{ s.replace('', '-') }} {{ s | replace('l', 'L') }} {{ s.find('o') }} {{ s.rfind('o') }} {{ s.find('zz') }} {{ s.count('l') }}", {"s": "hölo wörld lo"}),
    ("{{ s.startswith('ab') }} {{ s.startswith(('x', 'abc')) }} {{ s.endswith('yz') }} {{ s.endswith(('q', 'r')) }} {{ '-'.join(['a', 'b']) }} {{ s.splitlines() }}", {"s": "abc\ndef\r\nxyz"}),
    ("{{ '{} and {}'.format('a', 1) }} {{ '{0}{0}{name}'.format('x', name='y') }} {{ 'x'.isdigit() }} {{ '123'.isdigit() }} {{ ' '.isspace() }}", {}),
    ("{{ [1, 2] | join }} {{ ['a', 'b'] | join(', ') }} {{ users | join(', ', attribute='name') }} {{ users | map(attribute='name') | list }} {{ users | map(attribute='age', default=0) | list }} {{ ['a', 'b'] | map('upper') | list }}", {"users": [{"name": "ann", "age": 3}, {"name": "bob"}]}),
    ("{{ [] | first }}|{{ [1, 2] | first }} {{ [1, 2] | last }} {{ 'abc' | first }} {{ 'abc' | last }} {{ {'a': 1} | first }} {{ 'ab' | list }} {{ {'a': 1, 'b': 2} | list }} {{ 'abc' | reverse }} {{ [1, 2, 3] | reverse | list }}", {}),
    ("{{ d | items | list }} {{ d.items() | list }} {% for k, v in d | items %}{{ k }}{{ v }}{% endfor %} {% for k in d %}{{ k }}{% endfor %} {{ d | length }}", {"d": {"z": 1, "a": 2}}),
    ("{% set ns = namespace(a=1) %}{% for i in range(3) %}{% set ns.a = ns.a * 2 %}{% set local = i %}{% endfor %}{{ ns.a }}|{{ local }}|{{ ns.b }}", {}),
    ("{% set x = 0 %}{% for i in [1, 2, 3] %}{{ x }}{% set x = x + i %}{{ x }},{% endfor %}{{ x }}", {}),
    ("{% for i in [1, 2] %}{% if i == 2 %}[{{ y }}]{% endif %}{% set y = i %}{% endfor %}", {}),
    ("{% if true %}{% set z = 5 %}{% endif %}{{ z }}", {}),
    ("{% macro m(a, b=2, c=a) %}[{{ a }},{{ b }},{{ c }},{{ g }}]{% endmacro %}{% set g = 'G1' %}{{ m(1) }}{% set g = 'G2' %}{{ m(1, c=9) }}{{ m() }}", {}),
    ("{% macro m(a) %}{{ a }}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, 3, k='v') }}", {}),
    ("{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, 2) }}", {}),
    ("{% macro rec(n) %}{{ n }}{% if n > 0 %}{{ rec(n - 1) }}{% endif %}{% endmacro %}{{ rec(5) }}", {}),
    ("{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% else %}no{% endfor %}", {}),
    ("{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %} {% for (a, b) in {'x': 1}.items() %}{{ a }}{{ b }}{% endfor %}", {}),
    ("{% for x in [1, 2, 3, 4] if x is even %}{{ loop.index }}:{{ x }}/{{ loop.length }} {% endfor %}", {}),
    ("{% for x in 'ab' %}{% for y in [1, 2] %}{{ loop.index }}{{ x }}{% endfor %}{{ loop.index }}{% endfor %}", {}),
    ("{% set outer = 'o' %}{% for x in [1] %}{% set outer = 'i' %}{{ outer }}{% endfor %}{{ outer }}", {}),
    ("{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}]", {}),
    ("{% set block %}  Hello {{ name }}  {% endset %}[{{ block }}]{% set b2 | trim | upper %}  x y  {% endset %}[{{ b2 }}]", {"name": "Bob"}),
    ("{% filter upper %}shout {{ 'this' }}{% endfilter %}", {}),
    ("a  \n  {%- if true -%}  \n  b  \n  {%- endif -%}  \n  c", {}),
    ("  {% if true %}\n    x\n  {% endif %}\ny", {}),
    ("line1\n  {%+ if true %}kept-indent{% endif +%}\nline3", {}),
    ("  {# comment #}\nA\n{#- stripped -#}  \n  B {{- ' C ' -}} D {{ 'E' }}\n", {}),
    ("{{ '{% raw %}' }}{% raw %}  {{ x }} {%- endraw %}|", {}),
    ("{{ 'a' }}\n{{ 'b' }}\n\n", {}),
    ("x\r\ny\rz\n", {}),
    ("{{ 'a' ~ 1 ~ none ~ true ~ [1] }} {{ 'x' * 2 ~ 'y' }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }} {{ not 1 == 2 }} {{ 1 if 0 else 2 if 0 else 3 }}", {}),
    ("{{ 'ab' 'cd' }} {{ \"x\\u00e9\\x41\\101\\q\" }} {{ 0x1F }} {{ 1_000 }} {{ 0o17 }} {{ 0b101 }} {{ 1_0.5 }}", {}),
    ("{{ raise_exception('custom failure: ' ~ 42) }}", {}),
    ("{% if messages[0].role != 'system' %}{{ raise_exception('System message required') }}{% endif %}", {"messages": [{"role": "user", "content": "x"}]}),
    ("{{ range(3) | list }} {{ range(1, 10, 4) | list }} {{ range(5, 0, -2) | list }} {{ range(0) | list }}", {}),
    ("{{ namespace(a=1, b=[1]).b }} {{ dict(a=1, b='x') }} {{ {'a': 1}.get('a') }} {{ {'a': 1}.get('b', 'none') }} {{ [1, 2, 1].count(1) }} {{ [1, 2].index(2) }}", {}),
    ("{{ 3 is odd }}{{ 4 is even }}{{ none is not none }}{{ [] is iterable }}{{ 1 is iterable }}{{ {} is sequence }}{{ 'x' is string }}{{ 1 is callable }}{{ range is callable }}{{ x is sameas none }}{{ true is sameas true }}", {"x": None}),
    ("{{ [1, 'a'] | sort }}", {}),
    ("{{ x.content }}", {"x": "plain string"}),
    ("{{ msg['content'] }}|{{ msg.content.upper() }}|{{ msg['content'].upper() }}|{{ msg.items | length if false else 'k' }}", {"msg": {"content": "abc", "items": 3}}),
    ("{{ (a or b) }}|{{ a.b if a else 'nope' }}|{{ [] or none }}|{% if not a %}none-is-falsy{% endif %}", {"a": None, "b": ""}),
    ("{{ 'ß' | upper }} {{ 'İ' | lower | length }} {{ 'ǅ' | lower }} {{ 'ﬁ'.upper() }}", {}),
    ("{{ 'abc' | indent }}|{{ 'a\nb\n\nc' | indent(2) }}|{{ 'a\nb' | indent(2, true) }}|{{ 'a\n\nb' | indent('> ', blank=true) }}", {}),
    ("{{ 'a<b>&\"c\\'' | e }} {{ 'x' | safe }} {{ 3.7 | int }} {{ -3.7 | int }} {{ '0x1A' | int(0, 16) }} {{ 'ff' | int(base=16) }} {{ 1.5 | string }} {{ [1] | string }}", {}),
    ("{{ x.y.z }}", {"x": {"y": None}}),
    ("{% for x in xs %}{{ loop.previtem }}-{{ x }}-{{ loop.nextitem }};{% endfor %}", {"xs": [1, 2, 3]}),
    ("{{ 'x' in undefined_list }} {{ undefined_list | list }} {{ undefined_list | join(',') }} {{ undefined_list | first }}|{% for x in undefined_list %}x{% else %}empty{% endfor %}", {}),
    ("{{ big }} {{ -big }} {{ big + 0.5 }} {{ small }} {{ big * 2 }}", {"big": 9007199254740993, "small": -12345678901234}),
    # compile-time errors
    ("{% if x %}unterminated", {}),
    ("{% for x in y %}{% endif %}", {}),
    ("{{ x | no_such_filter }}", {}),
    ("{{ x is no_such_test }}", {}),
    ("{{ 1 + 2 ~ 3 }}", {}),
    ("{% break %}", {}),
    ("{{ 1 + }}", {}),
    ("{{ (1, 2 }}", {}),
    ("{% frobnicate %}", {}),
    ("{{ 'unterminated }}", {}),
    ("{# no end", {}),
    ("{% set x = 1 %}{% endset %}", {}),
    ("{% macro m() %}{% for i in x %}{% endfor %}{% break %}{% endmacro %}", {}),
]


def render(env, source, context):
    try:
        template = env.from_string(source)
    except Exception as e:  # noqa: BLE001 - syntax errors, unknown filters, 'break' outside loop
        return {"error": str(e), "error_type": type(e).__name__, "phase": "parse"}
    try:
        return {"expected": template.render(**context)}
    except Exception as e:  # noqa: BLE001 - any failure is a golden "must fail" case
        return {"error": str(e), "error_type": type(e).__name__, "phase": "render"}


def main():
    env = make_env()
    templates = {}
    for path in sorted((HERE / "templates").glob("*.jinja")):
        templates[path.name] = path.read_text()
    for name in ("llama3_1", "qwen3"):
        templates[name] = fixture_template(name)
    for k, (source, _) in enumerate(SNIPPETS):
        templates[f"snippet_{k:03d}"] = source

    cases = []
    for name, contexts in PLAN.items():
        for context in contexts:
            cases.append({"template": name, "context": context, **render(env, templates[name], context)})
    for k, (source, context) in enumerate(SNIPPETS):
        name = f"snippet_{k:03d}"
        cases.append({"template": name, "context": context, **render(env, source, context)})

    missing = set(templates) - set(PLAN) - {f"snippet_{k:03d}" for k in range(len(SNIPPETS))}
    assert not missing, f"templates without cases: {missing}"
    out = {
        "reference": f"jinja2 {jinja2.__version__}, ImmutableSandboxedEnvironment(trim_blocks=True, "
                     "lstrip_blocks=True, extensions=[loopcontrols]) as in transformers' apply_chat_template",
        "templates": templates,
        "cases": cases,
    }
    text = json.dumps(out, ensure_ascii=False, indent=1) + "\n"
    (HERE / "golden.json").write_text(text)
    errors = sum(1 for c in cases if "error" in c)
    print(f"wrote {len(cases)} cases ({errors} errors), {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
