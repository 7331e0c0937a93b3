"""Task pairs -> tensors: labels cover the answer only; every loss and policy runs on T5 decoder
exits."""

import pytest
import torch

from eexit.config import LossConfig
from eexit.data.pairs import IGNORE, EncodedPairs, collate, keep_labelled
from eexit.evaluation.records import collect_exit_table, exit_metrics
from eexit.policies.base import POLICIES, make_policy
from eexit.training.losses import LOSSES, LossBatch, make_loss


def test_decoder_only_labels_cover_the_answer_only():
    p = EncodedPairs(
        False, sources=[[5, 6, 7], [8, 9]], targets=[[20, 21, 2], [22, 2]], pad_id=0, start_id=0
    )
    batch, labels = collate(p, [0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 20, 21], [8, 9, 22, 0, 0]]
    # position t predicts token t+1: the prompt's last position predicts the first answer token
    assert labels.tolist() == [[IGNORE, IGNORE, 20, 21, 2], [IGNORE, 22, 2, IGNORE, IGNORE]]


def test_seq2seq_batches_shift_the_target_and_mask_the_source():
    p = EncodedPairs(
        True, sources=[[5, 6, 2], [7, 2]], targets=[[20, 21, 2], [22, 2]], pad_id=0, start_id=1
    )
    batch, labels = collate(p, [0, 1])
    assert batch["input_ids"].tolist() == [[1, 20, 21], [1, 22, 0]]
    assert labels.tolist() == [[20, 21, 2], [22, 2, IGNORE]]
    assert batch["source_ids"].tolist() == [[5, 6, 2], [7, 2, 0]] and batch[
        "source_mask"
    ].tolist() == [[1, 1, 1], [1, 1, 0]]
    states, y = keep_labelled([torch.arange(6.0).reshape(2, 3, 1)], labels)
    assert y.tolist() == [[20, 21, 2, 22, 2]] and states[0].flatten().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_t5_decoder_exits(t5, name):  # noqa: F811
    model, ids, mask = t5
    if name == "ponder":
        model.halting_gate = torch.nn.Linear(model.hidden_size, 1)
    pairs = EncodedPairs(
        True,
        [r[m.bool()].tolist() for r, m in zip(ids, mask)],
        [[3, 4, 5, 1], [6, 1], [7, 8, 1]],
        0,
        0,
    )
    batch, labels = collate(pairs, [0, 1, 2])
    states, y = keep_labelled(model(**batch), labels)
    loss, logs = make_loss(LossConfig(name=name))(LossBatch(model, states, y))
    model.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.parts.layers[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    assert model.parts.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    model.halting_gate = None


def test_every_policy_scores_t5_exits_teacher_forced(t5):  # noqa: F811
    import eexit.policies.learned  # noqa: F401

    model, ids, mask = t5
    pairs = EncodedPairs(
        True,
        [r[m.bool()].tolist() for r, m in zip(ids, mask)],
        [[3, 4, 5, 1], [6, 1], [7, 8, 1]],
        0,
        0,
    )
    for name in POLICIES.names():
        policy = make_policy(name, 0.5)
        if getattr(policy, "needs_classifier", False):
            continue  # fitted classifiers: tests/test_t5.py calibrates one on a trained T5
        model.halting_gate = (
            torch.nn.Linear(model.hidden_size, 1) if name == "halting-cdf" else None
        )
        table = collect_exit_table(model, pairs, None, policy, batch_size=2)
        assert table.tokens == 9
        never = exit_metrics(table, make_policy(name, 1.0))
        if not policy.threshold_free:
            assert never["compute_pct"] == 100.0 and never["ppl"] == pytest.approx(
                never["full_ppl"]
            )


def test_decoder_only_trains_on_a_task_and_checks_lengths(tmp_path):
    from tests.conftest import message_lines, run_cli, tiny_overrides

    code, _, err = run_cli(
        "train", *tiny_overrides("data.dataset=aclsum"), "--out", str(tmp_path / "short")
    )
    assert code == 2 and "model.max_len is 32" in err and len(message_lines(err)) == 1
    code, _, err = run_cli(
        "train",
        *tiny_overrides(
            "data.dataset=aclsum",
            "model.max_len=128",
            "data.max_source_len=40",
            "data.max_target_len=16",
        ),
        "--out",
        str(tmp_path / "ok"),
    )
    assert code == 0, err
    assert "val_ppl@3" in (tmp_path / "ok" / "train_log.jsonl").read_text()
