"""Early exit inside lm-evaluation-harness, offline on a local task the test writes: never
exiting reproduces lm-eval's own `hf` model; exiting at layer 1 gives layer 1's numbers."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from eexit.integrations.lm_eval_harness import EexitLM, run_harness  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

QUESTIONS = [
    ("The history of the", ["war", "banana", "seven"], 0),
    ("It was described by", ["William", "table", "blue"], 0),
    ("The movement grew in the", ["nineteenth", "spoon", "yellow"], 0),
    ("He was born in", ["the", "quickly", "of"], 0),
    ("The city is the capital of", ["the", "run", "very"], 0),
    ("In the early years of the", ["century", "green", "sing"], 0),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "mc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return d


def loglikelihoods(res) -> list[float]:
    return [float(r[0][0]) for s in res["samples"]["tiny_mc"] for r in s["resps"]]


def test_never_exit_reproduces_the_hf_model(tiny_checkpoint, task_dir):
    from lm_eval.models.huggingface import HFLM

    ours = EexitLM(pretrained=str(tiny_checkpoint), threshold=1.0)
    rows, stats, res = run_harness(ours, ["tiny_mc"], str(task_dir), None)
    hf = HFLM(pretrained=str(tiny_checkpoint), device="cpu", batch_size=1)
    from lm_eval.tasks import TaskManager

    ref = lm_eval.simple_evaluate(
        model=hf, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(task_dir))
    )
    assert res["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
    assert res["results"]["tiny_mc"]["acc_norm,none"] == ref["results"]["tiny_mc"]["acc_norm,none"]
    ll, ll_ref = loglikelihoods(res), loglikelihoods(ref)
    assert len(ll) == 18 and max(abs(a - b) for a, b in zip(ll, ll_ref)) < 1e-4
    assert stats["loglikelihood_compute_pct"] == 100.0 and rows[0]["task"] == "tiny_mc"


def test_exiting_at_layer_one_gives_layer_one_loglikelihoods(tiny_checkpoint):
    ours = EexitLM(pretrained=str(tiny_checkpoint), policy="max-prob", threshold=0.0)

    class Req:
        def __init__(self, *args):
            self.args = args

    ((ll, _),) = ours.loglikelihood([Req("The history of the", " war of")])
    ctx, cont = ours._pair("The history of the", " war of")
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        states = ours.model(ids[:, :-1])
        logp = torch.log_softmax(ours.model.exit_logits(states[0], 1).float(), -1)[0]
    expect = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(expect, abs=1e-4)
    assert ours.early_exit_stats()["loglikelihood_compute_pct"] == pytest.approx(100 / 3)


def test_generate_until_cuts_at_the_stop_strings(tiny_checkpoint):
    ours = EexitLM(pretrained=str(tiny_checkpoint), threshold=1.0)

    class Req:
        def __init__(self, *args):
            self.args = args

    (free,) = ours.generate_until([Req("The history of the", {"max_gen_toks": 12})])
    assert free and len(ours._encode(free)) <= 12
    stop = free.strip().split()[1] if len(free.split()) > 1 else free.strip()[:2]
    (cut,) = ours.generate_until([Req("The history of the", {"until": [stop], "max_gen_toks": 12})])
    assert stop not in cut and free.startswith(cut)
    assert ours.early_exit_stats()["generation_tokens"] > 0


def test_the_cli_shortcut_writes_its_table(tiny_checkpoint, task_dir, tmp_path):
    out = tmp_path / "lm"
    code, stdout, err = run_cli(
        "lm-eval",
        "--model",
        str(tiny_checkpoint),
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(task_dir),
        "--policy",
        "max-prob",
        "--threshold",
        "0.0",
        "--out",
        str(out),
    )
    assert code == 0, err
    row = json.loads((out / "lm_eval.json").read_text())[0]
    assert row["task"] == "tiny_mc" and 0 <= row["acc"] <= 1
    assert row["loglikelihood_compute_pct"] == pytest.approx(100 / 3)
    assert row["loglikelihood_exit@1_pct"] == 100.0
