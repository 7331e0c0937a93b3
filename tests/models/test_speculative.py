"""Self-speculative decoding (LayerSkip): greedy output equals full-depth greedy `transformers`
`generate` token for token (GPT-2 and Llama, batch 1 and left-padded batches, several draft
layers and lengths, per-row acceptance); sampling follows the full model's distribution."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eexit.errors import EexitError
from eexit.models.decoding import EarlyExitDecoder
from eexit.models.early_exit import EarlyExitModel
from eexit.models.loading import load_model
from eexit.models.speculative import SelfSpeculativeDecoder
from eexit.policies import make_policy


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    model, tok, _ = load_model(str(tiny_checkpoint))
    text = tok("The history of the war in Albania")["input_ids"]
    rows = [text[:6], text[2:6], text[:2]]
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (6 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (6 - len(r)) + [1] * len(r) for r in rows])
    return model, ids, mask, pad


def llama(vocab=97, scale=1.0, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(scale)
    return EarlyExitModel(lm, "all").eval()


@pytest.mark.parametrize("draft_layer,draft_length", [(1, 1), (1, 4), (2, 3), (2, 8)])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_transformers_generate_gpt2(gpt2, draft_layer, draft_length, batch):
    model, ids, mask, pad = gpt2
    ids, mask = ids[-batch:], mask[-batch:]
    ref = model.lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=None,
    )
    dec = SelfSpeculativeDecoder(model, draft_layer, draft_length)
    out = dec.generate(ids, mask, 16, pad_token_id=pad)
    assert torch.equal(out.sequences, ref)
    assert dec.stats.cycles > 0 and 0 <= dec.stats.accepted <= dec.stats.drafted


@pytest.mark.parametrize("draft_layer,draft_length", [(1, 2), (3, 4)])
def test_greedy_equals_transformers_generate_llama_gqa_padded(draft_layer, draft_length):
    model = llama(scale=3.0)
    torch.manual_seed(5)
    ids = torch.randint(3, 97, (3, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids[2, :5], mask[2, :5] = 0, 0
    ref = model.lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=14,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    dec = SelfSpeculativeDecoder(model, draft_layer, draft_length)
    out = dec.generate(ids, mask, 14, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_draft_vocabulary_keeps_the_output_and_drafts_only_its_tokens(gpt2, arch):
    """Drafting over a token list (a cheaper head) changes acceptance, never the output."""
    if arch == "gpt2":
        model, ids, mask, pad = gpt2
    else:
        model, pad = llama(scale=3.0), 0
        torch.manual_seed(5)
        ids = torch.randint(3, 97, (3, 7))
        mask = torch.ones_like(ids)
        ids[1, :3], mask[1, :3] = 0, 0
    ref = model.lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=None,
    )
    full_vocab = SelfSpeculativeDecoder(model, 1, 4).generate(ids, mask, 16, pad_token_id=pad)
    # the list: half of the tokens the full model emits, plus others
    emitted = ref[:, ids.shape[1] :].unique()
    vocab = torch.cat([emitted[::2], torch.arange(60, 80)]).unique()
    dec = SelfSpeculativeDecoder(model, 1, 4, draft_vocab=vocab)
    out = dec.generate(ids, mask, 16, pad_token_id=pad)
    assert torch.equal(out.sequences, ref) and torch.equal(full_vocab.sequences, ref)
    drafted = out.new_tokens[out.exit_layers == 1]  # accepted drafts are list tokens
    assert dec.stats.accepted > 0 and torch.isin(drafted, vocab).all()
    V = model.vocab_size
    with pytest.raises(EexitError, match=f"token ids in 0..{V - 1}"):
        SelfSpeculativeDecoder(model, 1, 4, draft_vocab=torch.tensor([3, V]))


def test_rows_accept_different_numbers_of_drafts(gpt2):
    """Per-row acceptance: the rows of a batch advance by different amounts per cycle, and each
    row still equals its own batch-1 decoding."""
    model, ids, mask, pad = gpt2
    dec = SelfSpeculativeDecoder(model, 2, 4)
    batch = dec.generate(ids, mask, 16, pad_token_id=pad)
    per_row = []
    for r in range(3):
        keep = mask[r].bool()
        single = dec.generate(ids[r : r + 1, keep], None, 16, pad_token_id=pad)
        per_row.append(single.new_tokens[0])
        assert torch.equal(batch.new_tokens[r], single.new_tokens[0])
    layers = batch.exit_layers[:, 1:]
    assert ((layers == 2) | (layers == 3)).all()
    assert len({tuple(x.tolist()) for x in layers}) > 1  # rows accepted differently


@pytest.mark.parametrize("draft_length", [1, 3])
def test_tokens_per_cycle_counts_the_tokens_emitted(gpt2, draft_length):
    """A cycle emits its accepted drafts plus the full model's token where one was rejected: a
    cycle that keeps every draft adds none (the verification does not reach past the last
    draft). Every token after the first comes from a cycle."""
    model, ids, mask, pad = gpt2
    dec = SelfSpeculativeDecoder(model, 2, draft_length)
    dec.generate(ids, mask, 16, pad_token_id=pad)
    st = dec.stats
    assert st.emitted == 3 * (16 - 1)
    assert st.tokens_per_cycle == pytest.approx(st.emitted / st.cycles)
    assert 1 <= st.tokens_per_cycle <= draft_length


def test_stops_at_eos_and_checks_its_options(gpt2):
    model, ids, mask, pad = gpt2
    ref = SelfSpeculativeDecoder(model, 1, 3).generate(ids[:1], mask[:1], 12, pad_token_id=pad)
    eos = int(ref.new_tokens[0, 4])
    out = SelfSpeculativeDecoder(model, 1, 3).generate(
        ids[:1], mask[:1], 12, eos_token_id=eos, pad_token_id=pad
    )
    first = int((out.new_tokens[0] == eos).nonzero()[0])
    assert (out.new_tokens[0, first + 1 :] == pad).all()
    for layer, length in [(0, 2), (3, 2), (1, 0)]:
        with pytest.raises(EexitError):
            SelfSpeculativeDecoder(model, layer, length)


def tv_distance(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    pa = torch.bincount(a, minlength=vocab).float() / len(a)
    pb = torch.bincount(b, minlength=vocab).float() / len(b)
    return 0.5 * (pa - pb).abs().sum().item()


def test_sampling_follows_the_full_models_distribution():
    """Tokens 2 and 3 of 3000 samples: self-speculative sampling and full-depth sampling agree
    within sampling noise (total variation < 0.05), while sampling from the draft exit alone is
    visibly different (the test can fail)."""
    vocab, n = 12, 3000
    model = llama(vocab=vocab, scale=2.5, seed=3)
    prompt = torch.randint(3, vocab, (1, 5)).repeat(n, 1)
    never = make_policy("max-prob", threshold=1.0)
    full = EarlyExitDecoder(model, never, "full").generate(prompt, None, 3, do_sample=True, seed=1)
    spec = SelfSpeculativeDecoder(model, 1, 3).generate(prompt, None, 3, do_sample=True, seed=2)
    draft_only = EarlyExitDecoder(model, make_policy("static", layer=1), "full").generate(
        prompt, None, 3, do_sample=True, seed=3
    )
    for t in (1, 2):
        same = tv_distance(full.new_tokens[:, t], spec.new_tokens[:, t], vocab)
        other = tv_distance(full.new_tokens[:, t], draft_only.new_tokens[:, t], vocab)
        assert same < 0.05, (t, same)
        assert other > 0.1, (t, other)
    # a draft vocabulary (q = 0 off the list) keeps the full model's distribution too
    short = SelfSpeculativeDecoder(model, 1, 3, draft_vocab=torch.arange(0, vocab, 2))
    listed = short.generate(prompt, None, 3, do_sample=True, seed=4)
    for t in (1, 2):
        same = tv_distance(full.new_tokens[:, t], listed.new_tokens[:, t], vocab)
        assert same < 0.05, (t, same)
    assert short.stats.accepted > 0


def test_evaluate_generate_self_spec_reports_acceptance_and_identical_output(
    tiny_checkpoint, tmp_path
):
    import json

    from tests.conftest import run_cli

    out = tmp_path / "spec"
    common = ["evaluate", "--model", str(tiny_checkpoint), "--generate", "--mode", "self-spec"]
    common += ["--draft-layer", "1", "--draft-length", "3", "--prompts", "3", "--prompt-len", "8"]
    common += ["--max-new-tokens", "12", "--batch-size", "1"]
    code, _, err = run_cli(*common, "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "generation.json").read_text())
    total = rows[-1]
    assert total["agreement_pct"] == 100.0  # greedy self-speculation is lossless
    assert 0 <= total["acceptance_rate"] <= 1 and 1 <= total["tokens_per_cycle"] <= 4
    shares = [total[k] for k in ("draft_time_pct", "verify_time_pct", "other_time_pct")]
    assert shares[0] > 0 and shares[1] > 0 and abs(sum(shares) - 100) < 1e-6  # the profile
    # drafting over the 50 most frequent tokens: cheaper drafts, the same output
    code, _, err = run_cli(*common, "--draft-vocab", "50", "--out", str(tmp_path / "short"))
    assert code == 0, err
    short = json.loads((tmp_path / "short" / "generation.json").read_text())[-1]
    assert short["agreement_pct"] == 100.0
    assert short["compute_pct"] < total["compute_pct"]  # the draft head costs 50 rows, not V
    code, _, err = run_cli(
        "evaluate", "--model", str(tiny_checkpoint), "--generate", "--mode", "sideways"
    )
    assert code == 2 and "unknown --mode 'sideways'" in err
    code, _, err = run_cli(
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--generate",
        "--mode",
        "self-spec",
        "--draft-layer",
        "3",
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "8",
    )
    assert code == 2 and "--draft-layer must be in 1..2" in err
