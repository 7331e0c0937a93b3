"""Task metrics (cross-checked against direct library calls) and the offline task datasets."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from eexit.data.task_data import BLANK, cloze_questions, detokenize, load_task_data, task_split
from eexit.data.tasks import Example, get_task, normalize_answer, squad_em, squad_f1
from eexit.errors import EexitError

HYPS = [
    "the cats were sitting on the mat",
    "he read the books quickly",
    "a completely different sentence",
]
REFS = ["the cat sat on the mat", "he was reading a book", "nothing in common here at all"]


def test_rouge_equals_rouge_score_with_stemming():
    got = get_task("summarization").score(HYPS, [Example("", r) for r in REFS])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = 100 * sum(scorer.score(r, h)[key].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
        assert got[key] == pytest.approx(want)
    # stemming matters: "cats" ~ "cat", "books" ~ "book"
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert (
        got["rouge1"]
        > 100 * sum(plain.score(r, h)["rouge1"].fmeasure for h, r in zip(HYPS, REFS)) / 3 + 1
    )


def test_bleu_and_chrf_equal_sacrebleu_and_carry_its_signature():
    got = get_task("translation").score(HYPS, [Example("", r) for r in REFS])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert (
        got["bleu_signature"].startswith("nrefs:1|case:mixed")
        and "tok:13a" in got["bleu_signature"]
    )
    perfect = get_task("translation").score(REFS, [Example("", r) for r in REFS])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)


def test_squad_normalisation_em_and_f1():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert squad_em("The Cat.", "cat") == 1.0 and squad_em("cats", "cat") == 0.0
    assert squad_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # P = 1, R = 2/3
    assert squad_f1("dog", "cat") == 0.0
    qa = get_task("qa")
    exs = [
        Example("ctx", "Paris", question="q", answers=["Paris", "the city of Paris"]),
        Example("ctx", "1793", question="q", answers=["1793"]),
    ]
    got = qa.score(["city of Paris", "in 1794"], exs)
    assert got["exact_match"] == pytest.approx(
        50.0
    )  # max over gold answers: "city of paris" = "the city of Paris"
    assert got["f1"] == pytest.approx(50.0)  # second: 0 overlap


def test_bible_pairs_are_aligned_verses_with_a_stable_split():
    task, splits = load_task_data("bible-en-fr")
    assert task == "translation"
    total = sum(len(v) for v in splits.values())
    assert 30_000 < total <= 31_102
    assert len(splits["test"]) > 1000 and len(splits["validation"]) > 1000
    john = next(ex for s in splits.values() for ex in s if ex.id == "43:3:16")
    assert john.source.startswith("For God so loved the world") and john.target.startswith(
        "Car Dieu a tant aimé le monde"
    )
    ids = [{ex.id for ex in splits[s]} for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_aclsum_abstract_to_summary():
    task, splits = load_task_data("aclsum")
    assert task == "summarization" and [
        len(splits[s]) for s in ("train", "validation", "test")
    ] == [100, 50, 100]
    ex = splits["test"][0]
    assert len(ex.source) > 200 and len(ex.target) > 50 and " ," not in ex.source
    assert detokenize("word , word ( MT ) is n't here .") == "word, word (MT) isn't here."


def test_cloze_qa_is_extractive_squad_format():
    para = (
        "Anarchism is a political philosophy. It was described by William Godwin in 1793 in a "
        "famous book, "
        "which argued that government corrupts society and perpetuates dependency and ignorance "
        "among people. "
        "The movement grew in the nineteenth century across Europe and later spread to the "
        "Americas and Asia too."
    )
    (ex,) = cloze_questions("doc#0", para)
    assert (
        BLANK in ex.question
        and ex.answers == [ex.target]
        and ex.target in ("William Godwin", "1793")
    )
    filled = ex.question.split('"')[1].replace(BLANK, ex.target)
    assert filled in para  # the blanked sentence, answer restored, is part of the context
    assert cloze_questions("short", "Too short.") == []
    task, examples = task_split("wiki-cloze-qa", "test")
    assert task == "qa" and len(examples) > 50
    assert all(ex.target in ex.source and BLANK in ex.question for ex in examples)


def test_task_data_errors():
    with pytest.raises(EexitError, match="did you mean 'aclsum'"):
        load_task_data("aclsun")
    with pytest.raises(EexitError, match="unknown split"):
        task_split("aclsum", "dev")
