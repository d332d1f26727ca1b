"""shared.retrieval: chunkers cover their documents, FAISS equals brute-force cosine search,
BM25 equals a hand computation, RRF and the metrics equal hand cases, and the MiniLM
embedder equals sentence-transformers (to 1e-5)."""

import math
import os

import numpy as np
import pytest

from shared import retrieval as R

DOCS = [("a", "The cat sat on the mat. It purred! Did it sleep? Yes."),
        ("b", "One paragraph here.\n\nAnother one, longer than the first.\n  \n\nA third."),
        ("c", "x" * 57),
        ("empty", "")]


# --- chunkers -------------------------------------------------------------------------------
def _covers(chunks, docs):
    """Every non-space character of every document lies in some chunk of that document."""
    for doc_id, text in docs:
        covered = np.zeros(len(text), bool)
        for c in chunks:
            if c.doc_id == doc_id:
                assert text[c.start:c.end] == c.text
                covered[c.start:c.end] = True
        assert all(covered[i] or text[i].isspace() for i in range(len(text))), doc_id


@pytest.mark.parametrize("size,overlap", [(10, 0), (10, 3), (7, 6), (1, 0), (100, 20)])
def test_fixed_chunks_cover_the_text_with_the_given_size_and_overlap(size, overlap):
    chunks = R.chunk_fixed(DOCS, size=size, overlap=overlap)
    _covers(chunks, DOCS)
    for doc_id, text in DOCS:
        mine = [c for c in chunks if c.doc_id == doc_id]
        assert [c.chunk_id for c in mine] == [f"{doc_id}#{k}" for k in range(len(mine))]
        assert all(len(c.text) <= size for c in mine)
        assert all(len(c.text) == size for c in mine[:-1])  # only the last may be shorter
        for prev, nxt in zip(mine, mine[1:]):
            assert nxt.start - prev.start == size - overlap   # the stride
            assert prev.end - nxt.start == overlap            # the shared characters
        if text:
            assert mine[0].start == 0 and mine[-1].end == len(text)
        else:
            assert mine == []


def test_sentence_chunks_group_sentences_with_overlap():
    one = R.chunk_sentences(DOCS[:1], per_chunk=1)
    assert [c.text for c in one] == ["The cat sat on the mat.", "It purred!", "Did it sleep?",
                                     "Yes."]
    two = R.chunk_sentences(DOCS[:1], per_chunk=2, overlap=1)
    assert [c.text for c in two] == ["The cat sat on the mat. It purred!",
                                     "It purred! Did it sleep?", "Did it sleep? Yes."]
    three = R.chunk_sentences(DOCS[:1], per_chunk=3)
    assert [c.text for c in three] == ["The cat sat on the mat. It purred! Did it sleep?", "Yes."]
    for per, ov in [(1, 0), (2, 1), (3, 0), (3, 2), (5, 4)]:
        _covers(R.chunk_sentences(DOCS, per, ov), DOCS)
    assert R.chunk_sentences([("s", "No full stop")], 2, 1)[0].text == "No full stop"


def test_paragraph_chunks_split_on_blank_lines():
    chunks = R.chunk_paragraphs(DOCS)
    assert [c.text for c in chunks if c.doc_id == "b"] == [
        "One paragraph here.", "Another one, longer than the first.", "A third."]
    assert [c.text for c in chunks if c.doc_id == "a"] == [DOCS[0][1]]  # one paragraph: whole
    assert not [c for c in chunks if c.doc_id == "empty"]
    _covers(chunks, DOCS)


@pytest.mark.parametrize("call,match", [
    (lambda: R.chunk_fixed(DOCS, size=0), "size"),
    (lambda: R.chunk_fixed(DOCS, size=5, overlap=5), "overlap"),
    (lambda: R.chunk_fixed(DOCS, size=5, overlap=-1), "overlap"),
    (lambda: R.chunk_sentences(DOCS, per_chunk=0), "per_chunk"),
    (lambda: R.chunk_sentences(DOCS, per_chunk=2, overlap=2), "overlap"),
    (lambda: R.chunk_paragraphs(["just a string"]), "pairs"),
    (lambda: R.chunk_paragraphs([("d", "x"), ("d", "y")]), "distinct"),
])
def test_chunker_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- vector indexes -------------------------------------------------------------------------
def test_faiss_equals_brute_force_on_random_vectors():
    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(2000, 48)), rng.normal(size=(50, 48))
    bf, fa = R.BruteForceIndex(48), R.FaissIndex(48)
    for index in (bf, fa):
        index.add(x[:1200])
        index.add(x[1200:])          # ids continue across add() calls
    assert len(bf) == len(fa) == 2000
    s_bf, i_bf = bf.search(q, k=10)
    s_fa, i_fa = fa.search(q, k=10)
    assert np.array_equal(i_bf, i_fa)
    assert np.abs(s_bf - s_fa).max() < 1e-5
    # The scores are cosines: check one by hand, and that they come best first.
    i = int(i_bf[3, 0])
    cos = x[i] @ q[3] / np.linalg.norm(x[i]) / np.linalg.norm(q[3])
    assert abs(s_bf[3, 0] - cos) < 1e-5
    assert (np.diff(s_bf, axis=1) <= 1e-7).all()
    # Scaling a vector does not change its cosine: normalisation happens inside.
    assert np.array_equal(bf.search(5 * q, k=10)[1], i_bf)


def test_k_is_clamped_to_the_collection_and_bad_input_raises():
    index = R.FaissIndex(3)
    with pytest.raises(ValueError, match="empty"):
        index.search([[1.0, 0, 0]], k=1)
    index.add(np.eye(3))
    assert index.search([[1.0, 0, 0]], k=10)[1].shape == (1, 3)
    for bad, match in [(lambda: index.search([[1.0, 0, 0]], k=0), "k must"),
                       (lambda: index.add(np.ones((2, 4))), r"shape \(n, 3\)"),
                       (lambda: index.add(np.zeros((1, 3))), "zero vector"),
                       (lambda: R.BruteForceIndex(0), "dim")]:
        with pytest.raises(ValueError, match=match):
            bad()


# --- BM25 -----------------------------------------------------------------------------------
def test_bm25_equals_a_hand_computation():
    bm25 = R.BM25(["a b", "a c c", "d"], k1=1.5, b=0.75)
    # "c": N = 3 documents, n = 1 holds it; |d| = 3 tokens, avgdl = (2 + 3 + 1) / 3 = 2.
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    tf, norm = 2, 1.5 * (1 - 0.75 + 0.75 * 3 / 2)
    expected = idf * tf * (1.5 + 1) / (tf + norm)
    assert bm25.scores("c") == pytest.approx([0.0, expected, 0.0], abs=1e-12)
    # "a" is in 2 of 3 documents: Okapi's plain idf would be negative, Lucene's is not.
    assert math.log((3 - 2 + 0.5) / (2 + 0.5)) < 0 < bm25.idf("a")
    # Query terms add up (repeats count), unknown terms add nothing, case does not matter.
    assert bm25.scores("A c zzz") == pytest.approx(bm25.scores("a") + bm25.scores("c"))
    assert bm25.scores("c c") == pytest.approx(2 * bm25.scores("c"))
    hits = bm25.search(["c", "zzz"], k=3)
    assert [h.id for h in hits[0]] == [1] and hits[1] == []   # only positive scores
    # b = 0: no length normalisation, so a repeated term in a long document counts fully.
    assert R.BM25(["a b", "a x y z"], b=0.0).scores("a")[0] == \
        pytest.approx(R.BM25(["a b", "a x y z"], b=0.0).scores("a")[1])


def test_bm25_arguments_are_checked():
    for kwargs, match in [({"k1": -1}, "k1"), ({"b": 1.5}, "b must")]:
        with pytest.raises(ValueError, match=match):
            R.BM25(["a"], **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        R.BM25([])


# --- fusion, reranking, metrics -------------------------------------------------------------
def test_reciprocal_rank_fusion_on_hand_rankings():
    fused = R.reciprocal_rank_fusion([["x", "y", "z"], ["z", "x"], ["w"]], k=60)
    expected = {"x": 1 / 61 + 1 / 62, "y": 1 / 62, "z": 1 / 63 + 1 / 61, "w": 1 / 61}
    assert [i for i, _ in fused] == ["x", "z", "w", "y"]
    assert dict(fused) == pytest.approx(expected)
    assert R.reciprocal_rank_fusion([["x", "y"], ["y", "x"]]) == \
        [("x", 1 / 61 + 1 / 62), ("y", 1 / 62 + 1 / 61)]   # a tie keeps first-met order
    assert len(R.reciprocal_rank_fusion([["x", "y", "z"]], top=2)) == 2
    with pytest.raises(ValueError, match="twice"):
        R.reciprocal_rank_fusion([["x", "x"]])
    with pytest.raises(ValueError, match="k must"):
        R.reciprocal_rank_fusion([["x"]], k=-1)


class _Fixed:
    """A retriever that returns the same ranking for every query."""

    def __init__(self, ids):
        self.ids = ids

    def search(self, queries, k):
        return [[R.Hit(i, 1.0 / (r + 1)) for r, i in enumerate(self.ids[:k])] for _ in queries]


def test_hybrid_retriever_fuses_by_rrf():
    hybrid = R.HybridRetriever([_Fixed([0, 1, 2]), _Fixed([2, 0, 3])], depth=3)
    hits = hybrid.search(["q1", "q2"], k=2)
    assert [h.id for h in hits[0]] == [0, 2] and hits[0] == hits[1]
    assert hits[0][0].score == pytest.approx(1 / 61 + 1 / 62)
    with pytest.raises(ValueError, match="depth"):
        R.HybridRetriever([_Fixed([0])], depth=0)


def test_maxsim_sums_the_best_match_of_each_query_token():
    rng = np.random.default_rng(1)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    q, c1, c2 = unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(5, 8))), np.zeros((0, 8))
    by_hand = sum(max(float(qi @ cj) for cj in c1) for qi in q)
    assert R.maxsim_scores(q, [c1, c2]) == pytest.approx([by_hand, 0.0], abs=1e-6)
    assert R.maxsim_scores(q, [q])[0] == pytest.approx(3.0)   # every token finds itself


def test_recall_and_mrr_on_hand_cases():
    ranked = [[4, 2, 9], [1, 3, 5], [7, 8, 6], [0]]
    relevant = [{9}, {1, 5}, {2}, set()]
    assert R.recall_at_k(ranked, relevant, 1) == 0.25
    assert R.recall_at_k(ranked, relevant, 3) == 0.5
    assert R.mrr(ranked, relevant) == pytest.approx((1 / 3 + 1 + 0 + 0) / 4)
    for bad, match in [(lambda: R.recall_at_k(ranked, relevant[:2], 1), "relevance sets"),
                       (lambda: R.recall_at_k(ranked, relevant, 0), "k must"),
                       (lambda: R.mrr([], []), "no queries")]:
        with pytest.raises(ValueError, match=match):
            bad()


# --- the MiniLM embedder --------------------------------------------------------------------
SENTENCES = ["The king was crowned before the lords.", "A dog chased the ball.",
             "Kalo Brina was born in Dumuklil.", "short", "word " * 400]  # the last is cut


@pytest.mark.slow
def test_embed_equals_sentence_transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer
    ours = R.embed(SENTENCES, batch_size=2)   # batches of unequal lengths: the mask matters
    ref = SentenceTransformer(R.minilm_dir(), device="cpu").encode(SENTENCES)
    assert ours.shape == (5, 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5
    assert np.abs(R.embed(SENTENCES[:1])[0] - ours[0]).max() < 1e-5   # alone == batched
    assert R.load_minilm() is R.load_minilm()                         # loaded once
    again = R.embed([SENTENCES[1], SENTENCES[0], SENTENCES[1]])       # repeats encoded once
    assert np.array_equal(again[0], again[2]) and np.abs(again[1] - ref[0]).max() < 1e-5


@pytest.mark.slow
def test_dense_retriever_finds_the_paraphrase_and_reranking_keeps_candidates():
    texts = ["Kalo Brina keeps a parrot called Fepo.", "Stocks fell sharply today.",
             "Kalo Brina is a baker by trade.", "The storm brought heavy rain."]
    dense = R.DenseRetriever(texts, index_cls=R.BruteForceIndex)
    assert dense.search(["What is the weather like? Rain and wind."], k=1)[0][0].id == 3
    rerank = R.RerankRetriever(dense, texts, depth=2)
    first = {h.id for h in dense.search(["What pet does Kalo Brina have?"], k=2)[0]}
    hits = rerank.search(["What pet does Kalo Brina have?"], k=2)[0]
    assert {h.id for h in hits} == first and hits[0].id == 0
    tok = R.token_embeddings(["Kalo Brina"])[0]
    assert tok.shape[1] == 384 and np.allclose(np.linalg.norm(tok, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="list of strings"):
        R.embed("not a list")
    with pytest.raises(ValueError, match="batch_size"):
        R.embed(["x"], batch_size=0)
