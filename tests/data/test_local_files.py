"""Local data through `datasets.load_dataset`: .txt / .jsonl / .csv / .parquet, the user's own
splits (a folder of split files, or data.train_file / validation_file / test_file), the hash
split only when no split is given (and said so)."""

import json

import pytest

from eexit.data.corpora import load_corpus
from eexit.errors import EexitError
from tests.conftest import run_cli, tiny_overrides

TEXT = "The history of the war in Albania part {} was long and hard, said the old book."


def write_jsonl(path, n, start=0, field="text"):
    path.write_text("".join(json.dumps({field: TEXT.format(start + i)}) + "\n" for i in range(n)))


def test_a_folder_of_split_files_keeps_the_users_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", 30)
    write_jsonl(tmp_path / "valid.jsonl", 5, 100)
    write_jsonl(tmp_path / "test.jsonl", 4, 200)
    corpus = load_corpus(str(tmp_path))
    assert [len(corpus[s]) for s in ("train", "validation", "test")] == [30, 5, 4]
    assert corpus["test"][0] == TEXT.format(200)


@pytest.mark.parametrize("kind", ["csv", "parquet", "txt"])
def test_one_file_of_each_kind_is_hash_split_and_says_so(tmp_path, kind, capsys):
    import datasets

    rows = [TEXT.format(i) for i in range(200)]
    f = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        f.write_text("\n\n".join(rows))
    else:
        ds = datasets.Dataset.from_dict({"body": rows})
        ds.to_csv(str(f), index=False) if kind == "csv" else ds.to_parquet(str(f))
    corpus = load_corpus(str(f), text_field="body")
    sizes = [len(corpus[s]) for s in ("train", "validation", "test")]
    assert sum(sizes) == 200 and sizes[0] > 150 and sizes[1] and sizes[2]
    assert "no split given" in capsys.readouterr().err
    assert load_corpus(str(f), text_field="body") == corpus  # deterministic


def test_local_file_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 3, field="content")
    with pytest.raises(EexitError, match="has no column 'text'.*content.*set data.text_field"):
        load_corpus(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.xml").write_text("<x/>")
    with pytest.raises(EexitError, match="dataset file must be one of"):
        load_corpus(str(tmp_path / "b.xml"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(EexitError, match="cannot read"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(EexitError, match="holds no train"):
        load_corpus(str(tmp_path / "sub"))


def test_train_and_evaluate_on_split_files(tmp_path):
    write_jsonl(tmp_path / "tr.jsonl", 300)
    write_jsonl(tmp_path / "va.jsonl", 40, 1000)
    write_jsonl(tmp_path / "te.jsonl", 40, 2000)
    files = [
        f"data.train_file={tmp_path / 'tr.jsonl'}",
        f"data.validation_file={tmp_path / 'va.jsonl'}",
        f"data.test_file={tmp_path / 'te.jsonl'}",
        "data.dataset=my-jsonl",
    ]
    code, _, err = run_cli("train", *tiny_overrides(*files), "--out", str(tmp_path / "ck"))
    assert code == 0, err
    code, _, err = run_cli(
        "evaluate",
        "--model",
        str(tmp_path / "ck"),
        "--max-tokens",
        "128",
        "--out",
        str(tmp_path / "ev"),
    )
    assert code == 0, err
    row = json.loads((tmp_path / "ev" / "evaluate.json").read_text())[0]
    prov = json.loads((tmp_path / "ev" / "provenance.json").read_text())
    assert prov["config"]["dataset"] == "my-jsonl" and row["tokens"] == 128
    # the test file really is read: editing it changes the result
    write_jsonl(tmp_path / "te.jsonl", 40, 5000)
    code, _, err = run_cli(
        "evaluate",
        "--model",
        str(tmp_path / "ck"),
        "--max-tokens",
        "128",
        "--out",
        str(tmp_path / "ev2"),
    )
    assert code == 0, err
    again = json.loads((tmp_path / "ev2" / "evaluate.json").read_text())[0]
    assert again["ppl"] != row["ppl"]
