"""shared.agent: parsing a turn, calling tools from brackets, the ReAct loop's stops, the
agent tasks' splits and gold traces."""

import pytest
import torch

from shared.agent import (
    AGENT_SYSTEM,
    KINDS,
    AgentTask,
    accuracy_by_kind,
    agent_tasks,
    bracket_arguments,
    model_policy,
    name_drill_tasks,
    observe,
    parse_turn,
    run_agent,
)
from shared.model import GPT, GPTConfig
from shared.structured import world_tools
from shared.tinyworld import make_world, tokenizer


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)


@pytest.fixture(scope="module")
def registry(world):
    return world_tools(world)


@pytest.fixture(scope="module")
def tasks(world):
    return {s: agent_tasks(world, s) for s in ("train", "val", "test")}


@pytest.mark.parametrize("text, expected", [
    ("I need the calculator. [calculator: 2 * 3]",
     ("I need the calculator.", "calculator", "2 * 3", None, None)),
    ("[lookup: Kavo Brin, friend] and more", ("", "lookup", "Kavo Brin, friend", None, None)),
    ("Answer: 6", ("", None, None, "6", None)),
    ("So it is. Answer: Zolan.", ("So it is.", None, None, "Zolan", None)),
    ("42", ("", None, None, "42", None)),  # a reply without a call is the answer
    ("I need [calculator 2 * 3", ("I need [calculator 2 * 3", None, None, None,
                                  "malformed call: write [tool: arguments]")),
    ("calculator: 2 * 3]", ("calculator: 2 * 3]", None, None, None,
                            "malformed call: write [tool: arguments]")),
])
def test_parse_turn(text, expected):
    assert tuple(parse_turn(text)) == expected


def test_bracket_arguments(registry):
    assert bracket_arguments(registry, "calculator", "(2 + 3) * 4") == \
        {"expression": "(2 + 3) * 4"}
    assert bracket_arguments(registry, "lookup", "Kavo Brin, friend") == \
        {"person": "Kavo Brin", "relation": "friend"}
    assert bracket_arguments(registry, "convert_units", "5, km, mi") == \
        {"value": 5.0, "from_unit": "km", "to_unit": "mi"}
    with pytest.raises(ValueError, match="takes 2 arguments"):
        bracket_arguments(registry, "lookup", "Kavo Brin")
    with pytest.raises(ValueError, match="value must be a number"):
        bracket_arguments(registry, "convert_units", "five, km, mi")
    with pytest.raises(ValueError, match="unknown tool 'weather'"):
        bracket_arguments(registry, "weather", "Paris")


def test_observe_turns_every_failure_into_an_error_observation(registry, world):
    person = world.people[0]
    ok = observe(registry, parse_turn(f"[lookup: {person}, lives_in]"))
    assert ok == world.lookup(person, "lives_in")
    assert observe(registry, parse_turn("[calculator: 437 * 154]")) == "67298"
    cases = {
        "[calculator: __import__('os').system('true')]": "error: calculator failed: calculator "
                                                         "accepts integers",
        "[calculator: 2 ** 100]": "error: calculator failed: calculator accepts integers",
        "[lookup: Nobody Here, lives_in]": "error: lookup failed: the world has no fact",
        "[lookup: Nobody Here, shoe_size]": "error: invalid arguments for lookup",
        "[weather: Paris]": "error: unknown tool 'weather'",
        "[convert_units: 1, kg, km]": "error: convert_units failed: cannot convert mass",
        "[calculator 1 + 2": "error: malformed call",
    }
    for text, start in cases.items():
        assert observe(registry, parse_turn(text)).startswith(start), text
    with pytest.raises(ValueError, match="action or an error"):
        observe(registry, parse_turn("Answer: 3"))


def scripted(replies_by_question):
    """A policy that plays back fixed turns per question, in order."""
    state = {}

    def policy(conversations):
        out = []
        for messages in conversations:
            q = next(m["content"] for m in messages if m["role"] == "user")
            k = state.get(q, 0)
            state[q] = k + 1
            out.append(replies_by_question[q][k])
        return out
    return policy


def test_run_agent_steps_and_stops(registry, world):
    person = world.people[0]
    friend = world.lookup(person, "friend")
    policy = scripted({
        "q1": [f"First. [lookup: {person}, friend]",
               f"Now. [lookup: {friend}, lives_in]", "Answer: done"],
        "q2": ["[calculator 1 +", "[calculator: 1 + 1]", "[calculator: 2 + 2]"],
        "q3": [None],
        "q4": ["Answer: 7"],
    })
    runs = run_agent(policy, ["q1", "q2", "q3", "q4"], registry, max_steps=2)
    r1, r2, r3, r4 = runs
    assert (r1.answer, r1.stop, len(r1.steps)) == ("done", "answer", 2)
    assert r1.steps[1].observation == world.lookup(friend, "lives_in")
    assert [m["role"] for m in r1.messages] == ["system", "user", "assistant", "tool",
                                                "assistant", "tool", "assistant"]
    assert r1.messages[0]["content"] == AGENT_SYSTEM
    # a malformed call is a step with an error observation; the step limit ends the run
    assert (r2.answer, r2.stop) == (None, "max_steps")
    assert [s.action for s in r2.steps] == [None, "[calculator: 1 + 1]", "[calculator: 2 + 2]"]
    assert r2.steps[0].observation.startswith("error: malformed call")
    assert (r3.answer, r3.stop, r3.steps) == (None, "context", [])
    assert (r4.answer, r4.stop) == ("7", "answer")
    assert "observation: 2" in r2.trace() and "[stop: max_steps]" in r2.trace()
    runs = run_agent(scripted({"q": ["Answer: 1"]}), ["q"], registry, system=None)
    assert runs[0].messages[0]["role"] == "user"
    with pytest.raises(ValueError, match="max_steps"):
        run_agent(policy, ["q1"], registry, max_steps=-1)
    with pytest.raises(ValueError, match="returned 0 turns"):
        run_agent(lambda convs: [], ["q"], registry)


def test_gold_traces_replay_through_the_loop(tasks, registry):
    """A policy that plays each task's gold turns gets every answer right."""
    sample = [t for s in tasks.values() for t in s[::25]]
    by_q = {t.question: [m["content"] for m in t.messages() if m["role"] == "assistant"]
            for t in sample}
    runs = run_agent(scripted(by_q), list(by_q), registry)
    by_question = {t.question: t for t in sample}
    assert all(by_question[r.question].is_correct(r.answer) for r in runs)
    assert {t.kind for t in sample} == set(KINDS)


def test_splits_keep_test_people_and_expressions_out_of_training(tasks, world):
    heldout = set(world.people_in("heldout"))
    test_people = {t.meta["person"] for t in tasks["test"] if "person" in t.meta}
    assert test_people == heldout
    train_text = " ".join(m["content"] for t in tasks["train"] for m in t.messages())
    assert not any(p in train_text for p in heldout)
    drills = name_drill_tasks(world, n_worlds=2)
    drill_text = " ".join(m["content"] for t in drills for m in t.messages())
    assert not any(p in drill_text for p in world.people)
    assert {t.kind for t in drills} == {"lookup", "age", "friend_city"}
    q = {s: {t.question for t in ts if t.kind in ("calculator", "convert")}
         for s, ts in tasks.items()}
    assert not q["train"] & q["test"] and not q["train"] & q["val"] and not q["val"] & q["test"]
    world_test = {ex.prompt for ex in world.examples("test", "tool_use")
                  if ex.meta["tool"] == "calculator"}
    assert {t.question for t in tasks["test"] if t.kind == "calculator"} == world_test
    assert agent_tasks(world, "test") == tasks["test"]  # deterministic
    with pytest.raises(ValueError, match="split"):
        agent_tasks(world, "rag")


def test_accuracy_by_kind():
    ts = [AgentTask("lookup", "q", "Zolan", ()), AgentTask("lookup", "q", "Zolan", ()),
          AgentTask("age", "q", "42", ())]
    acc = accuracy_by_kind(ts, ["Zolan.", None, "Answer: 42"])
    assert acc == {"lookup": 0.5, "age": 1.0, "mean": 0.75}
    with pytest.raises(ValueError, match="2 answers"):
        accuracy_by_kind(ts, ["a", "b"])


def test_model_policy_runs_a_real_model(registry):
    tok = tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    policy = model_policy(model, tok, max_new_tokens=8, temperature=1.0, seed=3)
    convs = [[{"role": "user", "content": "What is 2 + 2?"}],
             [{"role": "user", "content": "x" * 80}]]  # longer than the context
    first = policy(convs)
    assert isinstance(first[0], str) and first[1] is None
    again = model_policy(model, tok, max_new_tokens=8, temperature=1.0, seed=3)(convs)
    assert again == first  # seeded sampling repeats
    runs = run_agent(model_policy(model, tok, max_new_tokens=8), ["What is 2 + 2?"], registry,
                     max_steps=1)
    assert runs[0].stop in ("answer", "max_steps", "context")
