"""Text corpora, deterministic splits, BPE tokenizer training and token windows.

The embedded default `wiki-gensim` is the Wikipedia extract shipped inside the `gensim` wheel
(markup stripped by `eexit.data.wikimarkup`), so every default run works offline. Hub datasets
(`wikitext`, or any `hf:<name>[:<config>]`) and local `.txt` / `.jsonl` files work too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zlib
from pathlib import Path

import torch

from eexit import __version__
from eexit.data.names import CORPORA, unknown_dataset
from eexit.errors import EexitError
from eexit.files import atomic_torch_save, atomic_write
from eexit.reporting import log

SPLITS = ("train", "validation", "test")
EOS = "<|endoftext|>"


def cache_dir() -> Path:
    d = Path(os.environ.get("EEXIT_CACHE", Path.home() / ".cache" / "eexit"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def split_of(key: str) -> str:
    """Deterministic 90/5/5 assignment of a document key to a split."""
    bucket = zlib.crc32(key.encode("utf-8")) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def split_documents(docs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(key, text) pairs -> {split: [text, ...]} by a stable hash of the key."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key, text in docs:
        if text.strip():
            out[split_of(key)].append(text)
    return out


def packaged_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EexitError(
            f"the offline data needs the {package!r} package: pip install --no-deps {package}"
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise EexitError(f"{path} is missing from the installed {package!r} package")
    return path


@CORPORA.register("wiki-gensim")
def wiki_gensim() -> dict[str, list[str]]:
    """~100 Wikipedia articles from the gensim wheel; split by paragraph (key: title + index)."""
    from eexit.data.wikimarkup import load_wikipedia_articles

    path = packaged_file(
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    )
    docs = []
    for title, prose in load_wikipedia_articles(path):
        for i, para in enumerate(prose.split("\n\n")):
            docs.append((f"{title}#{i}", para))
    return split_documents(docs)


@CORPORA.register("lee-gensim")
def lee_gensim() -> dict[str, list[str]]:
    """300 news documents (Lee background corpus) from the gensim wheel; split by document."""
    path = packaged_file("gensim", "test/test_data/lee_background.cor")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return split_documents([(f"lee#{i}", ln) for i, ln in enumerate(lines) if ln])


@CORPORA.register("wikitext")
def wikitext() -> dict[str, list[str]]:
    """WikiText-2 (raw) from the Hugging Face hub (needs network access)."""
    return hub_corpus("Salesforce/wikitext", "wikitext-2-raw-v1", "text")


def hub_corpus(name: str, config: str | None, field: str) -> dict[str, list[str]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, config)
    except Exception as e:  # network, unknown name, ... -> one line
        raise EexitError(
            f"could not load hub dataset {name!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    out = {}
    for split in SPLITS:
        have = (
            split if split in ds else ("valid" if split == "validation" and "valid" in ds else None)
        )
        out[split] = [r[field] for r in ds[have] if r[field].strip()] if have else []
    if not out["validation"] and not out["test"]:
        return split_documents([(f"{name}#{i}", t) for i, t in enumerate(out["train"])])
    return out


LOCAL_BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}


def local_files(files: dict[str, Path], field: str) -> dict[str, list[str]]:
    """Local .txt / .jsonl / .json / .csv / .parquet files read by `datasets.load_dataset`, one
    per split (.txt: documents separated by blank lines; the others: the `field` column). The
    `datasets` cache is keyed on the files' content."""
    for f in files.values():
        if not f.is_file():
            raise EexitError(f"dataset file not found: {f}")
        if f.suffix not in LOCAL_BUILDERS:
            raise EexitError(f"dataset file must be one of {', '.join(LOCAL_BUILDERS)}: {f}")
        if not f.read_bytes().strip():
            raise EexitError(f"dataset file is empty: {f}")
    builders = {LOCAL_BUILDERS[f.suffix] for f in files.values()}
    if len(builders) > 1:
        raise EexitError(f"the split files must be of one kind; got {sorted(builders)}")
    builder = builders.pop()
    digest = hashlib.sha256(field.encode())
    for split, f in sorted(files.items()):
        digest.update(split.encode() + f.read_bytes())
    import datasets

    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(
            builder,
            data_files={split: str(f) for split, f in files.items()},
            cache_dir=str(cache_dir() / "datasets" / digest.hexdigest()[:20]),
            **extra,
        )
    except Exception as e:  # malformed JSON / CSV / parquet: one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EexitError(f"cannot read {', '.join(map(str, files.values()))}: {first}") from None
    column = "text" if builder == "text" else field
    out = {}
    for split, f in files.items():
        if column not in ds[split].column_names:
            raise EexitError(
                f"{f} has no column {field!r} (columns: {', '.join(ds[split].column_names)}); "
                "set data.text_field"
            )
        out[split] = [t for t in ds[split][column] if isinstance(t, str) and t.strip()]
    return out


def split_files_in(folder: Path) -> dict[str, Path]:
    """train.* / validation.* (or valid.*, dev.*) / test.* files of a folder."""
    found = {}
    for split, names in SPLIT_NAMES.items():
        for f in sorted(folder.iterdir()):
            if f.stem in names and f.suffix in LOCAL_BUILDERS:
                found.setdefault(split, f)
    if "train" not in found:
        raise EexitError(
            f"{folder} holds no train.* file (expected train / validation / test files of one "
            f"kind: {', '.join(LOCAL_BUILDERS)})"
        )
    return found


def local_corpus(path: Path, field: str, split_files: dict[str, str] | None = None):
    """The user's own splits (a folder of split files, or data.*_file), else one file split
    90/5/5 by a hash of each document's position (said in the log)."""
    if split_files:
        return local_files({s: Path(f) for s, f in split_files.items()}, field)
    if path.is_dir():
        return local_files(split_files_in(path), field)
    docs = local_files({"train": path}, field)["train"]
    log(f"{path}: no split given, documents assigned to train / validation / test 90/5/5 by hash")
    return split_documents([(f"{i}", d) for i, d in enumerate(docs)])


def load_corpus(
    name: str, text_field: str = "text", split_files: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """Resolve a dataset name to {split: [documents]}: a registered corpus, `hf:<hub name>`,
    a local file, a folder of split files, or the split files given by data.*_file."""
    if split_files:
        return local_corpus(Path(name), text_field, split_files)
    if name in CORPORA:
        return CORPORA.get(name)()
    if name.startswith("hf:"):
        parts = name[3:].split(":")
        return hub_corpus(parts[0], parts[1] if len(parts) > 1 else None, text_field)
    path = Path(name)
    if path.suffix in LOCAL_BUILDERS or path.exists():
        if path.is_file() and path.suffix not in LOCAL_BUILDERS:
            raise EexitError(f"dataset file must be one of {', '.join(LOCAL_BUILDERS)}: {path}")
        return local_corpus(path, text_field)
    raise unknown_dataset(name)


def corpus_split(
    corpus: dict[str, list[str]], split: str, name: str, split_files: dict[str, str] | None = None
) -> list[str]:
    """The documents of `split`; an empty one is named as the user gave it (the dataset, or
    the data.<split>_file that is missing or empty)."""
    if split not in SPLITS:
        raise EexitError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    docs = corpus.get(split) or []
    if not docs and split_files:
        if split not in split_files:
            given = ", ".join(f"data.{s}_file" for s in split_files)
            raise EexitError(
                f"no data.{split}_file given (only {given}); set data.{split}_file to a "
                f"{' / '.join(LOCAL_BUILDERS)} file"
            )
        raise EexitError(f"data.{split}_file {split_files[split]} holds no text")
    if not docs:
        raise EexitError(f"split {split!r} of dataset {name!r} holds no text")
    return docs


# ---------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the given texts, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha1(("\x00".join(texts) + f"|{vocab_size}").encode("utf-8")).hexdigest()[:16]
    path = cache_dir() / f"bpe-{key}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        log(f"training a {vocab_size}-token BPE tokenizer on {len(texts):,} texts (cached after)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        atomic_write(path, tok.to_str())  # a temporary name per process: runs share the cache
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids for a causal LM
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the tokens: the fast tokenizer's full serialisation
    (vocabulary, merges, normalizer, pre-tokenizer), else the vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(
            [sorted(tokenizer.get_vocab().items()), str(tokenizer.special_tokens_map)]
        )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def content_hash(docs: list[str]) -> str:
    """A hash of the documents' text (their order and boundaries included)."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def encode_documents(tokenizer, docs: list[str], cache_key: str | None = None) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token.

    The cached stream is keyed on content, not names: the eexit version, the tokenizer's
    fingerprint and a hash of the documents' text (`cache_key` only names the file), so an
    edited file or another tokenizer never reads a stale stream."""
    path = None
    if cache_key is not None:
        key = f"{__version__}|{tokenizer_fingerprint(tokenizer)}|{content_hash(docs)}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        path = cache_dir() / f"tokens-{digest}.pt"
        if path.is_file():
            return torch.load(path)
    log(f"tokenizing {cache_key or 'documents'}: {len(docs):,} documents (cached after)")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    tokens = torch.tensor(ids, dtype=torch.long)
    if path is not None:
        atomic_torch_save(tokens, path)
    return tokens


def frequent_tokens(
    tokenizer, dataset: str, k: int, vocab_size: int | None = None, split: str = "train"
) -> torch.Tensor:
    """The ids of the `k` most frequent tokens of a corpus split (ties by id): a frequency
    shortlist, e.g. the draft vocabulary of self-speculative decoding. `vocab_size` (default: the
    tokenizer's) bounds the ids, so that any k up to it gives k ids."""
    docs = corpus_split(load_corpus(dataset), split, dataset)
    tokens = encode_documents(tokenizer, docs, cache_key=f"{dataset}:{split}")
    counts = torch.bincount(tokens, minlength=vocab_size or len(tokenizer))
    return counts.argsort(descending=True, stable=True)[:k]  # stable: ties keep id order


# ---------------------------------------------------------------------------- windows
def random_windows(tokens: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    """A training batch: `batch_size` random windows (inputs, next-token targets)."""
    if len(tokens) <= seq_len + 1:
        raise EexitError(
            f"the training split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}"
        )
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None):
    """Non-overlapping windows covering the split (inputs, targets), at most `max_tokens`
    targets."""
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise EexitError(
            f"the evaluation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}"
        )
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    return x, y
