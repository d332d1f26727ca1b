"""Turning next-token logits into text: greedy, temperature, top-k, top-p, beam search.

Each decoding step runs the same pipeline, in the order Hugging Face's `generate` uses:

    logits -> repetition penalty -> / temperature -> top-k -> top-p -> softmax -> sample

- repetition penalty: CTRL (Keskar et al. 2019, https://arxiv.org/abs/1909.05858, sec. 4.1):
  a token already in the sequence (prompt included) has its logit divided by the penalty if
  positive, multiplied if negative, so it always becomes less likely.
- temperature: T < 1 sharpens, T > 1 flattens; T = 0 means greedy (argmax).
- top-k: keep the k most likely tokens (Fan et al. 2018, https://arxiv.org/abs/1805.04833).
- top-p, "nucleus" sampling: keep the smallest set of most likely tokens whose probability
  reaches p (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751).

`stream` yields one step at a time; `generate` collects what `stream` yields, so both run
one loop (`_decode`) and one step function (`sample_next`). `beam_search` keeps the
`num_beams` most likely partial sequences instead of sampling one.

The KV cache (`shared.attention.KVCache`) is used while the sequence fits in block_size.
Past that, every step re-runs the model on the last block_size tokens - exactly what the
uncached path always does - so cached and uncached generation give the same tokens.
(A rolling-buffer cache that streams past the window is week 7's topic.)

Left out: contrastive search and min-p (the sampling notebook builds them), constrained
decoding (`shared.structured`), speculative decoding and batching of ragged prompts (week 7;
`shared.engine` batches ragged requests).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# One step: logits -> next token
# --------------------------------------------------------------------------------------


def apply_repetition_penalty(
    logits: torch.Tensor, ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty on every token of `ids` (B, T): logits (B, V) -> penalised copy.

    >>> apply_repetition_penalty(torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[0, 1]]), 2.0)
    tensor([[ 1.0000, -2.0000,  0.5000]])
    """
    score = logits.gather(1, ids)  # (B, T): the logit of each token already present
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, ids, score)  # a repeated id just writes the same value again


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with it survive)."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sum reaches p.

    Sorted by probability, a token is kept when the mass *before* it is still below p, so
    the most likely token always survives.
    e.g. probs (0.5, 0.2, 0.15, 0.1, 0.05) and p = 0.6 keep the first two (0.7 >= 0.6).
    """
    probs = F.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # vocab order
    return logits.masked_fill(remove, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-token logits (B, V) and the sequences so far (B, T) -> next ids (B,)."""
    logits = logits.float()  # sample in float32 even from a bf16 model
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, ids, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy: top-k and top-p cannot change the argmax
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------


class _Decoder:
    """Gives next-token logits for a growing batch of sequences, through a cache if it can.

    With a cache only the tokens not yet cached (`ids[:, cache.pos:]`) go through the model:
    the whole prompt on the first call, one token after. Once the sequence outgrows
    block_size the cache is dropped and each call re-runs the last block_size tokens.
    """

    def __init__(self, model, use_cache: bool, batch_size: int):
        self.model = model
        self.block_size = model.config.block_size
        self.cache = model.new_cache(batch_size) if use_cache else None

    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> logits (B, V) for position T."""
        if self.cache is not None and ids.size(1) <= self.block_size:
            logits, _ = self.model(ids[:, self.cache.pos:], cache=self.cache)
        else:
            self.cache = None  # too long for the cache's positions: crop and recompute
            logits, _ = self.model(ids[:, -self.block_size:])
        return logits[:, -1, :]  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def _stop_ids(stop) -> list[int]:
    """None, an id, a list of ids or a tensor of ids -> a list of ints."""
    if stop is None:
        return []
    if isinstance(stop, torch.Tensor):
        stop = stop.tolist()
    items = list(stop) if isinstance(stop, list | tuple | set) else [stop]
    try:  # operator.index accepts Python and NumPy ints, rejects floats and strings
        ids = [operator.index(s) for s in items if not isinstance(s, bool)]
    except TypeError:
        ids = []
    if len(ids) != len(items) or any(i < 0 for i in ids):
        raise ValueError(f"stop must be a token id or a list of token ids, got {stop!r}")
    return ids


def _check_args(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError("idx must be a 2-D long tensor (B, T)")
    if idx.size(1) < 1:
        raise ValueError("idx needs at least one token per row to condition on")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


# (ids (B, T) so far, next-token logits (B, V)) -> the logits to sample from
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()  # on a generator, PyTorch disables grad only while the loop itself runs
def _decode(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
            stop, use_cache, generator, logits_processor=None) -> Iterator[torch.Tensor]:
    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        decoder = _Decoder(model, use_cache, idx.size(0))
        stop = torch.tensor(stop, dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        ids = idx
        for _ in range(max_new_tokens):
            logits = decoder.next_logits(ids)
            if logits_processor is not None:
                logits = logits_processor(ids, logits)
            token = sample_next(logits, ids, temperature, top_k, top_p, repetition_penalty,
                                generator)  # (B,)
            token = torch.where(done, ids[:, -1], token)  # a finished row repeats its stop id
            done |= torch.isin(token, stop)
            ids = torch.cat([ids, token[:, None]], dim=1)
            yield token
            if done.all():
                break
    finally:  # also runs when the caller stops iterating early and the generator is closed
        model.train(was_training)


def stream(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a (B,) long tensor per step (`int(t)` if B == 1).

    Arguments as for `generate`; they are checked now, before the first token. The model
    stays in eval mode until the iterator is exhausted or closed.
    """
    _check_args(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    stop = _stop_ids(stop)
    return _decode(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                   stop, use_cache, generator, logits_processor)


def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> torch.Tensor:
    """Continue each row of idx (B, T) by up to max_new_tokens tokens -> (B, T + n).

    model: a `shared.model.GPT` (anything with `.config.block_size`, `.new_cache(B)` and
    `forward(idx, cache=...) -> (logits, loss)`). temperature=0 is greedy decoding.
    stop: a token id or list of ids. A row that emits one is finished; it keeps repeating
    that id (its padding) while other rows go on, and generation ends early once every row
    has finished, so n <= max_new_tokens. The stop id itself is part of the output.
    generator: a seeded `torch.Generator` makes sampling repeatable.
    logits_processor: (ids (B, T), logits (B, V)) -> logits, applied before sampling at
    every step - e.g. `shared.structured`'s mask of the tokens that keep the output valid.
    The model runs in eval mode under `torch.no_grad()`; its training mode is restored.
    """
    tokens = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p,
                         repetition_penalty, stop, use_cache, generator, logits_processor))
    return torch.cat([idx, *[t[:, None] for t in tokens]], dim=1)


# --------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------


def beam_search(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, float]:
    """The most likely continuation found by keeping `num_beams` candidates per step.

    idx: (1, T) - one prompt; its beams form the batch (batching prompts would add a beam
    dimension to every tensor). Returns (sequence (1, T + n), score), where score is the
    sum of the continuation's token log-probabilities divided by n ** length_penalty
    (n counts the eos token; length_penalty > 0 favours longer outputs, 0 = raw sum).

    A beam that emits eos_id is finished. Search stops at max_new_tokens or as soon as
    num_beams beams have finished (HF's early_stopping=True); still-running beams then
    compete with the finished ones. num_beams=1 is greedy decoding.
    """
    _check_args(idx, max_new_tokens, 1.0, None, None, 1.0)
    if idx.size(0) != 1:
        raise ValueError(f"beam_search takes one prompt (1, T), got batch {idx.size(0)}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if eos_id is not None and (not isinstance(eos_id, int) or eos_id < 0):
        raise ValueError(f"eos_id must be None or a token id, got {eos_id!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _beam_search(model, idx, max_new_tokens, num_beams, length_penalty, eos_id,
                                use_cache)
    finally:
        model.train(was_training)


def _beam_search(model, idx, max_new_tokens, num_beams, length_penalty, eos_id, use_cache):
    if max_new_tokens == 0:
        return idx, 0.0
    ids = idx.repeat(num_beams, 1)  # (nb, T): every beam starts as the prompt
    # Sum of log-probs per beam. The copies start at -inf so that step one expands only
    # beam 0 and does not pick the same first token num_beams times.
    scores = torch.full((num_beams,), float("-inf"), device=idx.device)
    scores[0] = 0.0
    finished: list[tuple[float, torch.Tensor]] = []  # (normalised score, sequence)
    decoder = _Decoder(model, use_cache, num_beams)
    steps = 0
    for step in range(max_new_tokens):
        logp = F.log_softmax(decoder.next_logits(ids).float(), dim=-1)  # (nb, V)
        V = logp.size(-1)
        candidates = (scores[:, None] + logp).view(-1)  # (nb * V) every one-token extension
        # 2 * nb candidates: even if up to nb of them end in eos, nb beams go on.
        top_scores, top_idx = candidates.topk(min(2 * num_beams, candidates.numel()))
        beams, parents, tokens = [], [], []
        for s, i in zip(top_scores.tolist(), top_idx.tolist()):
            parent, token = divmod(i, V)
            if token == eos_id:
                if s > float("-inf"):
                    seq = torch.cat([ids[parent], ids.new_tensor([token])])
                    finished.append((s / (step + 1) ** length_penalty, seq))
            else:
                beams.append(s)
                parents.append(parent)
                tokens.append(token)
            if len(beams) == num_beams:
                break
        steps = step + 1
        if len(finished) >= num_beams:
            break
        parents_t = torch.tensor(parents, device=idx.device)
        ids = torch.cat([ids[parents_t], torch.tensor(tokens, device=idx.device)[:, None]], 1)
        scores = torch.tensor(beams, device=idx.device)
        decoder.reorder(parents_t)  # each beam's cache is now its parent's
    if len(finished) < num_beams:  # ran out of steps: the live beams compete too
        for s, seq in zip(scores.tolist(), ids):
            finished.append((s / steps ** length_penalty, seq))
    score, seq = max(finished, key=lambda f: f[0])
    return seq[None], score
