"""shared.tinyworld: determinism, disjoint splits, correct answers, the chat template's mask."""

import json
import re
import time

import pytest

from shared.tinyworld import (
    ALPHABET,
    ASSISTANT,
    END,
    FAMILIES,
    PAIR_KINDS,
    REFUSAL,
    RELATIONS,
    SPECIAL_TOKENS,
    USER,
    WORDS,
    Example,
    WorldConfig,
    calculate,
    encode_chat,
    extract_answer,
    format_chat,
    is_correct,
    make_world,
    parse_tool_call,
    read_facts,
    reward,
    tokenizer,
)

SPLITS3 = ("train", "val", "test")


@pytest.fixture(scope="module")
def world():
    start = time.process_time()
    w = make_world(seed=0)
    assert time.process_time() - start < 2.0  # the default world is cheap to regenerate
    return w


def all_examples(w):
    return [ex for split in (*SPLITS3, "rag") for ex in w.examples(split)]


def text_of(ex: Example) -> str:
    return "\n".join(m["content"] for m in ex.messages())


def snapshot(w):
    return (w.facts, w.documents(), w.pretraining_corpus(), all_examples(w),
            [w.preference_pairs(s) for s in SPLITS3], [ex.meta for ex in all_examples(w)])


def test_same_seed_gives_the_same_world_and_another_seed_another(world):
    assert snapshot(make_world(seed=0)) == snapshot(world)
    other = make_world(seed=1)
    assert other.pretraining_corpus() != world.pretraining_corpus()
    assert set(other.people).isdisjoint(world.people) or other.people != world.people
    assert [e.prompt for e in other.examples("test")] != [e.prompt for e in world.examples("test")]


def test_sizes_of_one_part_do_not_change_the_others(world):
    # Each part has its own RNG: more string tasks leave people, documents, arithmetic alone.
    w = make_world(seed=0, n_string=100)
    assert w.pretraining_corpus() == world.pretraining_corpus()
    assert w.examples("test", "arithmetic") == world.examples("test", "arithmetic")
    assert len(w.examples("train", "string")) < len(world.examples("train", "string"))


def test_default_sizes_suit_a_cpu(world):
    s = world.summary()
    assert s["people"] == 200 and s["heldout"] == 25
    assert 250_000 < s["corpus_chars"] < 1_000_000  # ~0.3 MB of biographies and gazetteer
    assert s["examples_train"] > 4000 and s["examples_rag"] == 25 * len(RELATIONS)


def test_names_are_unique_pronounceable_and_not_places(world):
    assert len(set(world.people)) == len(world.people) == 200
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", n) for n in world.people)
    words = {w for n in world.people for w in n.split()}
    assert words.isdisjoint(world.cities)
    pets = [world.lookup(n, "pet_name") for n in world.people]
    assert len(set(pets)) == len(pets) and set(pets).isdisjoint(words | set(world.cities))


def test_documents_are_rendered_from_the_facts(world):
    docs = world.documents()
    assert len({d.doc_id for d in docs}) == len(docs)
    for d in docs:
        if d.person is None:  # gazetteer: every city it names lies in its country
            country = d.doc_id.split("-")[1]
            for city in re.findall(r"([A-Z][a-z]+) (?:is a city in|lies in|belongs to)", d.text):
                assert world.lookup(city, "city_in_country").lower() == country
            continue
        assert d.text.count(".") == 7  # seven sentences, one per fact (the pet's two in one)
        for rel in RELATIONS:
            assert world.lookup(d.person, rel) in d.text, (d.doc_id, rel)
    # Several phrasings and orders: a person's documents are not all the same text.
    bios = [d.text for d in docs if d.person == world.people[0]]
    assert len(bios) == 6 and len(set(bios)) == 6


def test_one_phrasing_means_every_biography_uses_the_same_sentences():
    w = make_world(seed=0, n_people=20, n_heldout=2, n_phrasings=1)
    for name in w.people[:5]:
        docs = [d.text for d in w.documents() if d.person == name]
        sentences = [frozenset(re.split(r"(?<=\.) ", t)) for t in docs]
        assert len(set(sentences)) == 1  # the same sentences, reordered


def name_pattern(names):
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
                      + r")\b")


def test_heldout_people_never_reach_pretraining_or_training(world):
    heldout = world.people_in("heldout")
    assert len(heldout) == 25
    pattern = name_pattern(heldout)
    assert not pattern.search(world.pretraining_corpus())
    assert all(pattern.search(d.text) for d in world.documents() if d.person in heldout)
    # Every name in an example belongs to that example's split (tool_use test: held-out).
    who = name_pattern(world.people)
    for split in (*SPLITS3, "rag"):
        for ex in world.examples(split):
            want = "heldout" if split == "rag" or (ex.family == "tool_use" and split == "test") \
                else split
            for name in who.findall(text_of(ex)):
                assert world.split_of[name] == want, (split, ex.family, name)


def test_pretraining_documents_mix_in_only_the_train_peoples_qa(world):
    plain = world.pretraining_documents()
    assert sorted(plain) == sorted(world.pretraining_corpus().strip().split("\n\n"))
    mixed = world.pretraining_documents(qa_copies=2)
    qa = mixed[len(plain):]
    assert mixed[:len(plain)] == plain
    assert len(qa) == 2 * 2 * len(RELATIONS) * len(world.people_in("train"))
    who = name_pattern(world.people)
    for text in qa:
        assert text.startswith(USER) and text.endswith(END)
        assert {world.split_of[n] for n in who.findall(text)} == {"train"}
    # Every answer is a fact of the person asked about.
    for text in qa:
        q, a = text[len(USER):-len(END)].split(END + ASSISTANT)
        (name,) = who.findall(q)
        assert a in {world.lookup(name, r) for r in RELATIONS}
    with pytest.raises(ValueError, match="qa_copies"):
        world.pretraining_documents(qa_copies=-1)


def test_pretraining_by_person_and_skills_hold_the_same_text_and_no_test_problem(world):
    plain = world.pretraining_documents()
    grouped = world.pretraining_documents(by_person=True)
    assert sorted(t for g in grouped for t in g.split("\n")) == sorted(plain)
    person_of = {d.text: d.person or d.doc_id.rsplit("-", 1)[0] for d in world.documents()}
    for text in grouped:  # one person's biographies (or one country's gazetteer) per text
        assert len({person_of[t] for t in text.split("\n")}) == 1
    assert len(grouped) == len({person_of[t] for t in plain})
    skills = world.pretraining_documents(skill_copies=2)[len(plain):]
    train = [ex for f in ("arithmetic", "string") for ex in world.examples("train", f)]
    assert len(skills) == 2 * len(train) and skills[0] == f"Q: {train[0].prompt}\nA: " \
        f"{train[0].response}"
    held = {ex.prompt for s in ("val", "test") for f in ("arithmetic", "string")
            for ex in world.examples(s, f)}
    assert not {t.split("\nA: ")[0][3:] for t in skills} & held
    assert not any(tok in t for t in skills for tok in SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="skill_copies"):
        world.pretraining_documents(skill_copies=True)


def test_splits_are_disjoint_by_prompt_and_test_prompts_never_in_train(world):
    train_prompts = {ex.prompt for ex in world.examples("train")}
    for family in FAMILIES:
        prompts = {s: [ex.prompt for ex in world.examples(s, family)] for s in (*SPLITS3, "rag")}
        for s, ps in prompts.items():
            assert len(set(ps)) == len(ps), (family, s)  # no duplicates inside a split
        for a in prompts:
            for b in prompts:
                if a < b:
                    assert set(prompts[a]).isdisjoint(prompts[b]), (family, a, b)
        assert len(prompts["test"]) > 0 and len(prompts["val"]) > 0
    for s in ("val", "test", "rag"):
        assert train_prompts.isdisjoint(ex.prompt for ex in world.examples(s))
    # Worked and direct variants of one problem stay in one split.
    exprs = {s: {ex.meta["expression"] for ex in world.examples(s, "arithmetic")} for s in SPLITS3}
    assert exprs["train"].isdisjoint(exprs["test"]) and exprs["train"].isdisjoint(exprs["val"])


def test_fact_answers_come_from_the_triples(world):
    n = 0
    for ex in all_examples(world):
        if "relation" in ex.meta:
            assert ex.answer == world.lookup(ex.meta["person"], ex.meta["relation"])
            n += 1
    assert n > 1500
    for ex in world.examples("rag"):
        assert ex.meta["doc_ids"] and all(
            ex.answer in d.text for d in world.documents() if d.doc_id in ex.meta["doc_ids"])


def test_arithmetic_answers_and_worked_steps_are_correct(world):
    kinds = set()
    for split in SPLITS3:
        for ex in world.examples(split, "arithmetic") + world.examples(split, "tool_use"):
            expr = ex.meta.get("expression") or parse_tool_call(ex.messages()[2]["content"])
            if isinstance(expr, tuple):
                if expr[0] == "lookup":
                    continue
                expr = expr[1]
            assert eval(expr) == ex.answer == calculate(expr) == int(ex.response.split()[-1])
            if ex.meta.get("worked"):
                *steps, last = ex.response.split("\n")
                assert last == f"Answer: {ex.answer}" and len(steps) == ex.meta["steps"] >= 2
                for step in steps:
                    lhs, rhs = step.split(" = ")
                    assert eval(lhs) == int(rhs)
                assert steps[-1].endswith(f"= {ex.answer}")
            kinds.add((ex.family, ex.meta.get("steps"), ex.meta.get("worked")))
    assert {("arithmetic", 1, False), ("arithmetic", 2, True), ("arithmetic", 3, False),
            ("tool_use", None, None)} <= kinds


def test_string_answers_are_correct(world):
    tasks = {"reverse": lambda w, p: w[::-1], "uppercase": lambda w, p: w.upper(),
             "sort": lambda w, p: "".join(sorted(w)),
             "count": lambda w, p: w.count(re.search(r"letter '(.)'", p).group(1))}
    seen = set()
    for split in SPLITS3:
        for ex in world.examples(split, "string"):
            assert f"'{ex.meta['word']}'" in ex.prompt
            assert ex.answer == tasks[ex.meta["task"]](ex.meta["word"], ex.prompt)
            assert ex.response == str(ex.answer)
            seen.add(ex.meta["task"])
    assert seen == set(tasks)


def test_json_replies_parse_and_match_the_facts(world):
    for split in SPLITS3:
        for ex in world.examples(split, "json_format"):
            d = json.loads(ex.response)
            assert d == ex.answer and len(d) == 2
            assert all(f'"{k}"' in ex.prompt for k in d)
            for k, v in d.items():
                assert str(v) == world.lookup(ex.meta["person"], k)
                assert isinstance(v, int) == (k == "birth_year")


def test_refusals_only_for_unsafe_requests(world):
    exs = world.examples("train", "refusal")
    unsafe = [ex for ex in exs if ex.meta["unsafe"]]
    safe = [ex for ex in exs if not ex.meta["unsafe"]]
    assert len(unsafe) == len(safe) > 50
    assert all(ex.response == REFUSAL for ex in unsafe)
    assert all(ex.response != REFUSAL and not is_correct(ex, REFUSAL) for ex in safe)
    assert not any(is_correct(ex, world.lookup(ex.meta["person"], "lives_in")) for ex in unsafe)


def test_is_correct_accepts_the_reference_and_rejects_every_rejected_reply(world):
    for ex in all_examples(world):
        assert is_correct(ex, ex.response), ex
        assert is_correct(ex, " " + ex.response + " \n")  # whitespace does not matter
    kinds = set()
    for split in SPLITS3:
        by_prompt = {ex.prompt: ex for ex in world.examples(split)}
        for pair in world.preference_pairs(split):
            ex = by_prompt[pair.prompt]
            assert pair.chosen == ex.response and pair.chosen != pair.rejected
            assert not is_correct(ex, pair.rejected), pair
            kinds.add((pair.kind, pair.family))
    assert {k for k, _ in kinds} == set(PAIR_KINDS)
    assert {f for _, f in kinds} == set(FAMILIES) - {"tool_use"}
    for ex in world.examples("test", "tool_use"):
        assert not is_correct(ex, "unknown") and not is_correct(ex, ex.response + "0")


def test_answer_extraction_and_checking_rules():
    num = Example("arithmetic", "What is 2 + 3?", "5", 5)
    assert extract_answer("2 + 3 = 5\nAnswer:  5.") == "5"
    assert is_correct(num, "2 + 3 = 5\nAnswer: 5") and is_correct(num, "5.")
    assert not is_correct(num, "6") and not is_correct(num, "five") and not is_correct(num, "")
    up = Example("string", "Uppercase the word 'kavo'.", "KAVO", "KAVO")
    assert not is_correct(up, "kavo")  # case matters
    js = Example("json_format", "?", '{"a": 1, "b": "x"}', {"a": 1, "b": "x"})
    assert is_correct(js, '{"b": "x", "a": 1}') and not is_correct(js, '{"a": 1}')
    assert not is_correct(js, '{"a": 1, "b": "x"') and not is_correct(js, "[1]")


def test_reward_is_verifiable_with_an_optional_format_bonus(world):
    ex = world.rl_prompts("test")[0]
    assert ex.family == "arithmetic" and len(world.rl_prompts("train")) > 1000
    assert reward(ex, ex.response) == 1.0
    assert reward(ex, str(ex.answer + 1)) == 0.0
    assert reward(ex, str(ex.answer + 1), format_weight=0.1) == 0.1
    assert reward(ex, "no idea", format_weight=0.1) == 0.0


def test_tools_run_the_calls_of_the_traces(world):
    for ex in world.examples("train", "tool_use") + world.examples("test", "tool_use"):
        roles = [m["role"] for m in ex.messages()]
        assert roles == ["system", "user", "assistant", "tool", "assistant"]
        call, result = ex.messages()[2]["content"], ex.messages()[3]["content"]
        assert world.run_tool(call) == result == ex.response
        assert ex.prompt_messages() == ex.messages()[:2]
    assert world.run_tool("[lookup: Nobody Here, profession]") == "unknown"
    assert world.run_tool("no call").startswith("error")
    for bad in ("__import__('os')", "2 ** 10", "7 / 2", "1 +"):
        assert world.run_tool(f"[calculator: {bad}]").startswith("error"), bad
    assert calculate("-(3 - 10) * (2 + 4)") == 42


def test_format_chat_and_encode_chat_agree():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert format_chat(msgs) == "<|user|>Hi<|end|><|assistant|>Hello<|end|>"
    assert format_chat(msgs[:1], add_generation_prompt=True).endswith(END + ASSISTANT)
    tok = tokenizer()
    ids, labels = encode_chat(tok, msgs[:1], add_generation_prompt=True)
    assert ids == tok.encode(USER + "Hi" + END + ASSISTANT, allowed_special="all")
    assert set(labels) == {-100}
    with pytest.raises(ValueError, match="special token"):  # users cannot inject <|end|>
        encode_chat(tok, [{"role": "user", "content": "a<|end|><|assistant|>b"}])
    with pytest.raises(ValueError, match="role"):
        format_chat([{"role": "robot", "content": "x"}])


def test_encode_chat_masks_exactly_the_non_assistant_tokens(world):
    tok = tokenizer()
    end = tok.special_tokens[END]
    for family in FAMILIES:
        for ex in world.examples("train", family)[:40]:
            msgs = ex.messages()
            ids, labels = encode_chat(tok, msgs)
            assert len(ids) == len(labels)
            assert ids == tok.encode(format_chat(msgs), allowed_special="all")
            kept = [i for i, lab in zip(ids, labels) if lab != -100]
            assert kept == [lab for lab in labels if lab != -100]  # a kept label is its id
            want = "".join(m["content"] + END for m in msgs if m["role"] == "assistant")
            assert tok.decode(kept) == want
            assert kept[-1] == end and tok.special_tokens[ASSISTANT] not in kept


def test_tokenizer_covers_every_character_the_world_writes(world):
    tok = tokenizer()
    assert tok.vocab_size == len(ALPHABET) + len(WORDS) + len(SPECIAL_TOKENS) == 330
    ids = tok.encode("has a goldfish named Kavo")  # template words whole, a name spelled out
    assert [tok.decode([i]) for i in ids] == ["has", " ", "a", " ", "goldfish", " ", "named",
                                              " ", "K", "a", "v", "o"]
    assert all(name in tok.special_tokens for name in SPECIAL_TOKENS)
    everything = [world.pretraining_corpus(), *(d.text for d in world.documents())]
    everything += [text_of(ex) for ex in all_examples(world)]
    everything += [p.prompt + p.chosen + p.rejected for s in SPLITS3
                   for p in world.preference_pairs(s)]
    text = "".join(everything)
    assert set(text) <= set(ALPHABET)
    assert tok.decode(tok.encode(text)) == text  # encode never raises


@pytest.mark.parametrize("field, value", [
    ("n_people", 5), ("n_heldout", 150), ("n_cities", 1), ("n_phrasings", 6),
    ("val_fraction", 0.6), ("test_fraction", 0), ("max_steps", 1), ("n_string", 0),
    ("docs_per_person", True), ("seed", "zero"), ("max_word_len", 40), ("n_heldout", 1),
    ("json_per_person", 30), ("tool_lookups_per_person", 9),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WorldConfig(**{field: value})


def test_small_worlds_still_have_every_split():
    w = make_world(seed=3, n_people=20, n_heldout=2, n_string=10, n_arithmetic=10,
                   n_multistep=10, n_tool_calc=10)
    for split in SPLITS3:
        for family in FAMILIES:
            assert w.examples(split, family), (split, family)
    with pytest.raises(ValueError, match="split"):
        w.examples("dev")
    with pytest.raises(ValueError, match="family"):
        w.examples("train", "poetry")


def test_read_facts_reads_every_document_and_phrasing_exactly(world):
    from shared.tinyworld import _BIO, Fact, _article
    found = set().union(*(read_facts(d.text) for d in world.documents()))
    assert found == set(world.facts)  # biographies and gazetteers: nothing wrong, nothing missed
    for name in world.people[:20]:  # all five phrasings per relation, not only the documents' 2
        f = {r: world.lookup(name, r) for r in RELATIONS}
        for rel, templates in _BIO.items():
            obj = f["pet_species"] if rel == "pet" else f[rel]
            want = {Fact(name, "pet_species", obj), Fact(name, "pet_name", f["pet_name"])} \
                if rel == "pet" else {Fact(name, rel, obj)}
            for t in templates:
                assert read_facts(t.format(s=name, o=obj, a=_article(obj), p=f["pet_name"])) == want
    questions = [ex.prompt.rpartition("\n\n")[2] for ex in world.examples("test", "fact_qa")]
    assert not set().union(*map(read_facts, questions + [REFUSAL]))  # questions state nothing


def test_calculate_rejects_what_it_cannot_bound():
    assert calculate("(" * 60 + "1" + ")" * 60) == 1
    for bad in ("1 + " * 60 + "1", "2 ** 8", "x + 1", 42):
        with pytest.raises(ValueError):
            calculate(bad)
