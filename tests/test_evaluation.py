"""shared.evaluation against its references.

BLEU equals sacrebleu (corpus and sentence, to 1e-6), ROUGE equals rouge-score (to 1e-9),
on hand-picked pairs and on random ones (hypothesis). Loss, perplexity and bits per byte
equal a direct per-token computation; multiple-choice log-likelihoods equal a loop that
scores one token per forward pass.
"""

import math

import pytest
import sacrebleu
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from shared import evaluation as ev
from shared import zoo
from shared.model import GPT, GPTConfig
from shared.tokenizers import CharTokenizer, RegexBPETokenizer

# (hypothesis, reference) pairs: punctuation, numbers, case, no overlap, short, empty-ish.
PAIRS = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("A fast brown fox jumps over the lazy dog!", "The quick brown fox jumps over the lazy dog."),
    ("It costs $3.50, i.e. 3,000 cents?", "It costs 3.50 dollars - 3,000 cents."),
    ("completely unrelated words here", "nothing in common with that"),
    ("Hi", "Hi there, how are you today?"),
    ("to be or not to be", "To be, or not to be: that is the question."),
    ("\"Quoted\" text & an ampersand; (parens) [brackets] {braces}", "Quoted text and parens"),
    ("Whether 'tis nobler in the mind to suffer", "Whether 'tis nobler in the mind to suffer"),
    ("the the the the the the", "the cat"),
    ("Numbers 1-2 and 10-20 and 3.14", "Numbers 1 - 2 and 10-20, 3.14"),
    ("Ünïcödé wörds, café naïve", "Unicode words, cafe naive"),
    ("trailing spaces   ", "trailing spaces"),
]
HYPS = [h for h, _ in PAIRS]
REFS = [r for _, r in PAIRS]


def test_tokenize_13a_equals_sacrebleu():
    tok = Tokenizer13a()
    lines = HYPS + REFS + ["a-\nb &quot;x&quot; &lt;y&gt; &amp; <skipped> z", "3.5-4, 1,000."]
    for line in lines:
        assert ev.tokenize_13a(line) == tok(line.rstrip()).split(), line


def _assert_same_bleu(ours, ref):
    assert ours.score == pytest.approx(ref.score, abs=1e-6)
    assert (ours.counts, ours.totals) == (list(ref.counts), list(ref.totals))
    assert (ours.sys_len, ours.ref_len) == (ref.sys_len, ref.ref_len)
    assert ours.bp == pytest.approx(ref.bp, abs=1e-12)
    assert ours.precisions == pytest.approx(list(ref.precisions), abs=1e-9)


def test_corpus_bleu_equals_sacrebleu():
    _assert_same_bleu(ev.corpus_bleu(HYPS, [REFS]), sacrebleu.corpus_bleu(HYPS, [REFS]))
    ours = ev.corpus_bleu(HYPS, [REFS], smooth="none")
    _assert_same_bleu(ours, sacrebleu.corpus_bleu(HYPS, [REFS], smooth_method="none"))
    assert 0 < ev.corpus_bleu(HYPS, [REFS]).score < 100


def test_corpus_bleu_multiple_references():
    refs2 = [r.upper() if i % 2 else h for i, (h, r) in enumerate(PAIRS)]  # some exact
    refs3 = ["The cat sat on a mat"] * len(PAIRS)
    streams = [REFS, refs2, refs3]
    _assert_same_bleu(ev.corpus_bleu(HYPS, streams), sacrebleu.corpus_bleu(HYPS, streams))


@pytest.mark.parametrize("hyp,ref", PAIRS)
def test_sentence_bleu_equals_sacrebleu(hyp, ref):
    _assert_same_bleu(ev.sentence_bleu(hyp, [ref]), sacrebleu.sentence_bleu(hyp, [ref]))


def test_bleu_edge_cases():
    assert ev.corpus_bleu(["a b c d e"], [["a b c d e"]]).score == pytest.approx(100.0)
    assert ev.corpus_bleu(["x y z"], [["a b c"]]).score == 0.0  # no match at all
    short = ev.corpus_bleu(["the cat"], [["the cat sat on the mat"]])
    assert short.bp == pytest.approx(math.exp(1 - 6 / 2))
    _assert_same_bleu(short, sacrebleu.corpus_bleu(["the cat"], [["the cat sat on the mat"]]))


words = st.lists(st.sampled_from("the a cat dog sat on mat , . ! 3.5 Be be".split()),
                 min_size=0, max_size=12).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(words, words, words), min_size=1, max_size=5))
def test_bleu_and_rouge_random_pairs(triples):
    hyps = [h for h, _, _ in triples]
    streams = [[r for _, r, _ in triples], [r for _, _, r in triples]]
    _assert_same_bleu(ev.corpus_bleu(hyps, streams), sacrebleu.corpus_bleu(hyps, streams))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for h, r, _ in triples:
        _assert_same_rouge(ev.rouge(r, h), scorer.score(r, h))


def test_bleu_validates_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        ev.corpus_bleu([], [[]])
    with pytest.raises(ValueError, match="reference streams"):
        ev.corpus_bleu(["a"], ["a"])  # a flat list of strings, not a list of streams
    with pytest.raises(ValueError, match="stream 0 has 1 lines but there are 2"):
        ev.corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="smooth"):
        ev.corpus_bleu(["a"], [["a"]], smooth="floor")


def _assert_same_rouge(ours, ref):
    for key in ("rouge1", "rouge2", "rougeL"):
        for field in ("precision", "recall", "fmeasure"):
            assert getattr(ours[key], field) == pytest.approx(getattr(ref[key], field),
                                                              abs=1e-9), (key, field)


def test_rouge_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for hyp, ref in PAIRS + [("", "something"), ("!!!", "...")]:
        _assert_same_rouge(ev.rouge(ref, hyp), scorer.score(ref, hyp))
        assert ev.rouge_tokenize(hyp) == scorer._tokenizer.tokenize(hyp)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ev.rouge_n("a", "a", 0)


def test_lcs_length():
    assert ev.lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example
    assert ev.lcs_length([], ["a"]) == 0


# --------------------------------------------------------------------------------------
# Loss, perplexity, bits per byte
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16,
                    positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    return GPT(cfg).eval()


def test_loss_and_perplexity_equal_a_direct_computation(tiny):
    ids = torch.randint(0, 13, (8 * 7 + 5,), generator=torch.Generator().manual_seed(1))
    total, count = ev.nll(tiny, ids, batch_tokens=24)  # 3 windows per batch: a ragged last one
    assert count == 8 * 7
    direct = 0.0
    with torch.no_grad():
        for w in range(7):
            x = ids[w * 8:(w + 1) * 8]
            logp = F.log_softmax(tiny(x[None])[0][0], dim=-1)  # (8, V)
            direct -= logp[torch.arange(8), ids[w * 8 + 1:(w + 1) * 8 + 1]].sum().item()
    assert total == pytest.approx(direct, rel=1e-6)
    loss = ev.mean_loss(tiny, ids)
    assert loss == pytest.approx(direct / count, rel=1e-6)
    assert ev.perplexity(loss) == pytest.approx(math.exp(direct / count), rel=1e-6)
    # zoo.val_loss is the same function, and agrees with the model's own mean loss
    x, y = ids[:56].view(7, 8), ids[1:57].view(7, 8)
    assert zoo.val_loss(tiny, ids) == pytest.approx(tiny(x, y)[1].item(), rel=1e-5)
    tiny.train()
    ev.mean_loss(tiny, ids)
    assert tiny.training  # mode restored
    tiny.eval()


def test_nll_validates_inputs(tiny):
    with pytest.raises(ValueError, match="at least block_size"):
        ev.nll(tiny, torch.arange(8))
    with pytest.raises(ValueError, match="1-D"):
        ev.nll(tiny, torch.zeros(2, 20, dtype=torch.long))


class Uniform(nn.Module):
    """Every next byte equally likely: logits all zero over 256 byte values."""

    def __init__(self, block_size=16):
        super().__init__()
        self.config = GPTConfig(vocab_size=256, block_size=block_size, n_layer=1, n_head=1,
                                n_embd=8)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, 256) + 0 * self.dummy, None


def test_bits_per_byte_of_a_uniform_byte_model_is_8():
    text = "Ünïcödé and ASCII, " * 20
    ids = torch.tensor(list(text.encode("utf-8")))
    total, count = ev.nll(Uniform(), ids)
    assert total / count == pytest.approx(math.log(256), rel=1e-6)
    assert ev.bits_per_byte(total, count) == pytest.approx(8.0, rel=1e-6)
    assert ev.perplexity(total / count) == pytest.approx(256.0, rel=1e-5)
    with pytest.raises(ValueError, match="n_bytes"):
        ev.bits_per_byte(1.0, 0)


# --------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------

TEXT = "abcdefghij klmnop\nqrstuv wxyz,.!"


def _direct_loglik(model, ctx, cont, T):
    """One forward pass per continuation token. The row is cut once at its left, as the
    harness does, so every window starts at the same place: full[start:k] predicts full[k]."""
    full, total = ctx + cont, 0.0
    start = max(0, len(full) - 1 - T)
    with torch.no_grad():
        for k in range(len(ctx), len(full)):
            window = full[start:k]
            logp = F.log_softmax(model(torch.tensor([window]))[0][0, -1], dim=-1)
            total += logp[full[k]].item()
    return total


def test_multiple_choice_equals_a_direct_loop():
    torch.manual_seed(0)
    tok = CharTokenizer.train(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=12, n_layer=2, n_head=2, n_embd=16,
                    positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = GPT(cfg).eval()
    items = [
        ev.MultipleChoice("abc", ("def", "xyz", "d"), 0),
        ev.MultipleChoice("klmnop\nqrstuv wxyz", (",.!", "a", "bcdefghij k"), 2),  # cut left
        ev.MultipleChoice("z ", ("abcdefghijk", "qr"), 1),  # " abcdefghijk" fills the window
    ]
    res = ev.score_multiple_choice(model, tok, items, batch_size=2)
    for it, lls in zip(items, res.loglik):
        for c, ll in zip(it.choices, lls):
            ctx, cont = ev.encode_pair(tok, it.context, c)
            assert ll == pytest.approx(_direct_loglik(model, ctx, cont, 12), abs=1e-5)
    pred = [max(range(len(ll)), key=ll.__getitem__) for ll in res.loglik]
    norm = [max(range(len(ll)), key=lambda i, ll=ll, it=it: ll[i] / len(it.choices[i]))
            for ll, it in zip(res.loglik, items)]
    assert res.pred == pred and res.pred_norm == norm
    assert res.acc == sum(p == it.gold for p, it in zip(pred, items)) / 3
    assert res.acc_norm == sum(p == it.gold for p, it in zip(norm, items)) / 3


def test_multiple_choice_batching_does_not_change_scores(tiny):
    tok = CharTokenizer("abcdefghijklm")
    items = [ev.MultipleChoice("abcab"[: 1 + i % 5], ("ab", "cdefg", "m"), i % 3)
             for i in range(10)]
    one = ev.score_multiple_choice(tiny, tok, items, batch_size=1).loglik
    many = ev.score_multiple_choice(tiny, tok, items, batch_size=7).loglik
    assert torch.allclose(torch.tensor(one), torch.tensor(many), atol=1e-5)


def test_encode_pair_follows_the_harness():
    tok = RegexBPETokenizer.from_tiktoken("cl100k_base")
    ctx, cont = ev.encode_pair(tok, "Question: to be or not to be ", "that is")
    # the trailing space moves to the continuation, where BPE makes " that" one token
    assert ctx == tok.encode("Question: to be or not to be")
    assert cont == tok.encode(" that is") and tok.decode(cont) == " that is"


def test_multiple_choice_validates_inputs(tiny):
    with pytest.raises(ValueError, match="context"):
        ev.MultipleChoice("", ("a", "b"), 0)
    with pytest.raises(ValueError, match="choices"):
        ev.MultipleChoice("x", ("a",), 0)
    with pytest.raises(ValueError, match="gold"):
        ev.MultipleChoice("x", ("a", "b"), 2)
    with pytest.raises(ValueError, match="non-empty"):
        ev.score_multiple_choice(tiny, CharTokenizer("ab"), [])
    with pytest.raises(ValueError, match="does not fit"):
        ev.loglikelihoods(tiny, [([1], list(range(9)))])
