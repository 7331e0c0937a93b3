"""Generation tasks, registered by name: how an example becomes a model input, and its metric.

    @register_task("translation")
    class Translation(Task): ...

A task turns an `Example` into the encoder input of a seq2seq model (`source_text`, T5-style
prefix) or a prompt for a decoder-only model (`prompt_text`; chat template when the tokenizer has
one), and scores predictions with the library the papers use:

- summarization: ROUGE-1/2/L F-measure (`rouge-score`, Porter stemming), mean over examples x 100;
- translation: corpus BLEU and chrF (`sacrebleu`, default 13a tokenisation), signature kept;
- qa: SQuAD exact match / F1 with the official answer normalisation (max over gold answers).
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass, field

from eexit.registry import Registry


@dataclass
class Example:
    source: str  # document / English sentence / context
    target: str  # reference summary / translation / first gold answer
    question: str | None = None  # qa: the question
    answers: list[str] = field(default_factory=list)  # qa: every gold answer
    id: str = ""


class Task:
    registered_name: str
    primary: str  # the metric the sweep plots
    higher_is_better: dict[str, bool]
    instruction: str  # for decoder-only prompts

    def source_text(self, ex: Example) -> str:
        """Encoder input of a seq2seq model."""
        raise NotImplementedError

    def user_text(self, ex: Example) -> str:
        """The user turn of a decoder-only prompt."""
        return f"{self.instruction}\n\n{ex.source}"

    def prompt_text(self, ex: Example, tokenizer=None) -> str:
        """Prompt of a decoder-only model: the tokenizer's chat template when it has one."""
        user = self.user_text(ex)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        return f"{user}\nAnswer:"

    def score(self, predictions: list[str], examples: list[Example]) -> dict:
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("task")
register_task = TASKS.register


def get_task(name: str) -> Task:
    return TASKS.get(name)()


@register_task("summarization")
class Summarization(Task):
    primary = "rougeL"
    higher_is_better = {"rouge1": True, "rouge2": True, "rougeL": True}
    instruction = "Summarize the following text in one or two sentences."

    def source_text(self, ex):
        return "summarize: " + ex.source

    def score(self, predictions, examples):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        sums = collections.Counter()
        for pred, ex in zip(predictions, examples):
            for k, s in scorer.score(ex.target, pred).items():
                sums[k] += s.fmeasure
        n = max(1, len(predictions))
        return {k: 100 * sums[k] / n for k in ("rouge1", "rouge2", "rougeL")}


@register_task("translation")
class Translation(Task):
    primary = "bleu"
    higher_is_better = {"bleu": True, "chrf": True}
    instruction = "Translate the following English text to French."

    def source_text(self, ex):
        return "translate English to French: " + ex.source

    def score(self, predictions, examples):
        from sacrebleu.metrics import BLEU, CHRF

        refs = [[ex.target for ex in examples]]
        bleu, chrf = BLEU(), CHRF()
        b, c = bleu.corpus_score(predictions, refs), chrf.corpus_score(predictions, refs)
        return {
            "bleu": b.score,
            "chrf": c.score,
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()),
        }


# ---------------------------------------------------------------------------- SQuAD metric
def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and the articles a/an/the, squeeze
    spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


@register_task("qa")
class OpenBookQA(Task):
    primary = "f1"
    higher_is_better = {"exact_match": True, "f1": True}
    instruction = "Answer the question with a short span copied from the text."

    def source_text(self, ex):
        return f"question: {ex.question} context: {ex.source}"

    def user_text(self, ex):
        return (
            f"{self.instruction}\n\nText: {ex.source}\n\nQuestion: {ex.question}\n\n"
            "Reply with the answer only."
        )

    def score(self, predictions, examples):
        n = max(1, len(predictions))
        em = sum(
            max(squad_em(p, a) for a in (ex.answers or [ex.target]))
            for p, ex in zip(predictions, examples)
        )
        f1 = sum(
            max(squad_f1(p, a) for a in (ex.answers or [ex.target]))
            for p, ex in zip(predictions, examples)
        )
        return {"exact_match": 100 * em / n, "f1": 100 * f1 / n}


def clean_prediction(text: str) -> str:
    """The first line of a generated answer, stripped (decoder-only models continue chatting)."""
    text = text.strip()
    return text.split("\n")[0].strip() if text else text
