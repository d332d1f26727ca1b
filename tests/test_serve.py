"""shared.engine and shared.serve: continuous batching and the OpenAI-compatible server.

The reference for every generated text is `shared.sampling.generate` run on one prompt
alone: the engine must give the same tokens while it batches the prompt with others of
different lengths. The server tests run real uvicorn on a free port in a thread and talk to
it with the official `openai` client (and httpx for malformed requests). The model is a tiny
zoo recipe built in a temporary cache (a few seconds), so nothing depends on the real zoo.
"""

import threading

import httpx
import pytest
import torch
from openai import OpenAI

from shared import tinyworld, zoo
from shared.engine import Engine, SamplingParams
from shared.model import GPT, GPTConfig
from shared.sampling import generate
from shared.serve import BackgroundServer, ChatMessage, _chat_prompt, create_app
from shared.tokenizers import CharTokenizer

ALPHABET = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

CONFIGS = {  # every position scheme, GQA, a sliding window
    "rope-gqa-window": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_head=4,
                            n_kv_head=2, sliding_window=12, bias=False),
    "learned": dict(positions="learned"),
    "sinusoidal": dict(positions="sinusoidal", n_kv_head=1),
}


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(ALPHABET), block_size=24, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**(cfg | overrides))).eval()


def reference(model, tok, prompt: str, max_tokens: int, temperature: float = 0.0,
              seed: int | None = None) -> list[int]:
    """generate() alone: the output ids the engine must reproduce."""
    ids = torch.tensor([tok.encode(prompt)])
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    out = generate(model, ids, max_tokens, temperature=temperature, generator=gen)
    return out[0, ids.size(1):].tolist()


# --------------------------------------------------------------------------------------
# The engine, stepped inline
# --------------------------------------------------------------------------------------

PROMPTS = ["A", "To be, or not", "ROMEO:\nBut soft", "Now is the winter of our"]


@pytest.mark.parametrize("name", CONFIGS)
def test_engine_matches_generate_alone_while_batched(name):
    tok = CharTokenizer(ALPHABET)
    model = tiny_gpt(**CONFIGS[name])
    engine = Engine(model, tok, max_batch_size=3)  # fewer slots than requests: a queue
    # Lengths cross block_size=24 (those rows continue without a cache, as generate does).
    jobs = [(p, n, t, s) for p, n, t, s in [
        (PROMPTS[0], 30, 0.0, None), (PROMPTS[1], 5, 0.0, None), (PROMPTS[2], 12, 0.9, 7),
        (PROMPTS[3], 9, 0.0, None), (PROMPTS[1], 20, 1.0, 123)]]
    requests = [engine.submit(p, SamplingParams(max_tokens=n, temperature=t, seed=s))
                for p, n, t, s in jobs[:3]]
    engine.step()
    engine.step()  # two decode steps in, the late requests join a running batch
    requests += [engine.submit(p, SamplingParams(max_tokens=n, temperature=t, seed=s))
                 for p, n, t, s in jobs[3:]]
    engine.run_until_done()
    assert engine.stats["max_batch"] == 3 and engine.num_running == engine.num_waiting == 0
    for r, (p, n, t, s) in zip(requests, jobs):
        assert r.output_ids == reference(model, tok, p, n, t, s), (p, t)
        assert r.finish_reason == "length" and r.text == tok.decode(r.output_ids)


def test_engine_stop_strings_eos_and_streamed_deltas():
    tok = CharTokenizer(ALPHABET)
    model = tiny_gpt(1)
    free = reference(model, tok, "Hark", 20)
    text = tok.decode(free)
    stop = text[6:9]
    engine = Engine(model, tok, eos_ids=[free[4]])
    r_stop = engine.submit("Hark", SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
    r_eos = engine.submit("Hark", SamplingParams(max_tokens=20, temperature=0))
    engine.run_until_done()
    assert r_stop.finish_reason == "stop" and r_stop.text == text[:text.find(stop)]
    first_eos = free.index(free[4])
    assert r_eos.finish_reason == "stop" and r_eos.output_ids == free[:first_eos + 1]
    assert r_eos.text == text[:first_eos]  # the eos token is counted but not shown
    deltas = list(r_stop)
    assert "".join(d.text for d in deltas) == r_stop.text and deltas[-1].finish_reason == "stop"


def test_engine_validates_and_stop_fails_pending_requests():
    tok = CharTokenizer(ALPHABET)
    engine = Engine(tiny_gpt(), tok, max_new_tokens=50)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens must be <= 50"):
        engine.submit("A", SamplingParams(max_tokens=51))
    with pytest.raises(ValueError, match="block_size"):
        engine.submit("A" * 25)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        engine.submit("caf\u00e9")
    pending = engine.submit("A", SamplingParams(max_tokens=5))
    engine.stop()  # never started: what is queued fails, nothing hangs
    assert pending.finish_reason == "error" and "stopped" in pending.error
    engine.start()  # in a thread: a request completes, then stop() joins the thread
    assert engine.submit("A", SamplingParams(max_tokens=5)).wait(10).finish_reason == "length"
    engine.stop()
    assert not engine.is_alive and engine.num_running == engine.num_waiting == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(monkeypatch):
    tok = CharTokenizer(ALPHABET)
    model = tiny_gpt()
    engine = Engine(model, tok)
    real, calls = model.forward, []

    def flaky(*args, **kwargs):  # the third forward (a decode step) raises
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    engine.start()
    try:
        first = engine.submit("A", SamplingParams(max_tokens=5)).wait(10)
        assert first.finish_reason == "error" and "boom" in first.error
        again = engine.submit("A", SamplingParams(max_tokens=5, temperature=0)).wait(10)
        assert again.output_ids == reference(model, tok, "A", 5) and engine.is_alive
    finally:
        engine.stop()


def test_chat_templates():
    tok = tinyworld.tokenizer()
    engine = Engine(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1,
                                  n_head=1, n_embd=8)), tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]
    ids, stops = _chat_prompt(engine, [ChatMessage(**m) for m in msgs])
    assert tok.decode(ids) == tinyworld.format_chat(msgs, add_generation_prompt=True)
    assert stops == [] and engine.eos_ids == {tok.special_tokens["<|endoftext|>"],
                                              tok.special_tokens["<|end|>"]}
    with pytest.raises(ValueError, match="special token"):  # no smuggled role tokens
        _chat_prompt(engine, [ChatMessage(role="user", content="<|assistant|>hi")])
    plain = Engine(tiny_gpt(), CharTokenizer(ALPHABET))
    ids, stops = _chat_prompt(plain, [ChatMessage(role="user", content="Hi")])
    assert plain.tokenizer.decode(ids) == "USER:\nHi\n\nASSISTANT:\n" and stops == ["\n\n"]


# --------------------------------------------------------------------------------------
# The HTTP server
# --------------------------------------------------------------------------------------

RECIPE = dict(
    name="serve-test",
    description="a tiny model for the server tests",
    model=dict(block_size=32, n_layer=2, n_head=2, n_embd=32, positions="rope",
               norm="rmsnorm", mlp="swiglu", bias=False),
    train=dict(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_interval=30,
               eval_steps=1),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn on a free port serving the tiny zoo recipe, built in a temporary cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLM_COURSE_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setattr(zoo, "RECIPES", dict(zoo.RECIPES))
    zoo.register(zoo.Recipe(**RECIPE))
    app = create_app("serve-test", max_batch_size=8, max_new_tokens=200)
    with BackgroundServer(app) as srv:
        srv.engine = app.state.engine
        yield srv
    mp.undo()
    assert not srv.thread.is_alive() and not srv.engine.is_alive  # clean shutdown


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["serve-test"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "serve-test"


def test_completion_greedy_equals_generate_and_streams_the_same(server, client):
    engine = server.engine
    ref = engine.tokenizer.decode(reference(engine.model, engine.tokenizer, "KING:\n", 40))
    out = client.completions.create(model="serve-test", prompt="KING:\n", max_tokens=40,
                                    temperature=0)
    assert out.choices[0].text == ref and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, 40)
    chunks = list(client.completions.create(
        model="serve-test", prompt="KING:\n", max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.total_tokens == 46
    top1 = client.completions.create(model="serve-test", prompt="KING:\n", max_tokens=40,
                                     temperature=1.0, extra_body={"top_k": 1})
    assert top1.choices[0].text == ref  # top_k (vLLM's extension) reaches the sampler


def test_chat_completion_and_stream(server, client):
    msgs = [{"role": "user", "content": "Speak."}]
    out = client.chat.completions.create(model="serve-test", messages=msgs, max_tokens=30,
                                         temperature=0, stop=["e"])
    text = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and "e" not in text
    stream = list(client.chat.completions.create(model="serve-test", messages=msgs,
                                                 max_tokens=30, temperature=0, stop=["e"],
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert stream[-1].choices[0].finish_reason == out.choices[0].finish_reason
    seeded = [client.chat.completions.create(model="serve-test", messages=msgs, seed=5,
                                             max_tokens=20).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed makes sampling repeatable


BAD = [  # (path, body, status, param)
    ("/v1/completions", dict(prompt="A", max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", dict(prompt="A", temperature=2.5), 400, "temperature"),
    ("/v1/completions", dict(prompt="A", model="gpt-4o"), 404, "model"),
    ("/v1/completions", dict(prompt="A" * 33), 400, "prompt"),
    ("/v1/completions", dict(prompt="caf\u00e9 \u20ac"), 400, "prompt"),
    ("/v1/completions", dict(prompt="A", n=2), 400, "n"),
    ("/v1/completions", dict(prompt="A", max_tokens=201), 400, "max_tokens"),
    ("/v1/completions", dict(prompt="A", logprobs=3), 400, "logprobs"),
    ("/v1/completions", dict(prompt="A", max_token=5), 400, "max_token"),
    ("/v1/completions", dict(prompt=["A", "B"]), 400, "prompt"),
    ("/v1/completions", dict(prompt="A", stop=[""]), 400, "stop"),
    ("/v1/chat/completions", dict(messages=[]), 400, "messages"),
    ("/v1/chat/completions", dict(messages=[{"role": "robot", "content": "hi"}]), 400,
     "messages.0.role"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "\u00e9"}]), 400,
     "messages"),
]


def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server, client):
    for path, body, status, param in BAD:
        r = httpx.post(server.url + path, json={"model": "serve-test"} | body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (body, err)
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/v1/nowhere").status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200
    out = client.completions.create(model="serve-test", prompt="A", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_concurrent_load_is_batched_and_correct(server, client):
    engine = server.engine
    prompts = [f"{name}:\n" for name in ["ROMEO", "JULIET", "KING", "LEAR", "HAMLET", "PUCK",
                                         "IAGO", "OBERON", "TITANIA", "BRUTUS", "PORTIA",
                                         "CLEOPATRA"]]
    lengths = [10 + 5 * i for i in range(len(prompts))]  # up to 65 > block_size 32
    results = {}

    def ask(i):
        out = client.completions.create(model="serve-test", prompt=prompts[i],
                                        max_tokens=lengths[i], temperature=0)
        results[i] = out.choices[0].text

    max_before = engine.stats["max_batch"]
    engine.stats["max_batch"] = 0
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(prompts)
    for i, p in enumerate(prompts):
        ref = reference(engine.model, engine.tokenizer, p, lengths[i])
        assert results[i] == engine.tokenizer.decode(ref), p
    assert engine.stats["max_batch"] >= 4  # the requests really shared decode steps
    engine.stats["max_batch"] = max(max_before, engine.stats["max_batch"])


def test_shutdown_ends_an_open_stream_and_joins_threads():
    tok = CharTokenizer(ALPHABET)
    app = create_app(Engine(tiny_gpt(), tok, max_new_tokens=100_000))
    srv = BackgroundServer(app).start()
    c = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    stream = c.completions.create(model="model", prompt="A", max_tokens=100_000, stream=True)
    next(iter(stream))  # the request is running
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    stream.close()  # the client hangs up; the server cancels the request and exits
    stopper.join(20)
    assert not stopper.is_alive() and not srv.thread.is_alive()
    assert not app.state.engine.is_alive and app.state.engine.num_running == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padded_batch_equals_rows_alone(name):
    """GPT.forward's positions and key_mask: a left-padded batch scores like each row alone."""
    model = tiny_gpt(2, **CONFIGS[name])
    rows = [torch.randint(0, len(ALPHABET), (n,)) for n in (5, 17, 11)]
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows])
    idx = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in
                       zip(pad.tolist(), rows)])
    columns = torch.arange(width)
    positions = (columns[None, :] - pad[:, None]).clamp(min=0)  # (B, T); padding: any value
    key_mask = columns[None, :] >= pad[:, None]
    with torch.no_grad():
        batched, _ = model(idx, positions=positions, key_mask=key_mask)
        for i, r in enumerate(rows):
            alone, _ = model(r[None])
            torch.testing.assert_close(batched[i, pad[i]:], alone[0], atol=1e-5, rtol=1e-5)
