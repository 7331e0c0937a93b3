"""Task examples -> token tensors, for training and teacher-forced scoring.

Encoder-decoder models: encoder input = the task's source text (`source_text`, cut to
`max_source_len` tokens) + EOS; decoder input = [start] + target, labels = target + EOS.
Decoder-only models: one sequence prompt + target + EOS; labels are the next tokens, with the
prompt positions ignored (-100), so the loss covers the answer only. The source text is cut to
`max_source_len` tokens before it goes into the prompt, so the instruction is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eexit.data.tasks import Example, Task

IGNORE = -100


@dataclass
class EncodedPairs:
    seq2seq: bool
    sources: list[list[int]]  # encoder ids (seq2seq) / prompt ids (decoder-only)
    targets: list[list[int]]  # target ids, EOS included
    pad_id: int
    start_id: int  # first decoder input of a seq2seq model

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, part: slice) -> EncodedPairs:
        return EncodedPairs(
            self.seq2seq, self.sources[part], self.targets[part], self.pad_id, self.start_id
        )

    @property
    def longest_target(self) -> int:
        return max(map(len, self.targets))


def shorten(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def model_inputs(
    tokenizer, task: Task, ex: Example, seq2seq: bool, max_source_len: int
) -> list[int]:
    """The ids a model reads for one example (encoder input, or the prompt of a decoder-only
    model)."""
    short = Example(
        shorten(tokenizer, ex.source, max_source_len), ex.target, ex.question, ex.answers, ex.id
    )
    if seq2seq:
        return tokenizer(task.source_text(short), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
    text = task.prompt_text(short, tokenizer if getattr(tokenizer, "chat_template", None) else None)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pairs(
    tokenizer,
    task: Task,
    examples: list[Example],
    seq2seq: bool,
    max_source_len: int,
    max_target_len: int,
    start_id: int | None = None,
) -> EncodedPairs:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sources = [model_inputs(tokenizer, task, ex, seq2seq, max_source_len) for ex in examples]
    lead = "" if seq2seq else " "  # decoder-only: the answer follows the prompt after a space
    targets = [
        tokenizer(lead + ex.target, add_special_tokens=False)["input_ids"][:max_target_len] + [eos]
        for ex in examples
    ]
    return EncodedPairs(seq2seq, sources, targets, pad, start_id if start_id is not None else pad)


def collate(p: EncodedPairs, idx: list[int]) -> tuple[dict, torch.Tensor]:
    """(model inputs, labels) for the examples idx; right-padded (causal attention keeps pads out of
    real positions)."""
    if p.seq2seq:
        src = [p.sources[i] for i in idx]
        S = max(map(len, src))
        source_ids = torch.tensor([s + [p.pad_id] * (S - len(s)) for s in src])
        source_mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in src])
        tgt = [p.targets[i] for i in idx]
        T = max(map(len, tgt))
        dec = torch.tensor([[p.start_id] + t[:-1] + [p.pad_id] * (T - len(t)) for t in tgt])
        labels = torch.tensor([t + [IGNORE] * (T - len(t)) for t in tgt])
        return {"input_ids": dec, "source_ids": source_ids, "source_mask": source_mask}, labels
    seqs = [p.sources[i] + p.targets[i] for i in idx]
    T = max(map(len, seqs)) - 1
    ids = torch.tensor([s[:-1] + [p.pad_id] * (T - len(s) + 1) for s in seqs])
    labels = torch.tensor(
        [
            [IGNORE] * (len(p.sources[i]) - 1) + p.targets[i] + [IGNORE] * (T - len(s) + 1)
            for i, s in zip(idx, seqs)
        ]
    )
    return {"input_ids": ids}, labels


def batches(p: EncodedPairs, batch_size: int, limit: int | None = None):
    """(inputs, labels) of the first `limit` examples (all by default) in order, `batch_size` at a
    time."""
    n = len(p) if limit is None else min(limit, len(p))
    for i in range(0, n, batch_size):
        yield collate(p, list(range(i, min(i + batch_size, n))))


def random_batch(
    p: EncodedPairs, batch_size: int, generator: torch.Generator
) -> tuple[dict, torch.Tensor]:
    return collate(p, torch.randint(len(p), (batch_size,), generator=generator).tolist())


def keep_labelled(
    states: list[torch.Tensor], labels: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Drop ignored positions: states become [1, n_labelled, d] and labels [1, n_labelled], so every
    loss (per-position means) covers the labelled tokens only."""
    keep = labels.reshape(-1) != IGNORE
    if bool(keep.all()):
        return states, labels
    return [s.reshape(-1, s.shape[-1])[keep][None] for s in states], labels.reshape(-1)[keep][None]
