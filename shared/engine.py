"""A continuous-batching inference engine: many requests, one model, one batch per step.

Static batching waits for a batch of requests, runs them together and returns when the
longest is done, so short requests wait for long ones and new ones wait for the whole batch.
Continuous batching (iteration-level scheduling, Orca: Yu et al. 2022, "Orca: A Distributed
Serving System for Transformer-Based Generative Models", OSDI '22,
https://www.usenix.org/conference/osdi22/presentation/yu) decides again at *every* decoding
step. One `Engine.step()`:

1. admits waiting requests while there is a free slot (`max_batch_size`): each prompt runs
   through the model alone (prefill, a B=1 forward that fills its KV cache) and its first
   token is sampled;
2. runs ONE batched forward for every running sequence: each feeds its last token;
3. samples each row with its own settings (temperature, top-k, top-p, seed) through
   `shared.sampling.sample_next`, streams the new text to the request, and retires the rows
   that are finished (max_tokens, an end-of-text token, a stop string) - their slots are
   free for the next step's admissions.

The batch's rows have different lengths. Their KV caches are stacked into one
`shared.attention.KVCache` padded on the *left*, so every row's newest key is in the last
column and a decoding step appends one column for all rows. The model gets each row's own
position (`GPT.forward(positions=...)`, for RoPE or learned positions) and a key mask that
hides the padding (`key_mask=...`). With left padding a row's real keys are contiguous, so
the causal mask and a sliding window still work in column space. A row that joins with a
longer prompt pads the others further; when rows leave, the columns that are padding for
every remaining row are cut off.

Past the context (a sequence longer than block_size) a row does what
`shared.sampling.generate` does: it leaves the cached batch and each step re-runs its last
block_size tokens without a cache (such rows are batched with each other, all being
block_size long). So a greedy request gives, token for token, the output of
`generate(model, prompt, max_tokens, temperature=0)` run alone (the tests check it while
the engine is busy with other requests), and a seeded sampled one the output of `generate`
with a generator seeded the same way.

The engine runs inline (`step()` / `run_until_done()`, for notebooks and tests) or in a
background thread (`start()` / `stop()`, for `shared.serve`). Requests report through a
callback, called on the engine's thread, or an internal queue (`for delta in request`).

Left out: a paged KV cache with block tables and prefix sharing (vLLM's PagedAttention, Kwon
et al. 2023, https://arxiv.org/abs/2309.06180 - week7/05 builds one), chunked prefill and a
token budget per step (here every admitted prompt is prefilled in full, alone), batched
prefill, preemption and swapping when memory runs out, priorities, speculative decoding,
logprobs, n > 1 and beam search. Subtle: batching changes the matmul shapes, so logits differ
from a lone run in the last float bits; a greedy tie broken differently is possible in
principle, never seen in practice. An MoE model with a `capacity_factor` drops tokens per
batch, so its outputs depend on what it is batched with.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from shared.attention import KVCache
from shared.sampling import sample_next

# End-of-text tokens that finish a request when the tokenizer has them (shared.tinyworld's).
EOS_TOKENS = ("<|endoftext|>", "<|end|>")


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes; checked on construction (ValueError names the field).

    max_tokens: new tokens at most. temperature: 0 = greedy. top_k / top_p: None or 1.0 = off.
    stop: strings that end the output; the text ends before the first one (as OpenAI's API).
    seed: an int makes sampling repeatable, whatever the request is batched with.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        def fail(name, allowed):
            raise ValueError(f"SamplingParams.{name} must be {allowed}, "
                             f"got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "an int >= 1")
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature <= 100:
            fail("temperature", "a float in [0, 100] (0 = greedy)")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            fail("top_p", "a float in (0, 1]")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            fail("top_k", "None or an int >= 1")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, tuple | list) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            fail("stop", "a tuple of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "None or an int")


@dataclass
class Delta:
    """What one step added to a request: new text, new token ids, and whether it finished.

    finish_reason: None while running; "length" (max_tokens), "stop" (an end-of-text token
    or a stop string), "abort" (cancelled) or "error" (see `Request.error`).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request and everything the engine records about it.

    Read `text`, `output_ids` and `finish_reason` after `wait()`, or iterate over the
    request (`for delta in request`) to stream it; with `on_event` given, deltas go to that
    callback (on the engine's thread) instead.
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Delta], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the output text so far (only what is certain: see Engine._emit)
    finish_reason: str | None = None
    error: str | None = None
    # Timestamps (time.perf_counter()): for latency percentiles in the serving notebook.
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_finish: float | None = None

    def __post_init__(self):
        self._done = threading.Event()
        self._queue: queue.Queue[Delta] = queue.Queue()
        self._cancelled = False
        self._generator = None
        if self.params.seed is not None:
            self._generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (finish_reason "abort")."""
        self._cancelled = True

    def wait(self, timeout: float | None = None) -> Request:
        """Block until finished; TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self

    def __iter__(self) -> Iterator[Delta]:
        """Yield the deltas as they come (only without on_event); ends after the last one."""
        if self.on_event is not None:
            raise RuntimeError("this request reports to its on_event callback")
        while True:
            delta = self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return

    def _publish(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.finish_reason, self.t_finish = delta.finish_reason, time.perf_counter()
        if self.on_event is not None:
            self.on_event(delta)
        else:
            self._queue.put(delta)
        if delta.finish_reason is not None:
            self._done.set()


class _Row:
    """Engine-side state of a running request: every id so far and the text sent."""

    def __init__(self, request: Request):
        self.request = request
        self.ids = list(request.prompt_ids)  # prompt + generated
        self.sent = 0  # characters of the output text already published
        self.new_ids: list[int] = []  # ids generated since the last publish


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


class Engine:
    """Serve `model` (a `shared.model.GPT`, put in eval mode) and `tokenizer` to many requests.

    max_batch_size: running sequences at most (the decode batch). max_waiting: queued
    requests at most; `submit` raises `EngineFull` beyond it (the server answers 429).
    max_new_tokens: the largest max_tokens a request may ask for. eos_ids: token ids that
    finish a request (default: the tokenizer's <|endoftext|> and <|end|>, if it has them);
    an eos token counts in `output_ids` but not in the text.
    """

    def __init__(self, model, tokenizer, name: str = "model", max_batch_size: int = 16,
                 max_waiting: int = 1024, max_new_tokens: int = 1024,
                 eos_ids: list[int] | None = None):
        for arg, value in (("max_batch_size", max_batch_size), ("max_waiting", max_waiting),
                           ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.block_size = model.config.block_size
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.max_new_tokens = max_new_tokens
        if eos_ids is None:
            specials = getattr(tokenizer, "special_tokens", {})
            eos_ids = [specials[t] for t in EOS_TOKENS if t in specials]
        self.eos_ids = set(eos_ids)
        self.device = next(model.parameters()).device

        self._lock = threading.Condition()  # guards _waiting and _running_thread state
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []  # cached rows, in the order of the batch cache
        self._cache: KVCache | None = None  # (B, nkv, columns, hs) per layer, left-padded
        self._pad: list[int] = []  # padding columns of each cached row
        self._windowed: list[_Row] = []  # rows past block_size: no cache
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = dict(steps=0, prefill_tokens=0, decode_tokens=0, batch_size_sum=0,
                          max_batch=0)

    # --- public API ---------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._rows) + len(self._windowed)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for `text`; ValueError if it cannot encode it (unknown
        characters, a special-token string), which the server turns into a 400."""
        return self.tokenizer.encode(text)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """ValueError unless 1 <= len(prompt) <= block_size and every id is in the vocab."""
        if not 1 <= len(prompt_ids) <= self.block_size:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; this model takes "
                             f"1 to {self.block_size} (its context, block_size)")
        vocab = self.model.config.vocab_size
        if any(not isinstance(i, int) or not 0 <= i < vocab for i in prompt_ids):
            raise ValueError(f"prompt ids must be ints in [0, {vocab})")

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               on_event: Callable[[Delta], None] | None = None) -> Request:
        """Queue a request (a prompt string or ids) and return it at once."""
        params = SamplingParams() if params is None else params
        if params.max_tokens > self.max_new_tokens:
            raise ValueError(f"max_tokens must be <= {self.max_new_tokens}, "
                             f"got {params.max_tokens}")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids)
        request = Request(ids, params, on_event)
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Submit every prompt, run until all are done (inline, or wait for the thread)."""
        if not isinstance(params, list):
            params = [params] * len(prompts)
        requests = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        if self._thread is None:
            self.run_until_done()
        return [r.wait() for r in requests]

    def run_until_done(self) -> None:
        """Step inline until nothing is waiting or running (no background thread)."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its thread; wait on the requests instead")
        while self.step():
            pass

    def start(self) -> None:
        """Run the scheduler loop in a background (daemon) thread."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and join its thread; unfinished requests end with an error."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the engine thread did not stop within {timeout} s")
            self._thread = None
        self._fail_all("the engine stopped before this request finished")

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the scheduler ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self.num_running:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failing step must not kill the server: fail its rows
                self._fail_all(f"engine error: {type(e).__name__}: {e}", waiting=False)

    @torch.inference_mode()  # grad mode is per thread: set it here, not in the caller
    def step(self) -> bool:
        """One iteration: admit waiting requests, one batched decode step, retire rows.

        Returns False when there was nothing to do.
        """
        self._drop_cancelled()
        admitted = self._admit()
        if not self.num_running:
            return admitted
        self.stats["steps"] += 1
        batch = self.num_running
        self.stats["batch_size_sum"] += batch
        self.stats["max_batch"] = max(self.stats["max_batch"], batch)
        self.stats["decode_tokens"] += batch
        rows, logits = [], []
        if self._rows:
            rows += self._rows
            logits.append(self._decode_cached())
        if self._windowed:
            rows += self._windowed
            window = [r.ids[-self.block_size:] for r in self._windowed]
            out, _ = self.model(torch.tensor(window, device=self.device))
            logits.append(out[:, -1])
        for row, row_logits in zip(rows, torch.cat(logits)):
            self._sample(row, row_logits[None])
        self._retire_and_move()
        return True

    def _admit(self) -> bool:
        """Prefill waiting requests into free slots; True if any was admitted."""
        admitted = False
        while self.num_running < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            admitted = True
            if request._cancelled:
                request._publish(Delta("", [], "abort"))
                continue
            row = _Row(request)
            try:
                cache = self.model.new_cache(1)
                logits, _ = self.model(torch.tensor([row.ids], device=self.device), cache=cache)
                self.stats["prefill_tokens"] += len(row.ids)
                self._sample(row, logits[:, -1])
            except Exception as e:  # this request fails; the others go on
                if request.finish_reason is None:
                    request.error = f"engine error: {type(e).__name__}: {e}"
                    request._publish(Delta("", [], "error"))
                continue
            if row.request.finish_reason is None:
                self._join(row, cache)
        self._retire_and_move()
        return admitted

    def _decode_cached(self) -> torch.Tensor:
        """One batched forward of every cached row's last token -> logits (B, V)."""
        cache = self._cache
        idx = torch.tensor([[r.ids[-1]] for r in self._rows], device=self.device)  # (B, 1)
        # Row i has cache.pos - pad[i] real keys, so its new token sits at that position.
        pad = torch.tensor(self._pad, device=self.device)
        positions = (cache.pos - pad)[:, None]  # (B, 1)
        columns = torch.arange(cache.pos + 1, device=self.device)
        key_mask = columns[None, :] >= pad[:, None]  # (B, columns + 1): True = real key
        logits, _ = self.model(idx, cache=cache, positions=positions, key_mask=key_mask)
        return logits[:, -1]

    def _sample(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the next token of one row (logits (1, V)) and publish what it adds."""
        request, p = row.request, row.request.params
        ids = torch.tensor([row.ids], device=self.device)
        token = int(sample_next(logits, ids, p.temperature, p.top_k, p.top_p,
                                generator=request._generator))
        if request.t_first_token is None:
            request.t_first_token = time.perf_counter()
        row.ids.append(token)
        row.new_ids.append(token)
        request.output_ids.append(token)
        if token in self.eos_ids:
            self._emit(row, "stop", eos=True)
        elif len(request.output_ids) >= p.max_tokens:
            self._emit(row, "length")
        else:
            self._emit(row, None)

    def _emit(self, row: _Row, finish: str | None, eos: bool = False) -> None:
        """Publish the text that is certain now.

        Held back while running: trailing U+FFFD (a byte-level tokenizer's partial UTF-8
        character) and any tail that could be the start of a stop string. A stop string ends
        the request; the text stops before it.
        """
        request = row.request
        ids = request.output_ids[:-1] if eos else request.output_ids
        full = self.tokenizer.decode(ids)
        hits = [i for i in (full.find(s) for s in request.params.stop) if i >= 0]
        if hits:
            full, finish = full[:min(hits)], "stop"
        end = len(full)
        if finish is None:
            end = len(full.rstrip("\ufffd"))
            hold = 0  # the longest tail that is the start of a stop string
            for s in request.params.stop:
                hold = max([hold] + [k for k in range(1, min(len(s), end + 1))
                                     if full[end - k:end] == s[:k]])
            end = max(end - hold, row.sent)
        request.text = full[:end]
        delta = Delta(full[row.sent:end], row.new_ids, finish)
        row.sent, row.new_ids = end, []
        if delta.text or delta.token_ids or finish is not None:
            request._publish(delta)

    # --- the batch cache ----------------------------------------------------------------
    def _join(self, row: _Row, cache: KVCache) -> None:
        """Add a prefilled row (its own B=1 cache) to the left-padded batch cache."""
        if len(row.ids) > self.block_size:  # its next input would not fit: no cache
            self._windowed.append(row)
            return
        if self._cache is None:
            self._cache, self._pad, self._rows = cache, [0], [row]
            return
        big = self._cache
        width = max(big.pos, cache.pos)

        def left_pad(t, n):  # (B, nkv, T, hs) -> (B, nkv, T + n, hs), zeros in front
            return torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t

        for layer in range(len(big.k)):
            big.k[layer] = torch.cat([left_pad(big.k[layer], width - big.pos),
                                      left_pad(cache.k[layer], width - cache.pos)])
            big.v[layer] = torch.cat([left_pad(big.v[layer], width - big.pos),
                                      left_pad(cache.v[layer], width - cache.pos)])
        self._pad = [p + width - big.pos for p in self._pad] + [width - cache.pos]
        big.pos, big.batch_size = width, big.batch_size + 1
        self._rows.append(row)

    def _retire_and_move(self) -> None:
        """Drop finished rows; move rows that outgrew block_size out of the cache."""
        self._windowed = [r for r in self._windowed if r.request.finish_reason is None]
        keep = [i for i, r in enumerate(self._rows) if r.request.finish_reason is None
                and len(r.ids) <= self.block_size]
        self._windowed += [r for r in self._rows if r.request.finish_reason is None
                           and len(r.ids) > self.block_size]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._cache, self._pad, self._rows = None, [], []
            return
        self._cache.reorder(torch.tensor(keep, device=self.device))
        self._rows = [self._rows[i] for i in keep]
        self._pad = [self._pad[i] for i in keep]
        cut = min(self._pad)  # columns that are padding for every remaining row
        if cut:
            c = self._cache
            c.k = [t[:, :, cut:] for t in c.k]
            c.v = [t[:, :, cut:] for t in c.v]
            c.pos -= cut
            self._pad = [p - cut for p in self._pad]

    def _drop_cancelled(self) -> None:
        for row in self._rows + self._windowed:
            if row.request._cancelled and row.request.finish_reason is None:
                row.request._publish(Delta("", [], "abort"))
        self._retire_and_move()

    def _fail_all(self, message: str, waiting: bool = True) -> None:
        """End every running (and waiting) request with an error; empty the batch."""
        pending = []
        if waiting:
            with self._lock:
                pending = list(self._waiting)
                self._waiting.clear()
        for r in pending + [row.request for row in self._rows + self._windowed]:
            if r.finish_reason is None:
                r.error = message
                r._publish(Delta("", [], "error"))
        self._rows, self._windowed, self._cache, self._pad = [], [], None, []


class EngineFull(RuntimeError):
    """More requests are waiting than the engine's max_waiting allows."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""
