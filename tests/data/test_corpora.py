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
    with pytest.raises(EexitError, match="no string field 'text'"):
        data.load_corpus(str(jl))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(EexitError, match="not valid JSON"):
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
