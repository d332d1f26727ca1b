"""Agents: a ReAct loop over tools, and the tiny world's agent tasks with their gold traces.

ReAct (Yao et al., https://arxiv.org/abs/2210.03629) interleaves *thought*, *action* and
*observation*: the model writes a short thought and a tool call, the loop runs the tool and
appends its result as a tool message, and the model goes on until it writes a final answer.
Here every assistant turn is one of

    I need the calculator. [calculator: 437 * 154]       thought, then an action
    Answer: 67298                                          the final answer

and the observation is the tool's result (or "error: ...") in a `tool` message. A call is
`[tool: arguments]` - the bracket format of the tiny world's tool traces - whose comma-
separated arguments map, in order, onto the properties of the tool's JSON Schema in a
`shared.structured.ToolRegistry`, so the registry validates them and runs the tool:
`[lookup: Kavo Brin, friend]` is lookup(person="Kavo Brin", relation="friend").

The loop guards what goes wrong with a small model: a malformed call ("[calculator 3 + 4")
and a tool error become observations the model sees, and a run stops after `max_steps`
actions without an answer, or when the conversation outgrows the context.

`agent_tasks(world, split)` builds five kinds of questions with their gold traces:
calculator (3-digit + - *), lookup (one fact), convert (units), age (a lookup, then the
calculator) and friend_city (two lookups: where someone's best friend lives). Train tasks
use the world's train people and fresh calculator expressions; the test split asks about
the held-out people (never in pretraining or any training example) and the world's own test
expressions, so an answer there needs the tool. The zoo's `tinyworld-agent` is trained on
the train traces.

Left out: parallel calls, tools that take structured (nested) arguments, free-form thoughts
(at 1M parameters the thoughts are fixed phrases per step: they mark the plan, they do not
reason), and planning beyond two steps.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from shared.engine import Engine, SamplingParams
from shared.structured import UNITS, ToolRegistry, world_tools
from shared.tinyworld import (
    _QUESTIONS,
    RELATIONS,
    calculate,
    encode_chat,
    extract_answer,
    parse_tool_call,
)

AGENT_SYSTEM = ("Tools: [calculator: expression], [lookup: name, relation] and "
                "[convert_units: value, unit, unit].")
KINDS = ("calculator", "lookup", "convert", "age", "friend_city")
FINAL = "Answer:"
_CALL = re.compile(r"\[([A-Za-z_]\w*): ([^\[\]]*)\]")


# --------------------------------------------------------------------------------------
# Parsing a turn and calling a tool
# --------------------------------------------------------------------------------------


class Turn(NamedTuple):
    """One assistant turn, parsed: a thought and either an action (tool, argument text), a
    final answer, or an error (a malformed call)."""
    thought: str
    tool: str | None = None
    argument: str | None = None
    answer: str | None = None
    error: str | None = None


def parse_turn(text: str) -> Turn:
    """Split an assistant turn into thought and action, answer or error.

    >>> parse_turn("I need the calculator. [calculator: 2 * 3]")[:3]
    ('I need the calculator.', 'calculator', '2 * 3')
    >>> parse_turn("Answer: 6").answer
    '6'
    >>> parse_turn("I need [calculator 2 * 3").error
    'malformed call: write [tool: arguments]'
    """
    if m := _CALL.search(text):
        return Turn(text[:m.start()].strip(), m.group(1), m.group(2).strip())
    if "[" in text or "]" in text:
        return Turn(text.strip(), error="malformed call: write [tool: arguments]")
    thought, _, _ = text.partition(FINAL)
    return Turn(thought.strip() if FINAL in text else "", answer=extract_answer(text))


def bracket_arguments(registry: ToolRegistry, tool: str, argument: str) -> dict:
    """The keyword arguments of `[tool: argument]`: the text split at commas onto the tool's
    schema properties in order (a one-parameter tool takes the whole text), numbers parsed
    where the schema asks for one. ValueError for an unknown tool or a wrong count.

    >>> from shared.structured import world_tools
    >>> from shared.tinyworld import make_world
    >>> bracket_arguments(world_tools(make_world()), "convert_units", "5, km, mi")
    {'value': 5.0, 'from_unit': 'km', 'to_unit': 'mi'}
    """
    if tool not in registry.tools:
        raise ValueError(f"unknown tool {tool!r}; available: {', '.join(registry.tools)}")
    props = registry.tools[tool].parameters.get("properties", {})
    names = list(props)
    parts = [argument] if len(names) == 1 else [p.strip() for p in argument.split(",")]
    if len(parts) != len(names):
        raise ValueError(f"{tool} takes {len(names)} arguments ({', '.join(names)}), "
                         f"got {len(parts)}")
    out = {}
    for name, text in zip(names, parts):
        if props[name].get("type") in ("number", "integer"):
            try:
                out[name] = float(text) if props[name]["type"] == "number" else int(text)
            except ValueError:
                raise ValueError(f"{tool}: {name} must be a number, got {text!r}") from None
        else:
            out[name] = text
    return out


def observe(registry: ToolRegistry, turn: Turn) -> str:
    """The observation for a turn with an action or an error: the tool's result, or
    "error: ..." (malformed call, unknown tool, bad arguments, a failing tool)."""
    if turn.error is not None:
        return f"error: {turn.error}"
    if turn.tool is None:
        raise ValueError("observe needs a turn with an action or an error")
    try:
        return registry.call(turn.tool, bracket_arguments(registry, turn.tool, turn.argument))
    except ValueError as e:
        return f"error: {e}"


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    """One thought-action-observation step of a run (action None: a malformed call)."""
    thought: str
    action: str | None
    observation: str


@dataclass
class AgentRun:
    """A finished run: the answer (None if there is none), why it stopped ("answer",
    "max_steps" or "context"), its steps and the whole conversation."""
    question: str
    answer: str | None = None
    stop: str = ""
    steps: list[Step] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)

    def trace(self) -> str:
        """The run as text, one line per thought, action, observation and answer."""
        lines = [f"Question: {self.question}"]
        for i, s in enumerate(self.steps, 1):
            lines += [f"  {i}. thought: {s.thought or '-'}",
                      f"     action: {s.action or '(malformed)'}",
                      f"     observation: {s.observation}"]
        lines.append(f"  answer: {self.answer}   [stop: {self.stop}]")
        return "\n".join(lines)


def model_policy(model, tok, max_new_tokens: int = 48, temperature: float = 0.0,
                 seed: int | None = None, max_batch_size: int = 64):
    """A policy for `run_agent` from a chat model: every conversation's next assistant turn,
    generated in one batch by `shared.engine` (None where the conversation no longer fits
    the model's context). Sampling with `seed` is repeatable: each call (round) and each
    conversation gets its own generator."""
    engine = Engine(model, tok, max_batch_size=max_batch_size, max_new_tokens=max_new_tokens,
                    max_waiting=1 << 16)
    calls = iter(range(1 << 30))

    def policy(conversations: list[list[dict]]) -> list[str | None]:
        round_ = next(calls)
        out: list[str | None] = [None] * len(conversations)
        prompts, keep = [], []
        for i, messages in enumerate(conversations):
            ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
            if len(ids) + 1 <= model.config.block_size:
                prompts.append(ids)
                keep.append(i)
        params = [SamplingParams(max_tokens=min(max_new_tokens, model.config.block_size - len(p)),
                                 temperature=temperature,
                                 seed=None if seed is None else seed + 7919 * i + round_)
                  for p, i in zip(prompts, keep)]
        for i, req in zip(keep, engine.generate(prompts, params) if prompts else []):
            out[i] = req.text
        return out

    return policy


def run_agent(policy, questions: list[str], registry: ToolRegistry, max_steps: int = 4,
              system: str | None = AGENT_SYSTEM) -> list[AgentRun]:
    """Run the ReAct loop on every question at once.

    `policy(conversations) -> texts` gives the next assistant turn of each conversation
    (`model_policy` for a model; any function for a scripted one), None where the
    conversation no longer fits. Each round, every unfinished run gets one turn. A final
    answer ends the run; a call is run through `registry` and its result appended as a tool
    message; a malformed call gets an error observation. After `max_steps` actions without
    an answer the run stops with answer None ("max_steps"); a conversation that no longer
    fits stops with "context". `system=None` asks without the tools' system prompt.
    """
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    runs = [AgentRun(q, messages=([{"role": "system", "content": system}] if system else [])
                     + [{"role": "user", "content": q}]) for q in questions]
    active = list(range(len(runs)))
    for round_ in range(max_steps + 1):
        texts = policy([runs[i].messages for i in active]) if active else []
        if len(texts) != len(active):
            raise ValueError(f"the policy returned {len(texts)} turns for {len(active)} "
                             "conversations")
        still = []
        for i, text in zip(active, texts):
            run = runs[i]
            if text is None:
                run.stop = "context"
                continue
            turn = parse_turn(text)
            run.messages.append({"role": "assistant", "content": text})
            if turn.answer is not None:
                run.answer, run.stop = turn.answer, "answer"
                continue
            obs = observe(registry, turn)
            action = None if turn.tool is None else f"[{turn.tool}: {turn.argument}]"
            run.steps.append(Step(turn.thought, action, obs))
            run.messages.append({"role": "tool", "content": obs})
            if round_ == max_steps:
                run.stop = "max_steps"
            else:
                still.append(i)
        active = still
    return runs


# --------------------------------------------------------------------------------------
# Tasks and gold traces
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentTask:
    """A question, its answer (text) and the gold steps ((thought, call, observation), ...)
    that reach it; `messages()` is the whole gold conversation, the SFT data."""
    kind: str
    question: str
    answer: str
    steps: tuple
    meta: dict = field(default_factory=dict, compare=False)

    def prompt_messages(self, system: str | None = AGENT_SYSTEM) -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": self.question}]

    def messages(self, system: str | None = AGENT_SYSTEM) -> list[dict]:
        out = self.prompt_messages(system)
        for thought, call, obs in self.steps:
            out += [{"role": "assistant", "content": f"{thought} {call}"},
                    {"role": "tool", "content": obs}]
        return out + [{"role": "assistant", "content": f"{FINAL} {self.answer}"}]

    def is_correct(self, answer: str | None) -> bool:
        """Exact match of the final answer (after `extract_answer`'s normalisation)."""
        return answer is not None and extract_answer(answer) == extract_answer(self.answer)


def _split_of(key: str, cfg) -> str:
    """A fixed split for a person-free item, by a hash of its text (train/val/test)."""
    u = zlib.crc32(key.encode()) / 2**32
    return "val" if u < cfg.val_fraction else \
        "test" if u < cfg.val_fraction + cfg.test_fraction else "train"


class _Gold:
    """Gold steps whose observations come from the registry itself, so that a trace shows
    exactly what the loop will see (a gold call that fails is a bug: AssertionError)."""

    def __init__(self, world):
        self.registry = world_tools(world)

    def __call__(self, thought: str, call: str) -> tuple:
        obs = observe(self.registry, parse_turn(call))
        if obs.startswith("error:"):
            raise AssertionError(f"gold call {call!r} fails: {obs}")
        return thought, call, obs


_FRIEND_CITY = ("Where does {s}'s best friend live?",
                "Which city does the best friend of {s} live in?")


def _person_tasks(world, people: list[str], rng: random.Random,
                  sizes: tuple[int, int, int, int]) -> list[AgentTask]:
    """lookup, age and friend_city tasks about `people`. sizes: relations asked about (of 8),
    question templates per relation (of 2), years per age question, friend_city templates
    (of 2), each drawn at random per person."""
    n_rel, n_q, n_years, n_friend = sizes
    gold, tasks = _Gold(world), []
    for name in people:
        for rel in rng.sample(RELATIONS, n_rel):
            s = gold("I need to look up the fact.", f"[lookup: {name}, {rel}]")
            tasks += [AgentTask("lookup", q.format(s=name), s[2], (s,),
                                {"person": name, "relation": rel})
                      for q in rng.sample(_QUESTIONS[rel], n_q)]
    for name in people:
        for year in rng.sample(range(2030, 2071), n_years):
            first = gold("First the birth year.", f"[lookup: {name}, birth_year]")
            second = gold("Now the calculator.", f"[calculator: {year} - {first[2]}]")
            tasks.append(AgentTask("age", f"How old is {name} in {year}?", second[2],
                                   (first, second), {"person": name}))
    for name in people:
        first = gold("First the best friend.", f"[lookup: {name}, friend]")
        second = gold("Now where the friend lives.", f"[lookup: {first[2]}, lives_in]")
        for q in rng.sample(_FRIEND_CITY, n_friend):
            tasks.append(AgentTask("friend_city", q.format(s=name), second[2], (first, second),
                                   {"person": name}))
    return tasks


# (relations, templates per relation, years, friend_city templates) per split
_PERSON_SIZES = {"train": (8, 2, 3, 2), "val": (2, 1, 1, 1), "test": (8, 1, 2, 2),
                 "drill": (2, 1, 1, 1)}
N_EVAL_CONVERT = 120  # conversions kept in val and test


def agent_tasks(world, split: str = "train", n_calculator: int = 1500, n_convert: int = 4500,
                seed: int = 0) -> list[AgentTask]:
    """The agent tasks of a split: calculator, lookup, convert, age, friend_city.

    People: the split's people, except that "test" asks about the held-out people (as the
    world's tool_use test split does); how many questions each: `_PERSON_SIZES`.
    Calculator: the world's tool_use expressions of val and test; train draws `n_calculator`
    fresh 3-digit expressions that are in neither. Convert: integer values 1-999 between
    units of one kind, split by a hash of the question; `n_convert` drawn, those of the
    split kept (at most N_EVAL_CONVERT in val and test).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    rng = random.Random(f"agent-{seed}-{split}")
    cfg, gold = world.config, _Gold(world)
    world_calc = {s: [parse_tool_call(ex.meta["trace"][2]["content"])[1]
                      for ex in world.examples(s, "tool_use") if ex.meta["tool"] == "calculator"]
                  for s in ("train", "val", "test")}
    if split == "train":
        held = set(world_calc["val"]) | set(world_calc["test"])
        exprs: list[str] = []
        while len(exprs) < n_calculator:
            a, b = sorted((rng.randint(100, cfg.max_tool_operand) for _ in "ab"), reverse=True)
            if (e := f"{a} {rng.choice('+-*')} {b}") not in held:
                exprs.append(e)
    else:
        exprs = world_calc[split]
    tasks = [AgentTask("calculator", f"What is {e}?", str(calculate(e)),
                       (gold("I need the calculator.", f"[calculator: {e}]"),)) for e in exprs]

    units: dict[str, list[str]] = {}
    for u, (kind, _) in UNITS.items():
        units.setdefault(kind, []).append(u)
    for _ in range(n_convert):
        kind = rng.choice(sorted(units))
        a, b = rng.sample(units[kind], 2)
        v = rng.randint(1, 999)
        q = rng.choice(["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?"]).format(v=v, a=a,
                                                                                     b=b)
        if _split_of(f"{v} {a} {b}", cfg) == split and \
                (split == "train" or len(tasks) < len(exprs) + N_EVAL_CONVERT):
            s = gold("I need convert_units.", f"[convert_units: {v}, {a}, {b}]")
            tasks.append(AgentTask("convert", q, s[2], (s,)))
    people = world.people_in("heldout" if split == "test" else split)
    return tasks + _person_tasks(world, people, rng, _PERSON_SIZES[split])


def name_drill_tasks(world, n_worlds: int = 6, seed: int = 0) -> list[AgentTask]:
    """Person tasks about the people of other worlds (seeds 1..n_worlds), whose names are
    not in `world`: training traces that teach the *procedure* (copy a name never seen
    into the call, copy the observation into the answer) rather than the names."""
    from shared.tinyworld import make_world

    known, tasks = set(world.people), []
    rng = random.Random(f"agent-drill-{seed}")
    for k in range(1, n_worlds + 1):
        other = make_world(seed=world.config.seed + 1000 * k)
        people = [p for p in other.people
                  if p not in known and other.lookup(other.lookup(p, "friend"), "lives_in")]
        tasks += _person_tasks(other, people, rng, _PERSON_SIZES["drill"])
    return tasks


def accuracy_by_kind(tasks: list[AgentTask], answers: list[str | None]) -> dict[str, float]:
    """Exact-match accuracy per task kind present, and their unweighted "mean"."""
    if len(tasks) != len(answers):
        raise ValueError(f"{len(tasks)} tasks but {len(answers)} answers")
    hits: dict[str, list[bool]] = {}
    for t, a in zip(tasks, answers):
        hits.setdefault(t.kind, []).append(t.is_correct(a))
    acc = {k: sum(h) / len(h) for k, h in hits.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc
