"""Chat models on the tiny world: SFT batches with the loss mask, chat generation, evaluation.

Week 4 turns a pretrained `tinyworld-base` into an assistant and later weeks measure it;
they share three pieces:

- `pack_chats`: conversations -> rows of `block_size` token ids and labels, several
  conversations per row (packing), labels -100 on everything but the assistant's replies
  (`shared.tinyworld.encode_chat` makes the mask). Rows are (inputs, targets) pairs already
  shifted, ready for `GPT.forward(idx, targets)`, whose cross-entropy skips -100.
- `chat_generate`: greedy (or sampled) replies to many conversations at once through
  `shared.engine.Engine`, which batches the decoding steps; a reply that calls a tool
  (`[calculator: 3 * 4]`) gets the tool's result as a `tool` turn and the model continues,
  up to `max_tool_calls` times - the agent loop of week 8 in its smallest form.
- `evaluate`: exact-match accuracy per task family on a split (`shared.tinyworld.is_correct`).

Packing puts unrelated conversations into one causal row, so a reply can attend to the
conversation before it. The SFT recipes accept that (as most SFT code does): every
conversation starts with a role token, the model learns to ignore what came before it, and
no row is padding. Left out: per-conversation attention masks (FlashAttention's varlen
kernels, `position_ids` resets), which would remove the cross-talk at some speed cost.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch

from shared.engine import Engine, SamplingParams
from shared.tinyworld import FAMILIES, encode_chat, is_correct, parse_tool_call


def pack_chats(conversations: list[list[dict]], tok, block_size: int,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack conversations into (inputs, targets), each (rows, block_size), dtype long.

    The conversations are shuffled (with `seed`), encoded with the SFT mask and laid end to
    end; the stream is cut into rows of block_size + 1 tokens, each row giving inputs
    row[:-1] and targets labels[1:] (so targets[i] is the token after inputs[i], -100 where
    no loss is due). A conversation longer than block_size + 1 tokens raises ValueError -
    its reply would be cut off; the tail of the stream that does not fill a row is dropped.
    """
    if not conversations:
        raise ValueError("pack_chats needs at least one conversation")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    ids, labels = [], []
    for i in order:
        x, y = encode_chat(tok, conversations[i])
        if len(x) > block_size + 1:
            raise ValueError(f"conversation {i} is {len(x)} tokens, longer than "
                             f"block_size + 1 = {block_size + 1}")
        ids += x
        labels += y
    n = len(ids) // (block_size + 1)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one row of {block_size + 1}")
    ids_t = torch.tensor(ids[:n * (block_size + 1)]).view(n, block_size + 1)
    labels_t = torch.tensor(labels[:n * (block_size + 1)]).view(n, block_size + 1)
    return ids_t[:, :-1].contiguous(), labels_t[:, 1:].contiguous()


def make_get_batch(train_rows: tuple[torch.Tensor, torch.Tensor],
                   val_rows: tuple[torch.Tensor, torch.Tensor]):
    """A `get_batch(split, batch_size, generator)` for `shared.train.train` that draws random
    packed rows (with replacement) from `pack_chats` output."""
    data = {"train": train_rows, "val": val_rows}

    def get_batch(split: str, batch_size: int, generator: torch.Generator):
        x, y = data[split]
        i = torch.randint(len(x), (batch_size,), generator=generator)
        return x[i], y[i]

    return get_batch


def chat_generate(model, tok, conversations: list[list[dict]], max_new_tokens: int = 128,
                  tools=None, max_tool_calls: int = 2, temperature: float = 0.0,
                  seed: int | None = None, max_batch_size: int = 64) -> list[list[dict]]:
    """Continue every conversation with the model's assistant turn; the new turns of each.

    Each result is the list of messages the model added: one assistant message, or, when
    `tools` (an object with `run_tool(text)`, like a `World`) is given and the reply holds a
    tool call, [assistant call, tool result, assistant ...] up to `max_tool_calls` calls.
    A prompt that does not fit the model's context gets an empty assistant reply.
    """
    if max_tool_calls < 0:
        raise ValueError(f"max_tool_calls must be >= 0, got {max_tool_calls}")
    # An offline batch, not a server: every conversation may queue at once.
    engine = Engine(model, tok, max_batch_size=max_batch_size, max_new_tokens=max_new_tokens,
                    max_waiting=max(1024, len(conversations)))
    added: list[list[dict]] = [[] for _ in conversations]
    active = list(range(len(conversations)))
    for round_ in range(max_tool_calls + 1):
        prompts, keep = [], []
        for i in active:
            ids, _ = encode_chat(tok, conversations[i] + added[i], add_generation_prompt=True)
            if len(ids) + 1 > model.config.block_size:
                added[i].append({"role": "assistant", "content": ""})
                continue
            prompts.append(ids)
            keep.append(i)
        params = [SamplingParams(max_tokens=min(max_new_tokens,
                                                model.config.block_size - len(p)),
                                 temperature=temperature,
                                 seed=None if seed is None else seed + 7919 * i + round_)
                  for p, i in zip(prompts, keep)]
        requests = engine.generate(prompts, params) if prompts else []
        active = []
        for i, req in zip(keep, requests):
            added[i].append({"role": "assistant", "content": req.text})
            if tools is not None and round_ < max_tool_calls and parse_tool_call(req.text):
                added[i].append({"role": "tool", "content": tools.run_tool(req.text)})
                active.append(i)
    return added


def final_reply(turns: list[dict]) -> str:
    """The text of the last assistant message among `turns` ('' if there is none)."""
    replies = [m["content"] for m in turns if m["role"] == "assistant"]
    return replies[-1] if replies else ""


def sample_examples(world, split: str, per_family: int | None, seed: int = 0) -> list:
    """Up to `per_family` examples of each family of a split, drawn with `seed` (None: all)."""
    out = []
    for family in FAMILIES:
        exs = world.examples(split, family)
        if per_family is not None and len(exs) > per_family:
            exs = random.Random(f"{seed}-{family}").sample(exs, per_family)
        out += exs
    return out


def evaluate(model, tok, world, split: str = "test", per_family: int | None = 50,
             seed: int = 0, examples: list | None = None, max_new_tokens: int = 128) -> dict:
    """Exact-match accuracy per family (and their unweighted "mean") on a split, greedy.

    Returns {"accuracy": {family: acc, ..., "mean": acc}, "replies": [(example, reply)]}.
    Tool-use prompts run with the world's tools; every other family gets no tools, so a
    model that calls one there is wrong.
    """
    examples = sample_examples(world, split, per_family, seed) if examples is None else examples
    tool_ix = [i for i, ex in enumerate(examples) if ex.family == "tool_use"]
    plain_ix = [i for i, ex in enumerate(examples) if ex.family != "tool_use"]
    replies = [""] * len(examples)
    for ix, tools in ((plain_ix, None), (tool_ix, world)):
        turns = chat_generate(model, tok, [examples[i].prompt_messages() for i in ix],
                              max_new_tokens=max_new_tokens, tools=tools)
        for i, t in zip(ix, turns):
            replies[i] = final_reply(t)
    hits = defaultdict(list)
    for ex, reply in zip(examples, replies):
        hits[ex.family].append(is_correct(ex, reply))
    acc = {f: sum(h) / len(h) for f, h in hits.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return {"accuracy": acc, "replies": list(zip(examples, replies))}


@torch.no_grad()
def masked_loss(model, inputs: torch.Tensor, targets: torch.Tensor,
                batch_size: int = 32) -> float:
    """Mean cross-entropy over the targets that are not -100 (the reply tokens), in nats:
    summed over all rows, then divided once - not a mean of per-batch means."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
        logits, _ = model(x)
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no target is scored: every label is -100")
    return total / count
