"""An empty split is named as the user gave it: a missing or empty data.<split>_file, not the
default dataset the user never chose."""

import pytest

from eexit.data.corpora import corpus_split
from eexit.errors import EexitError


def test_a_missing_validation_file_is_named_as_such():
    corpus = {"train": ["some text"], "validation": [], "test": []}
    files = {"train": "tr.txt"}
    with pytest.raises(
        EexitError, match=r"no data\.validation_file given \(only data\.train_file\)"
    ):
        corpus_split(corpus, "validation", "wiki-gensim", files)
    with pytest.raises(EexitError, match=r"data\.validation_file va\.txt holds no text"):
        corpus_split(corpus, "validation", "wiki-gensim", {**files, "validation": "va.txt"})
    with pytest.raises(EexitError, match="split 'validation' of dataset 'wiki-gensim'"):
        corpus_split(corpus, "validation", "wiki-gensim")  # no files: the dataset's own split
    assert corpus_split(corpus, "train", "wiki-gensim", files) == ["some text"]
