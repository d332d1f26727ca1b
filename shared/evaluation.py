"""Evaluating language models: loss, perplexity, bits per byte, BLEU, ROUGE, multiple choice.

- Loss over a whole id stream (`nll`, `mean_loss`): the stream is cut into non-overlapping
  windows of block_size + 1 tokens and every window is scored once - no sampling noise, the
  same number on every run of the same weights. `perplexity = exp(mean loss)`.
- Bits per byte (`bits_per_byte`): total nats / (ln 2 * bytes of the text scored). Unlike
  loss per token it does not depend on the tokenizer, so it compares a character model with
  a BPE model (the Pile and Chinchilla papers report it for that reason).
- BLEU (Papineni et al. 2002, https://aclanthology.org/P02-1040/): clipped n-gram precisions
  (n = 1..4) over the whole corpus, their geometric mean, times a brevity penalty. We match
  sacrebleu (Post 2018, "A Call for Clarity in Reporting BLEU Scores",
  https://arxiv.org/abs/1804.08771) exactly: its default "13a" tokenisation (mteval-v13a, the
  WMT standard) and its default "exp" smoothing (NIST: the k-th zero precision becomes
  1 / (2^k total)). Scores are 0..100, like sacrebleu's.
- ROUGE-N and ROUGE-L (Lin 2004, https://aclanthology.org/W04-1013/): n-gram and
  longest-common-subsequence overlap as precision, recall and F1, matching Google's
  `rouge-score` package (`RougeScorer(..., use_stemmer=False)`), tokeniser included:
  lowercase, every run of characters other than a-z 0-9 becomes a space.
- Multiple choice in the style of EleutherAI's lm-evaluation-harness
  (https://github.com/EleutherAI/lm-evaluation-harness): each choice is scored by the summed
  log-probability of its tokens given the context; `acc` picks the highest sum, `acc_norm`
  the highest sum per character of the choice (the harness's length normalisation).

Left out: sacrebleu's other tokenisers (intl, char, zh, ...), lowercasing and chrF/TER;
ROUGE-Lsum, stemming and bootstrap confidence intervals; the harness's rolling
log-likelihood for texts longer than the context, its generation tasks, its mutual-information
normalisation (`acc_mutual_info`) and few-shot prompt building.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# Loss over an id stream, perplexity, bits per byte
# --------------------------------------------------------------------------------------


@torch.no_grad()
def nll(model, ids: torch.Tensor, block_size: int | None = None,
        batch_tokens: int = 16384) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of tokens scored) over an id stream.

    The stream is cut into n = (len(ids) - 1) // T windows of T + 1 tokens that overlap by
    one (inputs ids[i*T:(i+1)*T], targets shifted by one); the targets scored are
    ids[1 : n*T + 1]. The tail that does not fill a window is left out. `model(x)` must
    return (logits, _), as `shared.model.GPT` does; its train/eval mode is restored after.
    """
    T = block_size or model.config.block_size
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    n = (len(ids) - 1) // T
    if n < 1:
        raise ValueError(f"ids has {len(ids)} tokens; need at least block_size + 1 = {T + 1}")
    rows = max(1, batch_tokens // T)  # windows per forward pass
    x = ids[: n * T].view(n, T)  # (n, T)
    y = ids[1: n * T + 1].view(n, T)  # (n, T), x shifted by one
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, rows):
        logits, _ = model(x[i:i + rows].to(device))  # (b, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + rows].flatten().to(device),
                                 reduction="sum").item()
    model.train(was_training)
    return total, n * T


def mean_loss(model, ids: torch.Tensor, block_size: int | None = None,
              batch_tokens: int = 16384) -> float:
    """Mean next-token loss over the whole stream, in nats per token (see `nll`)."""
    total, count = nll(model, ids, block_size, batch_tokens)
    return total / count


def perplexity(loss: float) -> float:
    """exp(mean loss in nats): the size of a uniform choice that would be as surprised."""
    return math.exp(loss)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Total nats of a text -> bits per UTF-8 byte of that text (tokenizer-independent).

    Subtle: n_bytes must count the bytes of exactly the text whose tokens were scored
    (e.g. `len(tok.decode(targets).encode())`), not of the whole split.
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    return total_nats / (math.log(2) * n_bytes)


# --------------------------------------------------------------------------------------
# BLEU, as sacrebleu computes it
# --------------------------------------------------------------------------------------

# mteval-v13a's rules, applied in order (sacrebleu/tokenizers/tokenizer_re.py).
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # split most punctuation off
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless before a digit ("3.14" stays)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    """sacrebleu's default tokenizer: 'Hello, world!' -> ['Hello', ',', 'world', '!']."""
    line = line.rstrip()  # sacrebleu strips the right end of every segment first
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:  # undo the four XML escapes
        line = (line.replace("&quot;", '"').replace("&amp;", "&")
                .replace("&lt;", "<").replace("&gt;", ">"))
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples) of a token list."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


@dataclass(frozen=True)
class BLEUScore:
    score: float  # 0..100
    precisions: list[float]  # per order, in percent (smoothed where a count was 0)
    bp: float  # brevity penalty
    sys_len: int  # hypothesis tokens
    ref_len: int  # reference tokens (the closest reference per segment)
    counts: list[int]  # clipped matches per order
    totals: list[int]  # hypothesis n-grams per order


def _bleu_stats(hyp: str, refs: Sequence[str], max_n: int) -> list[int]:
    """[hyp_len, ref_len, matches_1..N, totals_1..N] of one segment."""
    h = tokenize_13a(hyp)
    rs = [tokenize_13a(r) for r in refs]
    # Clip each hypothesis n-gram count by its largest count in any one reference.
    ref_max: Counter = Counter()
    for r in rs:
        for n in range(1, max_n + 1):
            ref_max |= ngrams(r, n)  # | keeps the max of the two counts
    # The reference length closest to the hypothesis length (the shorter one on a tie).
    ref_len = min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    counts, totals = [0] * max_n, [0] * max_n
    for n in range(1, max_n + 1):
        for g, c in ngrams(h, n).items():
            totals[n - 1] += c
            counts[n - 1] += min(c, ref_max[g])
    return [len(h), ref_len, *counts, *totals]


def _bleu_from_stats(stats: Sequence[int], max_n: int, smooth: str,
                     effective_order: bool) -> BLEUScore:
    sys_len, ref_len = stats[0], stats[1]
    counts, totals = list(stats[2:2 + max_n]), list(stats[2 + max_n:])
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    precisions = [0.0] * max_n
    if not any(counts):
        return BLEUScore(0.0, precisions, bp, sys_len, ref_len, counts, totals)
    zeros, order = 0, max_n
    for n in range(1, max_n + 1):
        if totals[n - 1] == 0:  # hypotheses too short for n-grams: stop here
            break
        if effective_order:  # sentence BLEU: average only the orders that exist
            order = n
        if counts[n - 1] > 0:
            precisions[n - 1] = 100.0 * counts[n - 1] / totals[n - 1]
        elif smooth == "exp":  # NIST: 1/2, 1/4, 1/8, ... of a match for each zero order
            zeros += 1
            precisions[n - 1] = 100.0 / (2 ** zeros * totals[n - 1])
    if any(p == 0.0 for p in precisions[:order]):  # log 0: the geometric mean is 0
        return BLEUScore(0.0, precisions, bp, sys_len, ref_len, counts, totals)
    score = bp * math.exp(sum(math.log(p) for p in precisions[:order]) / order)
    return BLEUScore(score, precisions, bp, sys_len, ref_len, counts, totals)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                smooth: str = "exp", max_n: int = 4) -> BLEUScore:
    """Corpus BLEU, equal to `sacrebleu.corpus_bleu(hypotheses, references).score`.

    references has sacrebleu's layout: a list of reference *streams*, each as long as
    hypotheses - references[k][i] is the k-th reference of hypothesis i.
    Subtle: statistics are summed over the corpus before the precisions are taken, so corpus
    BLEU is not the mean of sentence BLEUs.
    """
    if isinstance(hypotheses, str) or len(hypotheses) == 0:
        raise ValueError("hypotheses must be a non-empty list of strings")
    if isinstance(references, str) or len(references) == 0 or isinstance(references[0], str):
        raise ValueError("references must be a non-empty list of reference streams "
                         "(lists of strings), e.g. [refs] for one reference per hypothesis")
    for k, stream in enumerate(references):
        if len(stream) != len(hypotheses):
            raise ValueError(f"reference stream {k} has {len(stream)} lines but there are "
                             f"{len(hypotheses)} hypotheses")
    if smooth not in ("exp", "none"):
        raise ValueError(f"smooth must be 'exp' or 'none', got {smooth!r}")
    total = [0] * (2 + 2 * max_n)
    for i, hyp in enumerate(hypotheses):
        seg = _bleu_stats(hyp, [stream[i] for stream in references], max_n)
        total = [a + b for a, b in zip(total, seg)]
    return _bleu_from_stats(total, max_n, smooth, effective_order=False)


def sentence_bleu(hypothesis: str, references: Sequence[str], max_n: int = 4) -> BLEUScore:
    """BLEU of one sentence, equal to `sacrebleu.sentence_bleu(hypothesis, references)`
    ("exp" smoothing and effective order: orders longer than the sentence are skipped)."""
    if isinstance(references, str) or len(references) == 0:
        raise ValueError("references must be a non-empty list of strings")
    stats = _bleu_stats(hypothesis, references, max_n)
    return _bleu_from_stats(stats, max_n, "exp", effective_order=True)


# --------------------------------------------------------------------------------------
# ROUGE, as rouge-score computes it
# --------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's tokenizer: 'Don't STOP!' -> ['don', 't', 'stop'] (ASCII a-z 0-9 only)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


class RougeScore(NamedTuple):  # a named tuple, like rouge-score's Score
    precision: float
    recall: float
    fmeasure: float


def _prf(overlap: int, n_pred: int, n_target: int) -> RougeScore:
    p = overlap / max(n_pred, 1)
    r = overlap / max(n_target, 1)
    return RougeScore(p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)


def rouge_n(target: str, prediction: str, n: int) -> RougeScore:
    """ROUGE-N: clipped n-gram overlap / prediction n-grams (P) and / target n-grams (R)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t, p = ngrams(rouge_tokenize(target), n), ngrams(rouge_tokenize(prediction), n)
    overlap = sum((t & p).values())  # & keeps the min of the two counts
    return _prf(overlap, sum(p.values()), sum(t.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(target: str, prediction: str) -> RougeScore:
    """ROUGE-L: LCS length / prediction length (P) and / target length (R)."""
    t, p = rouge_tokenize(target), rouge_tokenize(prediction)
    if not t or not p:
        return RougeScore(0.0, 0.0, 0.0)
    return _prf(lcs_length(t, p), len(p), len(t))


def rouge(target: str, prediction: str) -> dict[str, RougeScore]:
    """{'rouge1', 'rouge2', 'rougeL'}, like `RougeScorer([...]).score(target, prediction)`.

    Subtle: rouge-score takes the reference (target) first - the opposite of sacrebleu.
    """
    return {"rouge1": rouge_n(target, prediction, 1), "rouge2": rouge_n(target, prediction, 2),
            "rougeL": rouge_l(target, prediction)}


# --------------------------------------------------------------------------------------
# Multiple choice by log-likelihood (lm-evaluation-harness style)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoice:
    """One item: a context, the candidate continuations, the index of the right one.

    The harness puts a target delimiter (" " by default) between context and choice; here the
    strings are joined as given, so put any delimiter into the context or the choices.
    """

    context: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self):
        if not self.context:
            raise ValueError("MultipleChoice.context must be non-empty")
        if len(self.choices) < 2 or any(not c for c in self.choices):
            raise ValueError(f"MultipleChoice.choices must be >= 2 non-empty strings, "
                             f"got {self.choices!r}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"MultipleChoice.gold must be in [0, {len(self.choices)}), "
                             f"got {self.gold}")


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as the harness does.

    Trailing whitespace of the context moves to the continuation, and the continuation's ids
    are the tail of encode(context + continuation) - with BPE, tokens can merge across the seam.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space and context.rstrip():
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = list(tok.encode(context + continuation))
    ctx = list(tok.encode(context))
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]],
                   block_size: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Summed log-probability (nats) of each continuation given its context, (len(requests),).

    Each request is scored in one window of at most block_size tokens: the last block_size
    of context + continuation (minus the final token) - the context is cut on the left when
    it does not fit, as the harness does. Rows are right-padded into batches; causal
    attention keeps the padding from touching the real positions.
    """
    T = block_size or model.config.block_size
    rows, spans = [], []
    for ctx, cont in requests:
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError("every request needs >= 1 context and >= 1 continuation token")
        if len(cont) > T:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit in "
                             f"block_size={T}")
        full = (list(ctx) + list(cont))[-(T + 1):]
        rows.append(full)
        spans.append(len(cont))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(rows), dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):
            x[j, :len(r) - 1] = torch.tensor(r[:-1])
        logp = F.log_softmax(model(x.to(device))[0].float(), dim=-1).cpu()  # (b, width, V)
        for j, r in enumerate(chunk):
            L, n = spans[i + j], len(r) - 1  # continuation length, real positions
            targets = torch.tensor(r[-L:])
            out[i + j] = logp[j, n - L:n].gather(1, targets[:, None]).sum().double()
    model.train(was_training)
    return out


@dataclass(frozen=True)
class MultipleChoiceResult:
    acc: float  # fraction where the highest total log-prob is the gold choice
    acc_norm: float  # ... the highest log-prob per character of the choice
    loglik: list[list[float]]  # per item, per choice: summed log-prob (nats)
    pred: list[int]
    pred_norm: list[int]


def score_multiple_choice(model, tok, items: Sequence[MultipleChoice],
                          block_size: int | None = None,
                          batch_size: int = 64) -> MultipleChoiceResult:
    """acc and acc_norm of a model on multiple-choice items (harness `multiple_choice` tasks).

    Subtle: the raw sum favours short choices (fewer tokens, fewer log-probs to add), which
    is why the harness also reports acc_norm, normalised by the choice's length in characters.
    """
    if len(items) == 0:
        raise ValueError("items must be a non-empty list of MultipleChoice")
    requests = [encode_pair(tok, it.context, c) for it in items for c in it.choices]
    flat = loglikelihoods(model, requests, block_size, batch_size).tolist()
    loglik, pred, pred_norm, k = [], [], [], 0
    for it in items:
        ll = flat[k:k + len(it.choices)]
        k += len(it.choices)
        norm = [v / len(c) for v, c in zip(ll, it.choices)]
        loglik.append(ll)
        pred.append(max(range(len(ll)), key=ll.__getitem__))
        pred_norm.append(max(range(len(norm)), key=norm.__getitem__))
    acc = sum(p == it.gold for p, it in zip(pred, items)) / len(items)
    acc_norm = sum(p == it.gold for p, it in zip(pred_norm, items)) / len(items)
    return MultipleChoiceResult(acc, acc_norm, loglik, pred, pred_norm)
