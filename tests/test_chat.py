"""shared.chat: packed SFT rows and their mask, the masked loss, chat generation with tools,
per-family evaluation."""

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from shared import chat
from shared.model import GPT, GPTConfig
from shared.sampling import generate
from shared.tinyworld import ASSISTANT, END, FAMILIES, encode_chat, make_world, tokenizer


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, n_people=40, n_heldout=4)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def tiny_model(tok, block_size=512):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1,
                         n_head=2, n_embd=32, positions="rope", norm="rmsnorm",
                         mlp="swiglu", bias=False)).eval()


def test_pack_chats_keeps_every_token_in_order_with_shifted_labels(world, tok):
    convs = [ex.messages() for ex in world.examples("train")[::10]]
    x, y = chat.pack_chats(convs, tok, block_size=512, seed=3)
    assert x.shape == y.shape and x.shape[1] == 512 and x.dtype == torch.long
    # Rebuild the stream in pack order: rows are consecutive slices of block_size + 1.
    order = list(range(len(convs)))
    random.Random(3).shuffle(order)
    ids, labels = [], []
    for i in order:
        a, b = encode_chat(tok, convs[i])
        ids += a
        labels += b
    n = x.shape[0]
    stream = torch.tensor(ids[:n * 513]).view(n, 513)
    lab = torch.tensor(labels[:n * 513]).view(n, 513)
    assert torch.equal(x, stream[:, :-1]) and torch.equal(y, lab[:, 1:])
    # A scored target is the next input token; only assistant content and <|end|> are scored.
    scored = y != -100
    assert torch.equal(y[:, :-1][scored[:, :-1]], x[:, 1:][scored[:, :-1]])
    assert tok.special_tokens[ASSISTANT] not in y[scored].tolist()
    assert tok.special_tokens[END] in y[scored].tolist()
    assert 0.05 < scored.float().mean() < 0.9


def test_pack_chats_rejects_what_does_not_fit(world, tok):
    long = world.examples("train", "fact_qa")[0].messages()
    with pytest.raises(ValueError, match="longer than block_size"):
        chat.pack_chats([long], tok, block_size=32)
    with pytest.raises(ValueError, match="at least one"):
        chat.pack_chats([], tok, block_size=32)
    with pytest.raises(ValueError, match="do not fill one row"):
        chat.pack_chats([[{"role": "user", "content": "hi"}]], tok, block_size=500)


def test_prompt_tokens_get_no_gradient(world, tok):
    """The point of the mask: the loss does not depend on the prompt's targets at all."""
    model = tiny_model(tok, block_size=128)
    x, y = chat.pack_chats([ex.messages() for ex in world.examples("train", "arithmetic")],
                           tok, block_size=128)
    x, y = x[:4], y[:4]
    logits, _ = model(x)
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    masked = y == -100
    assert masked.any() and (~masked).any()
    assert logits.grad[masked].abs().max() == 0 and logits.grad[~masked].abs().max() > 0


def test_masked_loss_is_the_mean_over_scored_targets(world, tok):
    model = tiny_model(tok, block_size=64)
    x, y = chat.pack_chats([ex.messages() for ex in world.examples("val", "string")], tok, 64)
    logits, _ = model(x)
    direct = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).item()
    assert chat.masked_loss(model, x, y, batch_size=7) == pytest.approx(direct, rel=1e-5)
    with pytest.raises(ValueError, match="every label is -100"):
        chat.masked_loss(model, x, torch.full_like(y, -100))


def test_get_batch_draws_whole_rows_repeatably(world, tok):
    rows = chat.pack_chats([ex.messages() for ex in world.examples("train", "string")], tok, 64)
    get_batch = chat.make_get_batch(rows, rows)
    a = get_batch("train", 5, torch.Generator().manual_seed(1))
    b = get_batch("train", 5, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and a[0].shape == (5, 64)
    for xr, yr in zip(*a):  # each drawn pair is one packed row, inputs with its targets
        assert any(torch.equal(xr, r) and torch.equal(yr, t) for r, t in zip(*rows))


def test_chat_generate_is_greedy_generate_until_end(world, tok):
    model = tiny_model(tok, block_size=256)
    convs = [ex.prompt_messages() for ex in world.examples("val", "string")[:5]]
    turns = chat.chat_generate(model, tok, convs, max_new_tokens=12)
    end = tok.special_tokens[END]
    for conv, t in zip(convs, turns):
        ids, _ = encode_chat(tok, conv, add_generation_prompt=True)
        out = generate(model, torch.tensor([ids]), 12, temperature=0.0)[0, len(ids):].tolist()
        if end in out:
            out = out[:out.index(end)]
        assert t == [{"role": "assistant", "content": tok.decode(out)}]


def test_chat_generate_takes_more_conversations_than_a_server_queue(world, tok):
    model = tiny_model(tok, block_size=256)
    convs = [ex.prompt_messages() for ex in world.examples("train", "arithmetic")[:1100]]
    assert len(convs) > 1024  # Engine's default max_waiting
    turns = chat.chat_generate(model, tok, convs, max_new_tokens=1, max_batch_size=256)
    assert len(turns) == len(convs) and all(t[0]["role"] == "assistant" for t in turns)


class ScriptedEngine:
    """Stands in for shared.engine.Engine: replies by looking at the prompt's last turn."""

    def __init__(self, model, tok, **kwargs):
        self.tok = tok

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            if text.endswith("Use a tool.<|end|><|assistant|>"):
                reply = "[calculator: 2 * 21]"
            elif "<|tool|>" in text:
                reply = "The result is " + text.rsplit("<|tool|>", 1)[1].split("<|end|>")[0]
            else:
                reply = "no tool"
            out.append(SimpleNamespace(text=reply))
        return out


def test_chat_generate_runs_the_tools_and_continues(monkeypatch, world, tok):
    monkeypatch.setattr(chat, "Engine", ScriptedEngine)
    convs = [[{"role": "user", "content": "Use a tool."}], [{"role": "user", "content": "Hi"}]]
    turns = chat.chat_generate(tiny_model(tok), tok, convs, tools=world)
    assert turns[0] == [{"role": "assistant", "content": "[calculator: 2 * 21]"},
                        {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": "The result is 42"}]
    assert turns[1] == [{"role": "assistant", "content": "no tool"}]
    assert chat.final_reply(turns[0]) == "The result is 42"
    no_tools = chat.chat_generate(tiny_model(tok), tok, convs[:1])  # the call stays unanswered
    assert no_tools == [[{"role": "assistant", "content": "[calculator: 2 * 21]"}]]
    with pytest.raises(ValueError, match="max_tool_calls"):
        chat.chat_generate(tiny_model(tok), tok, convs, max_tool_calls=-1)


def test_evaluate_scores_reference_replies_as_all_correct(monkeypatch, world, tok):
    """With a 'model' that replays the reference conversation, every family scores 1.0; with
    one that answers nonsense, 0.0 - the bookkeeping of evaluate, tools included."""
    examples = chat.sample_examples(world, "test", per_family=6, seed=1)

    def replay(model, tok_, convs, max_new_tokens=128, tools=None, **kw):
        out = []
        for conv in convs:
            ex = next(e for e in examples if e.prompt_messages() == conv)
            msgs = ex.messages()[len(conv):]
            if tools is not None and any(m["role"] == "tool" for m in msgs):
                assert tools.run_tool(msgs[0]["content"]) == msgs[1]["content"]
            out.append(msgs)
        return out

    monkeypatch.setattr(chat, "chat_generate", replay)
    result = chat.evaluate(None, tok, world, examples=examples)
    assert set(result["accuracy"]) == {*FAMILIES, "mean"}
    assert all(v == 1.0 for v in result["accuracy"].values())
    monkeypatch.setattr(chat, "chat_generate",
                        lambda m, t, convs, **kw: [[{"role": "assistant", "content": "?"}]
                                                   for _ in convs])
    assert chat.evaluate(None, tok, world, examples=examples)["accuracy"]["mean"] == 0.0
    assert len(examples) == 6 * len(FAMILIES)
