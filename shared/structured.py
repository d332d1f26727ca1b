"""Structured output: tools described by JSON Schemas, decoding that can only write valid
JSON, and dispatch of a parsed call to a Python function.

A model asked for JSON writes valid JSON only as often as its training makes it. Constrained
decoding removes the choice: at every step the logits of the tokens that cannot continue a
valid document are set to -inf, so whatever the model prefers among the rest, the output
parses and matches the schema. This is what Outlines does (Willard & Louf 2023, "Efficient
Guided Generation for Large Language Models", https://arxiv.org/abs/2307.09702), as do
llama.cpp's GBNF grammars and the "structured outputs" of hosted APIs.

Three pieces, each used by week 5's notebook 02 and the agents of week 8:

- A JSON Schema subset: `check_schema` (a malformed or unsupported schema raises ValueError
  naming the place), `errors` / `validate` of an instance (equal to the `jsonschema`
  package on this subset; tests/test_structured.py checks it).
- `JsonStateMachine(schema)`: a character-level pushdown automaton for exactly the JSON
  texts that validate, written in json.dumps's layout; `allowed_next(prefix)` is the set of
  characters that keep the text completable. `TokenConstraint` lifts it to a tokenizer's
  ids (a trie of the vocabulary, one mask per reached state, cached), with a length guard:
  a token is allowed only if the document can still be closed in the tokens left, so a
  model that rambles inside a string is steered to close it in time. `generate` decodes
  with or without the constraint.
- `ToolRegistry`: tools with their parameter schemas, the schema of a call
  {"name": ..., "arguments": {...}}, and `dispatch(text)` -> a tool message with the
  result or a clear error. `world_tools(world)` holds the tiny world's calculator, lookup
  and a unit converter.

How the machine works. A state is a set of stacks (the automaton is nondeterministic: an
enum's values, anyOf's alternatives and a number that may or may not go on are followed in
parallel, the set shrinking as characters arrive). A stack holds what is still to be read,
top last: ("L", text) a literal, ("S", k) string content (k: 0 plain, -1 after a backslash,
1-4 hex digits of a \\uXXXX left), ("N", state, integer_only) a number, ("V", node) any value
of a schema node, ("O", node, used_keys, first) the choice point inside an object. Only
L, S and N read characters; V and O are expanded first (epsilon moves).

Layout: exactly json.dumps's (", " and ": ", no other whitespace). One spelling per document
keeps the automaton small, spends no tokens on whitespace, and gives the length guard a
shortest way to close. Left out: free whitespace, arrays, null, "integer" written as 1.0 or
1e2, string formats and patterns, numeric bounds, $ref; Outlines' precomputed index of
every state's tokens (masks here are built the first time a state is reached).
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from shared.sampling import generate as sample_generate

TYPES = ("object", "string", "number", "integer", "boolean")
KEYWORDS = ("type", "properties", "required", "additionalProperties", "enum", "const",
            "anyOf", "description", "title")
PRINTABLE = "".join(chr(c) for c in range(32, 127))  # allowed_next's default alphabet


# --------------------------------------------------------------------------------------
# JSON Schema: the subset, and validation of instances
# --------------------------------------------------------------------------------------


def _is_type(value, t: str) -> bool:
    """JSON Schema's types: bool is not a number, 1.0 is an integer."""
    if t == "object":
        return isinstance(value, dict)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return t == "number" or isinstance(value, int) or value.is_integer()


def _json_equal(a, b) -> bool:
    """Equality as JSON Schema's enum sees it: 1 == 1.0, but True != 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def check_schema(schema, path: str = "$") -> None:
    """Raise ValueError naming the place if `schema` is not in the supported subset.

    >>> check_schema({"type": "object", "properties": {"n": {"type": "int"}}})
    Traceback (most recent call last):
    ...
    ValueError: schema $.n: unknown type 'int'; supported: object, string, number, integer, boolean
    """
    def fail(msg):
        raise ValueError(f"schema {path}: {msg}")
    if not isinstance(schema, dict):
        fail(f"must be a dict, got {type(schema).__name__}")
    if unknown := [k for k in schema if k not in KEYWORDS]:
        fail(f"unsupported keyword {unknown[0]!r}; supported: {', '.join(KEYWORDS)}")
    if "const" in schema:
        if "enum" in schema:
            fail("give enum or const, not both")
        schema = {k: v for k, v in schema.items() if k != "const"} | {"enum": [schema["const"]]}
    t = schema.get("type")
    if t is not None and t not in TYPES:
        fail(f"unknown type {t!r}; supported: {', '.join(TYPES)}")
    if t is None and "enum" not in schema and "anyOf" not in schema:
        fail("needs a type, enum, const or anyOf (the decoder must know what to write)")
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            fail(f"enum must be a non-empty list, got {values!r}")
        for v in values:
            if isinstance(v, float) and not math.isfinite(v) or \
                    not isinstance(v, str | int | float):  # bool is an int
                fail(f"enum values must be strings, numbers or booleans, got {v!r}")
            if t is not None and not _is_type(v, t):
                fail(f"enum value {v!r} is not of type {t}")
    if "anyOf" in schema:
        if not isinstance(schema["anyOf"], list) or not schema["anyOf"]:
            fail("anyOf must be a non-empty list of schemas")
        for i, sub in enumerate(schema["anyOf"]):
            check_schema(sub, f"{path}.anyOf[{i}]")
    object_words = [k for k in ("properties", "required", "additionalProperties") if k in schema]
    if object_words and t != "object":
        fail(f"{object_words[0]} needs type object")
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(k, str) for k in props):
        fail("properties must be a dict from key to schema")
    for key, sub in props.items():
        check_schema(sub, f"{path}.{key}")
    required = schema.get("required", [])
    if not isinstance(required, list) or len(set(map(str, required))) != len(required):
        fail(f"required must be a list of distinct keys, got {required!r}")
    for key in required:
        if key not in props:
            fail(f"required key {key!r} is not in properties")
    if not isinstance(schema.get("additionalProperties", True), bool):
        fail("additionalProperties must be true or false (schemas for extra keys: left out)")


def errors(instance, schema: dict, path: str = "$") -> list[str]:
    """Every way `instance` breaks `schema` (a checked subset schema), each naming its path.

    >>> s = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
    ...      "additionalProperties": False}
    >>> errors({"n": 1}, s)
    []
    >>> for problem in errors({"n": "1", "m": 2}, s): print(problem)
    $.n: expected integer, got str '1'
    $: unexpected key 'm' (additionalProperties is false)
    """
    if "anyOf" in schema:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        out = errors(instance, rest, path) if set(rest) - {"description", "title"} else []
        if not any(not errors(instance, s, path) for s in schema["anyOf"]):
            out.append(f"{path}: matches none of the {len(schema['anyOf'])} alternatives")
        return out
    t = schema.get("type")
    if t is not None and not _is_type(instance, t):
        return [f"{path}: expected {t}, got {type(instance).__name__} {instance!r}"]
    values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema \
        else None
    if values is not None and not any(_json_equal(instance, v) for v in values):
        return [f"{path}: {instance!r} is not one of {values!r}"]
    out = []
    if t == "object":
        props = schema.get("properties", {})
        out += [f"{path}: missing required key {k!r}" for k in schema.get("required", [])
                if k not in instance]
        for key, value in instance.items():
            if key in props:
                out += errors(value, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties", True) is False:
                out.append(f"{path}: unexpected key {key!r} (additionalProperties is false)")
    return out


def validate(instance, schema: dict) -> None:
    """Raise ValueError listing every error if `instance` does not match `schema`."""
    if problems := errors(instance, schema):
        raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------------------
# The JSON state machine (characters)
# --------------------------------------------------------------------------------------

# The JSON number grammar -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? as a DFA.
_DIGITS, _NONZERO = set("0123456789"), set("123456789")
_NUMBER = {
    "start": [("-", "minus"), ("0", "zero"), (_NONZERO, "int")],
    "minus": [("0", "zero"), (_NONZERO, "int")],
    "zero": [(".", "dot"), ("eE", "e")],
    "int": [(_DIGITS, "int"), (".", "dot"), ("eE", "e")],
    "dot": [(_DIGITS, "frac")],
    "frac": [(_DIGITS, "frac"), ("eE", "e")],
    "e": [("+-", "sign"), (_DIGITS, "exp")],
    "sign": [(_DIGITS, "exp")],
    "exp": [(_DIGITS, "exp")],
}
_NUMBER_DONE = {"zero", "int", "frac", "exp"}  # accepting states


class JsonStateMachine:
    """The JSON texts (json.dumps layout) that validate against `schema`, one char at a time.

    key_order="schema": an object's keys come in the schema's order (optional ones may be
    skipped); "any": in any order. States are hashable (frozensets of stacks), so callers
    can cache per state.

    >>> m = JsonStateMachine({"type": "object", "properties": {"pet": {"enum": ["cat", "cow"]},
    ...                       "age": {"type": "integer"}}, "required": ["pet", "age"]})
    >>> sorted(m.allowed_next('{"pet": "c')), sorted(m.allowed_next('{"pet": "cat", "age": 4'))
    (['a', 'o'], ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '}'])
    >>> m.accepts('{"pet": "cow", "age": 12}'), m.accepts('{"pet": "dog", "age": 12}')
    (True, False)
    >>> m.completion(m.feed('{"pet": "c'))
    'at", "age": 0}'
    """

    def __init__(self, schema: dict, key_order: str = "schema"):
        if key_order not in ("schema", "any"):
            raise ValueError(f"key_order must be 'schema' or 'any', got {key_order!r}")
        check_schema(schema)
        self.schema, self.key_order = schema, key_order
        self.nodes: list[tuple] = []  # compiled schema nodes, referred to by index
        self.root = self._compile(schema)
        self.start = frozenset(self._expand((("V", self.root),)))
        self._steps: dict = {}
        self._completions: dict = {}

    # --- compiling the schema into nodes ----------------------------------------------
    def _add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _compile(self, s: dict) -> int:
        if "anyOf" in s:
            return self._add(("alt", tuple(self._compile(sub) for sub in s["anyOf"])))
        values = s["enum"] if "enum" in s else [s["const"]] if "const" in s else None
        if values is not None:  # each value is one literal: its JSON text
            return self._add(("alt", tuple(self._add(("lit", json.dumps(v))) for v in values)))
        t = s["type"]
        if t == "boolean":
            return self._add(("alt", (self._add(("lit", "true")), self._add(("lit", "false")))))
        if t in ("number", "integer"):
            return self._add(("num", t == "integer"))
        if t == "string":
            return self._add(("str",))
        props = s.get("properties", {})
        keys = tuple(props)
        children = tuple(self._compile(props[k]) for k in keys)
        required = frozenset(keys.index(k) for k in s.get("required", []))
        return self._add(("obj", keys, children, required))

    # --- moves --------------------------------------------------------------------------
    def _next_keys(self, node: tuple, used: frozenset) -> list[int]:
        _, keys, _, required = node
        if self.key_order == "any":
            return [i for i in range(len(keys)) if i not in used]
        out = []  # schema order: any later key, up to and including the next required one
        for i in range(max(used, default=-1) + 1, len(keys)):
            out.append(i)
            if i in required:
                break
        return out

    def _expand(self, stack: tuple) -> list[tuple]:
        """Epsilon moves: the stacks reachable without reading, each with L, S or N on top
        (or empty: the document is complete)."""
        if not stack:
            return [stack]
        top, rest = stack[-1], stack[:-1]
        if top[0] == "N":
            return [stack] + (self._expand(rest) if top[1] in _NUMBER_DONE else [])
        if top[0] in "LS":
            return [stack]
        if top[0] == "O":
            _, n, used, first = top
            node, out = self.nodes[n], []
            for i in self._next_keys(node, used):
                sep = ("" if first else ", ") + json.dumps(node[1][i]) + ": "
                out += self._expand(rest + (("O", n, used | {i}, False), ("V", node[2][i]),
                                            ("L", sep)))
            if node[3] <= used:  # every required key is there: the object may close
                out.append(rest + (("L", "}"),))
            return out
        node = self.nodes[top[1]]  # "V": a value of this node
        if node[0] == "alt":
            return [s for child in node[1] for s in self._expand(rest + (("V", child),))]
        if node[0] == "lit":
            return [rest + (("L", node[1]),)]
        if node[0] == "str":
            return [rest + (("S", 0), ("L", '"'))]
        if node[0] == "num":
            return [rest + (("N", "start", node[1]),)]
        return [rest + (("O", top[1], frozenset(), True), ("L", "{"))]

    def _read(self, stack: tuple, ch: str) -> list[tuple]:
        """The stacks after reading `ch` from `stack` (an expanded one); [] if it cannot."""
        if not stack:
            return []  # the document is complete: nothing may follow
        top, rest = stack[-1], stack[:-1]
        if top[0] == "L":
            if ch != top[1][0]:
                return []
            return self._expand(rest + (("L", top[1][1:]),) if len(top[1]) > 1 else rest)
        if top[0] == "S":
            k = top[1]
            if k == 0:
                if ch == '"':
                    return self._expand(rest)
                return [rest + (("S", -1),)] if ch == "\\" else [] if ch < " " else [stack]
            if k == -1:  # after a backslash: one of JSON's escapes
                return [rest + (("S", 0),)] if ch in '"\\/bfnrt' else \
                    [rest + (("S", 4),)] if ch == "u" else []
            return [rest + (("S", k - 1),)] if ch in string.hexdigits else []
        _, state, integer = top  # "N"
        for chars, new in _NUMBER[state]:
            if ch in chars and not (integer and new in ("dot", "e")):
                return self._expand(rest + (("N", new, integer),))
        return []

    def step(self, state: frozenset, ch: str) -> frozenset | None:
        """The state after reading one character, or None if no valid document continues so."""
        key = (state, ch)
        if key not in self._steps:
            new = frozenset(s for stack in state for s in self._read(stack, ch))
            self._steps[key] = new or None
        return self._steps[key]

    def feed(self, text: str, state: frozenset | None = None) -> frozenset:
        """The state after `text`; ValueError at the first character that cannot continue."""
        state = self.start if state is None else state
        for i, ch in enumerate(text):
            new = self.step(state, ch)
            if new is None:
                raise ValueError(f"{text[:i]!r} cannot continue with {ch!r}")
            state = new
        return state

    def is_complete(self, state: frozenset) -> bool:
        return () in state

    def accepts(self, text: str) -> bool:
        """Whether `text` is a whole valid document."""
        try:
            return self.is_complete(self.feed(text))
        except ValueError:
            return False

    def allowed_next(self, prefix: str, alphabet: str = PRINTABLE) -> set[str]:
        """The characters of `alphabet` after which `prefix` can still become a document."""
        state = self.feed(prefix)
        return {ch for ch in alphabet if self.step(state, ch) is not None}

    # --- the shortest way to finish -------------------------------------------------------
    def _min_value(self, n: int) -> str:
        node = self.nodes[n]
        if node[0] == "alt":
            return min((self._min_value(c) for c in node[1]), key=len)
        return {"lit": lambda: node[1], "str": lambda: '""', "num": lambda: "0",
                "obj": lambda: "{" + self._close_object(n, frozenset(), True)}[node[0]]()

    def _close_object(self, n: int, used: frozenset, first: bool) -> str:
        _, keys, children, required = self.nodes[n]
        parts = [json.dumps(keys[i]) + ": " + self._min_value(children[i])
                 for i in sorted(required - used)]
        return ("" if first or not parts else ", ") + ", ".join(parts) + "}"

    def _finish(self, stack: tuple) -> str:
        out = []
        for item in reversed(stack):
            kind = item[0]
            if kind == "L":
                out.append(item[1])
            elif kind == "S":
                out.append({0: '"', -1: '""'}.get(item[1], "0" * item[1] + '"'))
            elif kind == "N":
                out.append("" if item[1] in _NUMBER_DONE else "0")
            elif kind == "V":
                out.append(self._min_value(item[1]))
            else:
                out.append(self._close_object(item[1], item[2], item[3]))
        return "".join(out)

    def finishes(self, state: frozenset) -> list[str]:
        """The shortest completion of each alternative (stack) of `state`."""
        return [self._finish(stack) for stack in state]

    def completion(self, state: frozenset) -> str:
        """The shortest text that completes the document from `state` ('' if complete)."""
        if state not in self._completions:
            self._completions[state] = min(self.finishes(state),
                                           key=lambda text: (len(text), text))
        return self._completions[state]


# --------------------------------------------------------------------------------------
# From characters to a tokenizer's ids, and decoding with the constraint
# --------------------------------------------------------------------------------------


class TokenConstraint:
    """A `JsonStateMachine` over a tokenizer's vocabulary: which ids may come next.

    A token is allowed if the machine can read all of its characters; `eos_id` (the reply's
    end, e.g. <|end|>) only once the document is complete. Special tokens never. With a
    budget of tokens left, a token is allowed only if the document can still be closed
    after it (`cost`); every character the grammar may need to close is a single token
    (checked here), so a way to close always exists.
    """

    def __init__(self, machine: JsonStateMachine, tok, eos_id: int):
        self.machine, self.tok, self.eos_id = machine, tok, eos_id
        self.vocab_size = tok.vocab_size
        special = set(tok.special_tokens.values())
        self.trie: dict = {}  # char -> (ids ending here, children)
        singles = set()
        for i in range(self.vocab_size):
            text = "" if i in special else tok.decode([i])
            if not text or "\ufffd" in text:
                continue  # specials, unused ids, partial UTF-8 bytes: never allowed
            node = self.trie
            for j, ch in enumerate(text):
                ids, kids = node.setdefault(ch, ([], {}))
                if j == len(text) - 1:
                    ids.append(i)
                node = kids
            if len(text) == 1:
                singles.add(text)
        needed = set('{}":, 0' + "".join(n[1] for n in machine.nodes if n[0] == "lit") +
                     "".join(json.dumps(k) for n in machine.nodes if n[0] == "obj" for k in n[1]))
        if missing := sorted(needed - singles):
            raise ValueError(f"the tokenizer has no single-character token for {missing}; "
                             "the length guard needs one for every character of the grammar")
        self._cost_of: dict = {}  # state -> tokens needed to finish
        self._costs: dict = {}  # state -> (V,) float: tokens needed to finish after each id
        self._next: dict = {}  # state -> {id: state after it}

    def _fewest_tokens(self, text: str) -> float:
        """The fewest vocabulary tokens that spell `text` (dynamic programming over the trie)."""
        best = [0.0] + [math.inf] * len(text)
        for i in range(len(text)):
            node = self.trie if best[i] < math.inf else {}
            for j in range(i, len(text)):
                if text[j] not in node:
                    break
                ids, node = node[text[j]]
                if ids:
                    best[j + 1] = min(best[j + 1], best[i] + 1)
        return best[-1]

    def cost(self, state: frozenset) -> int:
        """Tokens that suffice to finish from `state`, eos included: the fewest tokens that
        spell a stack's shortest completion, + 1 (an upper bound: a longer text may take fewer
        tokens). After the first of those tokens the rest of that completion is still open,
        so some allowed token always lowers the cost by one: the guard never gets stuck."""
        if state not in self._cost_of:
            self._cost_of[state] = 1 + int(min(map(self._fewest_tokens,
                                                   self.machine.finishes(state))))
        return self._cost_of[state]

    def _walk(self, state, node, out):
        for ch, (ids, kids) in node.items():
            new = self.machine.step(state, ch)
            if new is not None:
                out.update(dict.fromkeys(ids, new))
                self._walk(new, kids, out)

    def successors(self, state: frozenset) -> dict[int, frozenset]:
        """{token id: state after it} for every allowed ordinary token."""
        if state not in self._next:
            self._next[state] = {}
            self._walk(state, self.trie, self._next[state])
        return self._next[state]

    def mask(self, state: frozenset, budget: int | None = None) -> torch.Tensor:
        """(V,) bool: True where the token may come next, `budget` tokens left (None: no limit)."""
        if state not in self._costs:
            costs = torch.full((self.vocab_size,), math.inf)
            for i, new in self.successors(state).items():
                costs[i] = self.cost(new)
            if self.machine.is_complete(state):
                costs[self.eos_id] = 0
            self._costs[state] = costs
        costs = self._costs[state]  # inf where the token is not allowed at all
        return costs.isfinite() if budget is None else costs <= budget - 1

    def advance(self, state: frozenset, token: int) -> frozenset:
        if token == self.eos_id and self.machine.is_complete(state):
            return state
        if token not in self.successors(state):
            raise ValueError(f"token {token} ({self.tok.decode([token])!r}) is not allowed here")
        return self._next[state][token]


def generate(model, prompt_ids: list[int], max_new_tokens: int,
             constraint: TokenConstraint | None = None, eos_id: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """New token ids after `prompt_ids` (eos included if emitted), one sequence, KV cached.

    With a `constraint`, disallowed logits are -inf before sampling (so greedy, temperature,
    top-k and top-p all choose among valid tokens) and the document is always complete
    within max_new_tokens; eos_id defaults to the constraint's. Without one, plain decoding
    until eos_id: the same loop (`shared.sampling.generate`), for a fair comparison of speed
    and validity.
    """
    eos_id = constraint.eos_id if eos_id is None and constraint is not None else eos_id
    if len(prompt_ids) + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) "
                         f"exceed the model's block_size {model.config.block_size}")
    mask = None
    if constraint is not None:
        state = constraint.machine.start
        if constraint.cost(state) > max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} is too few: the shortest valid "
                             f"document takes {constraint.cost(state)} tokens with eos")

        def mask(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            nonlocal state
            n_out = ids.size(1) - len(prompt_ids)
            if n_out:  # the token sampled last step moves the machine on
                state = constraint.advance(state, int(ids[0, -1]))
            allowed = constraint.mask(state, max_new_tokens - n_out)  # the length guard
            return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    idx = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    out = sample_generate(model, idx, max_new_tokens, temperature, top_k, top_p,
                          stop=eos_id, generator=generator, logits_processor=mask)
    return out[0, len(prompt_ids):].tolist()


# --------------------------------------------------------------------------------------
# Tools: a registry, the call schema, dispatch
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A Python function the model may call; `parameters` is the JSON Schema of its keyword
    arguments (an object schema)."""
    name: str
    function: Callable
    parameters: dict
    description: str = ""


class ToolRegistry:
    """Tools by name; a call is the JSON text {"name": <tool>, "arguments": {...}}.

    >>> reg = ToolRegistry([Tool("add", lambda a, b: a + b, {"type": "object",
    ...     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    ...     "required": ["a", "b"], "additionalProperties": False})])
    >>> reg.dispatch('{"name": "add", "arguments": {"a": 2, "b": 3}}')
    {'role': 'tool', 'content': '5'}
    >>> reg.dispatch('{"name": "mul", "arguments": {}}')["content"]
    "error: unknown tool 'mul'; available: add"
    """

    def __init__(self, tools: Iterable[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        check_schema(tool.parameters, f"{tool.name}.parameters")
        if tool.parameters.get("type") != "object":
            raise ValueError(f"schema {tool.name}.parameters: must be of type object")
        self.tools[tool.name] = tool

    def call_schema(self) -> dict:
        """anyOf one call schema per tool: the name (a const) fixes which arguments follow."""
        return {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name},
                                                           "arguments": t.parameters},
                           "required": ["name", "arguments"], "additionalProperties": False}
                          for t in self.tools.values()]}

    def describe(self) -> str:
        """The tools as JSON, one line each (what a system prompt lists)."""
        return "\n".join(json.dumps({"name": t.name, "description": t.description,
                                     "parameters": t.parameters}) for t in self.tools.values())

    def call(self, name: str, arguments: dict) -> str:
        """Validate the arguments, run the tool, and return its result as text; ValueError
        with a clear message for an unknown tool, invalid arguments or a failing tool."""
        if name not in self.tools:
            raise ValueError(f"unknown tool {name!r}; available: {', '.join(self.tools)}")
        tool = self.tools[name]
        if problems := errors(arguments, tool.parameters):
            raise ValueError(f"invalid arguments for {name}: {'; '.join(problems)}")
        try:
            result = tool.function(**arguments)
        except Exception as e:  # a tool's failure is a message to the model, not a crash
            raise ValueError(f"{name} failed: {e}") from e
        return result if isinstance(result, str) else json.dumps(result)

    def dispatch(self, text: str) -> dict:
        """Parse a call, run it: {"role": "tool", "content": result or "error: ..."}."""
        try:
            call = json.loads(text)
        except json.JSONDecodeError as e:
            return {"role": "tool", "content": f"error: the call is not valid JSON ({e})"}
        if not isinstance(call, dict) or set(call) != {"name", "arguments"} or \
                not isinstance(call["name"], str) or not isinstance(call["arguments"], dict):
            return {"role": "tool", "content": 'error: a call is {"name": <tool name>, '
                                               '"arguments": {...}} and nothing else'}
        try:
            return {"role": "tool", "content": self.call(call["name"], call["arguments"])}
        except ValueError as e:
            return {"role": "tool", "content": f"error: {e}"}


UNITS = {"mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0),
         "km": ("length", 1000.0), "in": ("length", 0.0254), "ft": ("length", 0.3048),
         "mi": ("length", 1609.344), "g": ("mass", 0.001), "kg": ("mass", 1.0),
         "lb": ("mass", 0.45359237)}


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    """Length and mass conversion, 6 significant digits: convert_units(5, "km", "mi") -> 3.10686.

    >>> convert_units(5, "km", "mi"), convert_units(1, "lb", "g")
    (3.10686, 453.592)
    """
    for unit in (from_unit, to_unit):
        if unit not in UNITS:
            raise ValueError(f"unknown unit {unit!r}; known: {', '.join(UNITS)}")
    (kind_a, a), (kind_b, b) = UNITS[from_unit], UNITS[to_unit]
    if kind_a != kind_b:
        raise ValueError(f"cannot convert {kind_a} ({from_unit}) to {kind_b} ({to_unit})")
    return float(f"{value * a / b:.6g}")


def world_tools(world) -> ToolRegistry:
    """The tiny world's tools as a registry: calculator, lookup, convert_units."""
    from shared.tinyworld import RELATIONS, calculate

    def lookup(person: str, relation: str) -> str:
        answer = world.lookup(person, relation)
        if answer is None:
            raise ValueError(f"the world has no fact ({person!r}, {relation!r})")
        return answer

    def obj(props: dict) -> dict:
        return {"type": "object", "properties": props, "required": list(props),
                "additionalProperties": False}

    unit = {"enum": list(UNITS)}
    return ToolRegistry([
        Tool("calculator", lambda expression: str(calculate(expression)),
             obj({"expression": {"type": "string"}}), "integer + - * and parentheses"),
        Tool("lookup", lookup, obj({"person": {"type": "string"},
                                    "relation": {"enum": list(RELATIONS)}}),
             "a fact about a person of the world"),
        Tool("convert_units", convert_units,
             obj({"value": {"type": "number"}, "from_unit": unit, "to_unit": unit}),
             "convert a length or a mass"),
    ])
