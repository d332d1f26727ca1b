"""shared.structured: the schema subset (checked against `jsonschema`), the JSON state machine
(against json.loads, the validator and a regex with partial matching), constrained
generation with an untrained GPT, and tool dispatch."""

import json
import random

import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.model import GPT, GPTConfig
from shared.sampling import generate as plain_generate
from shared.structured import (
    PRINTABLE,
    JsonStateMachine,
    TokenConstraint,
    Tool,
    ToolRegistry,
    check_schema,
    convert_units,
    errors,
    generate,
    validate,
    world_tools,
)
from shared.tinyworld import END, RELATIONS, make_world, tokenizer
from shared.tokenizers import CharTokenizer


def obj(props: dict, required=None, extra=False) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": extra}


PERSON = obj({"name": {"type": "string"}, "age": {"type": "integer"},
              "pet": {"enum": ["cat", "dog", "catfish"]}, "height": {"type": "number"},
              "alive": {"type": "boolean"}, "home": obj({"city": {"type": "string"},
                                                         "zip": {"enum": [1, 12, 123]}})},
             required=["name", "pet", "home"])


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, n_people=40, n_heldout=4)


@pytest.fixture(scope="module")
def registry(world):
    return world_tools(world)


# --- schemas ---------------------------------------------------------------------------


def test_good_schemas_pass(registry):
    check_schema(PERSON)
    check_schema(registry.call_schema())
    check_schema({"const": "x"})
    check_schema({"anyOf": [{"type": "string"}, {"type": "integer"}]})


@pytest.mark.parametrize("schema, message", [
    ([], "must be a dict"),
    ({"type": "array"}, "unknown type 'array'"),
    ({"type": "string", "pattern": "a+"}, "unsupported keyword 'pattern'"),
    ({"description": "anything"}, "needs a type, enum, const or anyOf"),
    ({"enum": []}, "enum must be a non-empty list"),
    ({"enum": [None]}, "enum values must be strings, numbers or booleans"),
    ({"type": "integer", "enum": [1, "2"]}, "enum value '2' is not of type integer"),
    ({"enum": [1], "const": 1}, "enum or const, not both"),
    ({"anyOf": []}, "anyOf must be a non-empty list"),
    ({"type": "string", "properties": {}}, "properties needs type object"),
    (obj({"a": {"type": "string"}}, required=["b"]), "required key 'b' is not in properties"),
    (obj({"a": {"type": "string"}}, required=["a", "a"]), "required must be a list of distinct"),
    (obj({"a": {"type": "string"}}, extra={"type": "string"}), "additionalProperties must be"),
    (obj({"a": obj({"b": {"type": "strng"}})}), r"schema \$.a.b: unknown type 'strng'"),
    ({"anyOf": [{"type": "string"}, {"type": "list"}]}, r"\$.anyOf\[1\]: unknown type"),
])
def test_bad_schemas_raise_naming_the_problem(schema, message):
    with pytest.raises(ValueError, match=message):
        check_schema(schema)


@pytest.mark.parametrize("instance, problem", [
    ({"name": "Ada", "pet": "cat", "home": {"city": "X", "zip": 12}}, None),
    ({"name": "Ada", "pet": "cat", "home": {"city": "X", "zip": 12}, "age": 3.0}, None),
    ({"name": "Ada", "pet": "cow", "home": {"city": "X", "zip": 1}}, r"\$.pet: 'cow' is not one"),
    ({"name": "Ada", "pet": "cat"}, r"\$: missing required key 'home'"),
    ({"name": "Ada", "pet": "cat", "home": {"city": "X", "zip": 1}, "x": 1}, "unexpected key 'x'"),
    ({"name": 5, "pet": "cat", "home": {"city": "X", "zip": 1}}, r"\$.name: expected string"),
    ({"name": "A", "pet": "cat", "home": {"city": "X", "zip": 1}, "age": True}, "expected integer"),
    ({"name": "A", "pet": "cat", "home": {"city": "X", "zip": 1}, "age": 1.5}, "expected integer"),
    ({"name": "A", "pet": "cat", "home": {"city": "X", "zip": True}}, r"\$.home.zip: True is not"),
    ([], r"\$: expected object, got list"),
])
def test_validate_names_the_path(instance, problem):
    if problem is None:
        validate(instance, PERSON)
    else:
        with pytest.raises(ValueError, match=problem):
            validate(instance, PERSON)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-200, 200) | st.floats(-1e3, 1e3)
    | st.sampled_from(["cat", "dog", "catfish", "Ada", 1, 12, 123, "X"]),
    lambda inner: st.dictionaries(st.sampled_from(["name", "age", "pet", "height", "alive",
                                                   "home", "city", "zip", "other"]), inner,
                                  max_size=6), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_validator_agrees_with_jsonschema(instance):
    jsonschema = pytest.importorskip("jsonschema")
    for schema in (PERSON, PERSON["properties"]["home"], {"anyOf": [PERSON, {"type": "number"}]}):
        ours = not errors(instance, schema)
        assert ours == jsonschema.Draft202012Validator(schema).is_valid(instance), instance


# --- the state machine -----------------------------------------------------------------


@st.composite
def person(draw):
    """A valid PERSON instance, keys in schema order."""
    text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=8)
    out = {"name": draw(text)}
    if draw(st.booleans()):
        out["age"] = draw(st.integers(-10**6, 10**6))
    out["pet"] = draw(st.sampled_from(["cat", "dog", "catfish"]))
    if draw(st.booleans()):
        out["height"] = draw(st.floats(allow_nan=False, allow_infinity=False))
    if draw(st.booleans()):
        out["alive"] = draw(st.booleans())
    out["home"] = {"city": draw(text), "zip": draw(st.sampled_from([1, 12, 123]))}
    return out


@settings(max_examples=200, deadline=None)
@given(person())
def test_machine_accepts_every_valid_document(instance):
    m = JsonStateMachine(PERSON)
    text = json.dumps(instance)
    assert m.accepts(text), text
    state = m.start
    for i, ch in enumerate(text):  # every prefix can be completed, by the shortest completion
        assert m.accepts(text[:i] + m.completion(state))
        state = m.step(state, ch)


@pytest.mark.parametrize("text", [
    '', '{}', '{"name": "A", "pet": "cat"}',                           # incomplete, missing
    '{"name": "A", "pet": "cow", "home": {"city": "", "zip": 1}}',     # not in the enum
    '{"pet": "cat", "name": "A", "home": {"city": "", "zip": 1}}',     # out of schema order
    '{"name": "A", "pet": "cat", "home": {"city": "", "zip": 1}, "x": 1}',  # extra key
    '{"name":"A", "pet": "cat", "home": {"city": "", "zip": 1}}',      # not json.dumps layout
    '{"name": "A", "age": 01, "pet": "cat", "home": {"city": "", "zip": 1}}',  # leading zero
    '{"name": "A", "age": 1.0, "pet": "cat", "home": {"city": "", "zip": 1}}',  # not an int lit.
    '{"name": "A\n", "pet": "cat", "home": {"city": "", "zip": 1}}',   # raw control character
    '{"name": "\\x", "pet": "cat", "home": {"city": "", "zip": 1}}',   # bad escape
    '{"name": "A", "pet": "cat", "home": {"city": "", "zip": 1}} ',    # anything after the end
])
def test_machine_rejects_invalid_documents(text):
    assert not JsonStateMachine(PERSON).accepts(text)


def test_machine_accepts_escapes_and_exponents():
    m = JsonStateMachine(PERSON)
    assert m.accepts('{"name": "a\\"b\\\\c\\u00e9\\n", "pet": "catfish", "height": -1.5e+3, '
                     '"home": {"city": "", "zip": 123}}')


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}":, 0123456789.-eEnamcthodgfisp\\', max_size=60))
def test_whatever_the_machine_accepts_parses_and_validates(text):
    if JsonStateMachine(PERSON).accepts(text):
        validate(json.loads(text), PERSON)


def test_any_key_order():
    schema = obj({"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}},
                 required=["a", "c"])
    m = JsonStateMachine(schema, key_order="any")
    assert m.accepts('{"c": 1, "a": 2}') and m.accepts('{"b": 0, "c": 1, "a": 2}')
    assert not m.accepts('{"c": 1}') and not m.accepts('{"c": 1, "c": 1, "a": 2}')
    assert m.allowed_next('{"c": 1, "') == {"a", "b"}
    assert not JsonStateMachine(schema).accepts('{"c": 1, "a": 2}')  # schema order
    with pytest.raises(ValueError, match="key_order"):
        JsonStateMachine(schema, key_order="sorted")


STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"


def to_regex(s: dict) -> str:
    """The documents of a schema (all keys required, schema order) as a regular expression."""
    if "anyOf" in s:
        return "(?:" + "|".join(map(to_regex, s["anyOf"])) + ")"
    if "enum" in s or "const" in s:
        values = s.get("enum", [s.get("const")])
        return "(?:" + "|".join(regex.escape(json.dumps(v)) for v in values) + ")"
    return {"string": STRING, "integer": INTEGER, "boolean": "(?:true|false)",
            "number": INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"}.get(s["type"]) or \
        r"\{" + ", ".join(regex.escape(json.dumps(k)) + ": " + to_regex(v)
                          for k, v in s["properties"].items()) + r"\}"


def test_allowed_next_equals_regex_partial_matching(registry):
    """The reference: a char is allowed iff the regex can still match prefix + char."""
    schema = registry.call_schema()
    pattern, m, rng = regex.compile(to_regex(schema)), JsonStateMachine(schema), random.Random(0)
    for _ in range(60):
        text = ""
        for _ in range(rng.randint(0, 90)):
            allowed = m.allowed_next(text)
            assert allowed == {c for c in PRINTABLE
                               if pattern.fullmatch(text + c, partial=True)}, text
            if not allowed:
                break
            text += rng.choice(sorted(allowed))
        done = text + m.completion(m.feed(text))
        assert pattern.fullmatch(done) and not errors(json.loads(done), schema)


def test_feed_names_the_failing_character():
    with pytest.raises(ValueError, match="cannot continue with 'x'"):
        JsonStateMachine(PERSON).feed('{"nax')


# --- tokens and generation -------------------------------------------------------------


def random_gpt(vocab_size: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=128, n_layer=1, n_head=2,
                         n_embd=32, positions="rope", norm="rmsnorm", mlp="swiglu",
                         bias=False)).eval()


def test_token_constraint_allows_exactly_the_readable_tokens():
    tok = tokenizer()
    m = JsonStateMachine(obj({"pet": {"enum": ["goldfish", "cat"]}}))
    c = TokenConstraint(m, tok, tok.special_tokens[END])
    state = m.feed('{"pet": "')
    allowed = set(torch.nonzero(c.mask(state)).flatten().tolist())
    assert allowed == {tok.stoi[t] for t in ("g", "c", "goldfish", "cat")}  # words are tokens
    done = m.feed('{"pet": "cat"}')
    assert torch.nonzero(c.mask(done)).flatten().tolist() == [tok.special_tokens[END]]


@pytest.mark.parametrize("seed", range(6))
def test_untrained_gpt_always_writes_valid_json(registry, seed):
    tok = tokenizer()
    eos = tok.special_tokens[END]
    schema = registry.call_schema() if seed % 2 else PERSON
    c = TokenConstraint(JsonStateMachine(schema), tok, eos)
    model = random_gpt(tok.vocab_size, seed)
    g = torch.Generator().manual_seed(seed)
    shortest = c.cost(c.machine.start)
    for budget in (shortest, shortest + 5, 80):
        for temperature, top_k in ((1.0, None), (1.5, 50), (0.0, None)):
            out = generate(model, tok.encode("Reply in JSON."), budget, c,
                           temperature=temperature, top_k=top_k, generator=g)
            assert len(out) <= budget and out[-1] == eos
            validate(json.loads(tok.decode(out[:-1])), schema)


def test_too_small_a_budget_raises():
    tok = tokenizer()
    c = TokenConstraint(JsonStateMachine(PERSON), tok, tok.special_tokens[END])
    with pytest.raises(ValueError, match="too few"):
        generate(random_gpt(tok.vocab_size, 0), [0], c.cost(c.machine.start) - 1, c)
    with pytest.raises(ValueError, match="block_size"):
        generate(random_gpt(tok.vocab_size, 0), [0] * 100, 40, c)


def test_unconstrained_generate_equals_shared_sampling():
    tok = tokenizer()
    model, prompt = random_gpt(tok.vocab_size, 1), tok.encode("What is 2 + 3?")
    ours = generate(model, prompt, 20)
    ref = plain_generate(model, torch.tensor([prompt]), 20, temperature=0)[0, len(prompt):]
    assert ours == ref.tolist()


def test_constraint_needs_single_character_tokens():
    tok = CharTokenizer("{}\": ,0abc", special_tokens=["<|end|>"])
    ok = JsonStateMachine(obj({"a": {"enum": ["b"]}}))
    TokenConstraint(ok, tok, tok.special_tokens["<|end|>"])
    with pytest.raises(ValueError, match=r"no single-character token for \['x'\]"):
        TokenConstraint(JsonStateMachine(obj({"x": {"type": "string"}})), tok, 0)


# --- tools -----------------------------------------------------------------------------


def call(name, **arguments) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def test_dispatch_runs_the_world_tools(registry, world):
    person = world.people_in("train")[0]
    assert registry.dispatch(call("calculator", expression="347 * 829")) == \
        {"role": "tool", "content": str(347 * 829)}
    assert registry.dispatch(call("lookup", person=person, relation="hobby"))["content"] == \
        world.lookup(person, "hobby")
    assert registry.dispatch(call("convert_units", value=10, from_unit="km",
                                  to_unit="m"))["content"] == "10000.0"
    assert convert_units(12, "in", "ft") == 1.0


@pytest.mark.parametrize("text, message", [
    ("[calculator: 1 + 2]", "error: the call is not valid JSON"),
    ('{"name": "calculator"}', 'error: a call is {"name"'),
    ('{"name": "calculator", "arguments": {}, "id": 1}', 'error: a call is {"name"'),
    ('["calculator"]', 'error: a call is {"name"'),
    (call("weather", city="Paris"), "error: unknown tool 'weather'; available: calculator, "
                                    "lookup, convert_units"),
    (call("calculator"), "error: invalid arguments for calculator: $: missing required key "
                         "'expression'"),
    (call("calculator", expression=5), "error: invalid arguments for calculator: "
                                       "$.expression: expected string"),
    (call("lookup", person="Nobody", relation="bff"), "error: invalid arguments for lookup: "
                                                      "$.relation: 'bff' is not one of"),
    (call("lookup", person="Nobody", relation="hobby"), "error: lookup failed: the world has "
                                                        "no fact ('Nobody', 'hobby')"),
    (call("calculator", expression="__import__('os')"), "error: calculator failed: calculator "
                                                        "accepts integers"),
    (call("convert_units", value=1, from_unit="kg", to_unit="km"), "error: convert_units "
                                                                   "failed: cannot convert mass"),
])
def test_dispatch_errors_are_clear_messages(registry, text, message):
    reply = registry.dispatch(text)
    assert reply["role"] == "tool" and reply["content"].startswith(message), reply


def test_registry_checks_its_tools(registry):
    with pytest.raises(ValueError, match="already registered"):
        registry.add(registry.tools["calculator"])
    with pytest.raises(ValueError, match="must be of type object"):
        ToolRegistry([Tool("f", str, {"type": "string"})])
    with pytest.raises(ValueError, match=r"schema g.parameters.x: unknown type"):
        ToolRegistry([Tool("g", str, obj({"x": {"type": "str"}}))])
    assert [json.loads(line)["name"] for line in registry.describe().splitlines()] == \
        ["calculator", "lookup", "convert_units"]
    relation = registry.call_schema()["anyOf"][1]["properties"]["arguments"]["properties"]
    assert relation["relation"]["enum"] == list(RELATIONS)


def test_constrained_calls_always_dispatch_to_a_message(registry):
    """Valid by construction: the reply is a result or a tool's own error, never a parse error."""
    tok = tokenizer()
    c = TokenConstraint(JsonStateMachine(registry.call_schema()), tok, tok.special_tokens[END])
    g = torch.Generator().manual_seed(0)
    model = random_gpt(tok.vocab_size, 3)
    for _ in range(5):
        out = generate(model, tok.encode("Call a tool."), 60, c, temperature=1.0, generator=g)
        content = registry.dispatch(tok.decode(out[:-1]))["content"]
        assert "not valid JSON" not in content and "invalid arguments" not in content
        assert not content.startswith(("error: a call", "error: unknown tool"))

