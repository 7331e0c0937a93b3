import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eexit.errors import EexitError
from eexit.models.decoding import KV_MODES, EarlyExitDecoder
from eexit.models.early_exit import EarlyExitModel
from eexit.models.loading import load_model
from eexit.policies.base import make_policy
from tests.helpers import HiddenSign


def never():
    return make_policy("max-prob", threshold=1.0)


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    model, tok, _ = load_model(str(tiny_checkpoint))
    tok.padding_side = "left"
    text = tok("The history of the war in Albania")["input_ids"]
    rows = [
        text[:6],
        text[2:6],
        text[:2],
    ]  # prompt + 24 new tokens fit the 32 positions of the tiny model
    pad = tok.pad_token_id
    enc = {
        "input_ids": torch.tensor([[pad] * (6 - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (6 - len(r)) + [1] * len(r) for r in rows]),
    }
    assert (enc["attention_mask"] == 0).any()  # the batch really is left-padded
    return model, tok, enc


@pytest.fixture(scope="module")
def llama_gqa():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = EarlyExitModel(LlamaForCausalLM(cfg).eval(), "all").eval()
    ids = torch.randint(3, 97, (3, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids[2, :5], mask[2, :5] = 0, 0
    return model, ids, mask


@pytest.mark.parametrize("mode", KV_MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_never_exiting_equals_transformers_generate_gpt2(gpt2, mode, batch):
    model, tok, enc = gpt2
    ids, mask = enc["input_ids"][-batch:], enc["attention_mask"][-batch:]
    eos = model.lm.generation_config.eos_token_id
    ref = model.lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    out = EarlyExitDecoder(model, never(), mode).generate(
        ids, mask, 16, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    # transformers stops once every row has hit EOS; we fill finished rows with padding up to 16
    assert torch.equal(out.sequences[:, : ref.shape[1]], ref)
    assert (out.sequences[:, ref.shape[1] :] == tok.pad_token_id).all()
    assert (out.exit_layers[out.exit_layers > 0] == 3).all()


@pytest.mark.parametrize("mode", KV_MODES)
def test_never_exiting_equals_transformers_generate_llama_gqa_padded(llama_gqa, mode):
    model, ids, mask = llama_gqa
    ref = model.lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    out = EarlyExitDecoder(model, never(), mode).generate(ids, mask, 12, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


def test_recompute_gives_the_full_models_kv_while_propagate_does_not(gpt2):
    model, tok, enc = gpt2
    pol = lambda: HiddenSign(threshold=0.5)  # noqa: E731
    outs = {
        m: EarlyExitDecoder(model, pol(), m).generate(
            enc["input_ids"], enc["attention_mask"], 24, pad_token_id=tok.pad_token_id
        )
        for m in KV_MODES
    }
    early = (outs["full"].exit_layers[:, 1:] < 3).float().mean()
    assert 0.1 < early < 0.9  # it really exits early, not always
    assert torch.equal(outs["recompute"].sequences, outs["full"].sequences)
    assert torch.equal(outs["recompute"].exit_layers, outs["full"].exit_layers)
    dec = EarlyExitDecoder(model, pol(), "recompute")
    dec.generate(enc["input_ids"], enc["attention_mask"], 24, pad_token_id=tok.pad_token_id)
    ref = EarlyExitDecoder(model, pol(), "full")
    ref.generate(enc["input_ids"], enc["attention_mask"], 24, pad_token_id=tok.pad_token_id)
    filled = dec.cache["valid"][2] & ref.cache["valid"][2]
    assert filled.sum() > 0
    assert torch.allclose(
        dec.cache["k"][2].transpose(1, 2)[filled],
        ref.cache["k"][2].transpose(1, 2)[filled],
        atol=1e-5,
    )
    prop = EarlyExitDecoder(model, pol(), "propagate")
    prop.generate(enc["input_ids"], enc["attention_mask"], 24, pad_token_id=tok.pad_token_id)
    differs = ~torch.isclose(prop.cache["k"][2], ref.cache["k"][2], atol=1e-4).all(-1).all(
        1
    )  # [B, T] slots whose layer-3 keys differ
    assert differs.any()  # the propagated keys come from the exited (shallower) state


@pytest.mark.parametrize("mode", KV_MODES)
def test_per_row_exits_in_a_batch(gpt2, mode):
    """Rows that exit stop computing (the decoder compacts the active rows layer by layer); each
    row's tokens and exits equal that row decoded alone, in every KV mode."""
    model, tok, enc = gpt2
    out = EarlyExitDecoder(model, HiddenSign(threshold=0.5), mode).generate(
        enc["input_ids"], enc["attention_mask"], 20, pad_token_id=tok.pad_token_id
    )
    layers = out.exit_layers[:, 1:]
    # in one step, rows exit at different layers (no waiting for the slowest row)
    assert any(len(set(layers[:, s].tolist())) > 1 for s in range(layers.shape[1]))
    # each row, generated alone, takes the same exits (rows do not influence each other)
    for b in range(3):
        n = int(enc["attention_mask"][b].sum())
        alone = EarlyExitDecoder(model, HiddenSign(threshold=0.5), mode).generate(
            enc["input_ids"][b : b + 1, -n:], None, 20, pad_token_id=tok.pad_token_id
        )
        assert torch.equal(alone.exit_layers[0], out.exit_layers[b])
        assert torch.equal(alone.new_tokens[0], out.new_tokens[b])


def test_sampling_is_seeded(gpt2):
    model, tok, enc = gpt2
    dec = EarlyExitDecoder(model, make_policy("margin", 0.2), "propagate")
    a = dec.generate(
        enc["input_ids"], enc["attention_mask"], 10, do_sample=True, top_k=20, seed=3
    ).new_tokens
    b = dec.generate(
        enc["input_ids"], enc["attention_mask"], 10, do_sample=True, top_k=20, seed=3
    ).new_tokens
    c = dec.generate(
        enc["input_ids"], enc["attention_mask"], 10, do_sample=True, top_k=20, seed=4
    ).new_tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decoder_errors(gpt2):
    model = gpt2[0]
    with pytest.raises(EexitError, match="unknown KV mode"):
        EarlyExitDecoder(model, never(), "copy")
    with pytest.raises(EexitError, match="cannot decide during decoding"):
        EarlyExitDecoder(model, make_policy("oracle"), "full")


def test_evaluate_generate_reports_speed_compute_and_agreement(tiny_checkpoint, tmp_path):
    import json

    from tests.conftest import run_cli

    code, out, err = run_cli(
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--generate",
        "--policy",
        "max-prob",
        "--threshold",
        "1.0",
        "--kv",
        "recompute",
        "--prompts",
        "2",
        "--prompt-len",
        "6",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "1",
        "--out",
        str(tmp_path / "g"),
    )
    assert code == 0, err
    rows = json.loads((tmp_path / "g" / "generation.json").read_text())
    total = rows[-1]
    assert (
        total["sample"] == "total" and total["agreement_pct"] == 100.0
    )  # never exits -> identical output
    assert total["mean_exit_layer"] == 3.0 and total["tokens_per_s"] > 0
    assert all(r["agreement_pct"] == 100.0 and r["identical_prefix"] == 8 for r in rows[:-1])
    code, _, err = run_cli(
        "evaluate", "--model", str(tiny_checkpoint), "--generate", "--kv", "copy", "--prompts", "1"
    )
    assert code == 2 and "unknown KV mode" in err


@pytest.mark.parametrize(
    "name,params,min_exit",
    [
        ("max-prob", {}, 1),
        ("saturation", {}, 1),
        ("saturation", {}, 3),
        ("patience", {"patience": 1}, 3),
        ("heuristic", {}, 4),
        ("topk-saturation", {"k": 1}, 3),
        ("margin", {}, 2),
    ],
)
def test_decoding_with_full_kv_takes_the_exits_evaluate_predicts(name, params, min_exit):
    """Decoding (full KV) and the teacher-forced evaluation table agree on every exit, for stateless
    and
    stateful policies, with and without a minimum exit layer."""
    from eexit.evaluation.records import collect_exit_table, exit_indices

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = EarlyExitModel(LlamaForCausalLM(cfg).eval(), "all").eval()
    prompt = torch.randint(0, 50, (1, 5))
    probe = make_policy(name, 0.5, min_exit, **params)
    seq = EarlyExitDecoder(model, None, "full").generate(prompt, None, 24).sequences
    table = collect_exit_table(model, seq[:, :-1], seq[:, 1:], probe)
    scores = table.score[:-1][(table.score[:-1] > 0) & (table.score[:-1] < 1)]
    thr = (
        float(scores.median()) if len(scores) else 0.5
    )  # exits for about half of the positive scores
    pol = make_policy(name, thr, min_exit, **params)
    out = EarlyExitDecoder(model, pol, "full").generate(prompt, None, 24)
    # with full KV every token's states equal a teacher-forced forward over the decoded sequence
    x = out.sequences[:, :-1]
    table = collect_exit_table(
        model, x, out.sequences[:, 1:], make_policy(name, thr, min_exit, **params)
    )
    predicted = torch.tensor(table.exit_layers)[exit_indices(table, pol)]
    decoded = out.exit_layers[0, 1:]  # new token t+1 comes from position prompt_len - 1 + t
    assert torch.equal(predicted[prompt.shape[1] :], decoded)
    assert 0 < (decoded < 6).sum() or pol.threshold_free
