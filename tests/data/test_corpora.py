import json

import pytest
import torch

from eexit.data import corpora as data
from eexit.errors import EexitError


def test_default_corpus_split_is_deterministic_and_disjoint():
    a, b = data.load_corpus("wiki-gensim"), data.load_corpus("wiki-gensim")
    assert a == b
    sizes = {s: sum(len(t) for t in a[s]) for s in data.SPLITS}
    assert sizes["train"] > 2_000_000 and sizes["validation"] > 80_000 and sizes["test"] > 80_000
    shared = set(a["train"]) & set(a["test"])  # only boilerplate lines repeated across articles
    assert sum(len(t) for t in shared) < 0.001 * sizes["test"]


def test_file_corpora(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"paragraph number {i} with some words" for i in range(200)))
    c = data.load_corpus(str(txt))
    assert sum(len(v) for v in c.values()) == 200 and all(c[s] for s in data.SPLITS)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(50)))
    c = data.load_corpus(str(jl), text_field="body")
    assert sum(len(v) for v in c.values()) == 50
    with pytest.raises(EexitError, match="has no column 'text'"):
        data.load_corpus(str(jl))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(EexitError, match="cannot read"):
        data.load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(EexitError, match="not found"):
        data.load_corpus(str(tmp_path / "missing.txt"))


def test_tokenizer_and_windows():
    docs = ["hello world, this is a small test"] * 20
    tok = data.train_tokenizer(docs, 300)
    stream = data.encode_documents(tok, docs)
    assert stream[-1].item() == tok.eos_token_id
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    x, y = data.eval_windows(stream, 8)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])
    xs, ys = data.random_windows(stream, 8, 5, torch.Generator().manual_seed(0))
    assert xs.shape == (5, 8) and torch.equal(xs[:, 1:], ys[:, :-1])
    with pytest.raises(EexitError, match="fewer than one window"):
        data.eval_windows(stream[:5], 8)


def test_token_cache_is_keyed_on_content(tmp_path):
    """Editing one character of a local file (same number of documents) changes the tokens that
    are read back, and with them the evaluated text."""
    tok = data.train_tokenizer(["alpha beta gamma delta", "epsilon zeta eta theta"] * 20, 300)
    docs = ["alpha beta gamma", "delta epsilon zeta"]
    first = data.encode_documents(tok, docs, "local.txt:test")
    edited = ["alpha beta gamma", "delta epsilon zetA"]
    second = data.encode_documents(tok, edited, "local.txt:test")  # same name, same doc count
    assert not torch.equal(first, second)
    assert torch.equal(second, data.encode_documents(tok, edited, None))  # = uncached
    assert torch.equal(first, data.encode_documents(tok, docs, "local.txt:test"))
    other = data.train_tokenizer(["completely different words here"] * 20, 280)
    assert not torch.equal(data.encode_documents(other, docs, "local.txt:test"), first)


def test_editing_a_local_text_file_changes_the_evaluated_ppl(tiny_checkpoint, tmp_path):
    from tests.conftest import run_cli

    text = tmp_path / "corpus.txt"
    paragraphs = [
        f"The history of the war in Albania part {i} was long and hard." for i in range(400)
    ]
    text.write_text("\n\n".join(paragraphs))
    rows = []
    for attempt in range(2):
        out = tmp_path / f"e{attempt}"
        code, _, err = run_cli(
            "evaluate",
            "--model",
            str(tiny_checkpoint),
            "--dataset",
            str(text),
            "--max-tokens",
            "256",
            "--out",
            str(out),
        )
        assert code == 0, err
        rows.append(json.loads((out / "evaluate.json").read_text())[0]["ppl"])
        text.write_text(text.read_text().replace("war", "wor"))  # same number of documents
    assert rows[0] != rows[1]


def test_frequent_tokens_are_the_most_counted_ids_of_the_split(tiny_checkpoint):
    from transformers import AutoTokenizer

    from eexit.data.corpora import (
        corpus_split,
        encode_documents,
        frequent_tokens,
        load_corpus,
    )

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    top = frequent_tokens(tok, "wiki-gensim", 10)
    docs = corpus_split(load_corpus("wiki-gensim"), "train", "wiki-gensim")
    counts = torch.bincount(encode_documents(tok, docs), minlength=len(tok))
    assert (
        len(top) == 10 and counts[top].tolist() == counts.sort(descending=True).values[:10].tolist()
    )
