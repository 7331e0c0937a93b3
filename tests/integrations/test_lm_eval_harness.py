"""Early exit inside lm-evaluation-harness, offline on local tasks the test writes: never
exiting reproduces lm-eval's own `hf` model; exiting at layer 1 gives layer 1's numbers; batches
give the numbers of one request at a time; generation stops at the `until` strings; bad input is
one line before the model loads; two processes give the metrics and exit statistics of one."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from eexit.errors import EexitError  # noqa: E402
from eexit.integrations import lm_eval_harness  # noqa: E402
from eexit.integrations.lm_eval_harness import EexitLM, run_harness  # noqa: E402
from eexit.integrations.lm_eval_tasks import task_manager  # noqa: E402
from tests.conftest import message_lines, run_cli  # noqa: E402

QUESTIONS = [
    ("The history of the", ["war", "banana", "seven"], 0),
    ("It was described by", ["William", "table", "blue"], 0),
    ("The movement grew in the", ["nineteenth", "spoon", "yellow"], 0),
    ("He was born in", ["the", "quickly", "of"], 0),
    ("The city is the capital of", ["the", "run", "very"], 0),
    ("In the early years of the", ["century", "green", "sing"], 0),
]
# the tiny model's max-prob scores lie around 0.006-0.007: this threshold exits at every layer
MIXED = 0.0066


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
    # indexed (it has a name) but cannot be built: an output type lm-eval does not have
    (d / "broken.yaml").write_text(f"""task: tiny_broken
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choise
""")
    (d / "unparsable.yaml").write_text("task: tiny_unparsable\ndataset_path: [json\n")
    return d


def loglikelihoods(res) -> list[float]:
    return [float(r[0][0]) for s in res["samples"]["tiny_mc"] for r in s["resps"]]


def request(kind: str, args: tuple, i: int) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1))


PAIRS = [
    ("The history of the", " war"),
    ("It was described by", " William of Orange"),
    ("The movement grew in the", " nineteenth century"),
    ("He was born in ", "the"),  # the context's trailing space moves to the continuation
    ("The city is the capital of the", " north"),
    ("", "In the early years"),  # empty context: the end-of-text token before it
    ("In the early years of the twentieth century the", " war ended"),
    ("A", " man"),
    ("The war ended when the army of the north came back to the city", " and"),
    ("He", " was born in the city of the north in the early years"),
]


def test_never_exit_reproduces_the_hf_model(tiny_checkpoint, task_dir):
    from lm_eval.models.huggingface import HFLM

    ours = EexitLM(pretrained=str(tiny_checkpoint), threshold=1.0, batch_size=8)
    rows, stats, res = run_harness(ours, ["tiny_mc"], str(task_dir), None)
    hf = HFLM(pretrained=str(tiny_checkpoint), device="cpu", batch_size=1)
    ref = lm_eval.simple_evaluate(
        model=hf, tasks=["tiny_mc"], task_manager=task_manager(str(task_dir.resolve()))
    )
    assert res["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
    assert res["results"]["tiny_mc"]["acc_norm,none"] == ref["results"]["tiny_mc"]["acc_norm,none"]
    ll, ll_ref = loglikelihoods(res), loglikelihoods(ref)
    assert len(ll) == 18 and max(abs(a - b) for a, b in zip(ll, ll_ref)) < 1e-4
    assert stats["loglikelihood_compute_pct"] == 100.0 and rows[0]["task"] == "tiny_mc"


def test_exiting_at_layer_one_gives_layer_one_loglikelihoods(tiny_checkpoint):
    ours = EexitLM(pretrained=str(tiny_checkpoint), policy="max-prob", threshold=0.0)
    ((ll, _),) = ours.loglikelihood([request("loglikelihood", ("The history of the", " war"), 0)])
    ctx, cont = ours._pair("The history of the", " war")
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        states = ours.model(ids[:, :-1])
        logp = torch.log_softmax(ours.model.exit_logits(states[0], 1).float(), -1)[0]
    expect = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(expect, abs=1e-4)
    assert ours.early_exit_stats()["loglikelihood_compute_pct"] == pytest.approx(100 / 3)


def test_batches_of_eight_give_the_numbers_of_one_request_at_a_time(tiny_checkpoint):
    """Sorted longest first, right-padded, 8 per exit table: every per-request loglikelihood,
    greedy flag and exit count equals batch 1's, in the request order; rolling loglikelihoods
    (several windows per text, all texts' windows batched together) too."""
    reqs = [request("loglikelihood", pair, i) for i, pair in enumerate(PAIRS)]
    text = " ".join(c + x for c, x in PAIRS)
    rolling = [request("loglikelihood_rolling", (text[:n],), i) for i, n in enumerate((9, 70, 200))]
    out = {}
    for size in (1, 8):
        lm = EexitLM(pretrained=str(tiny_checkpoint), threshold=MIXED, batch_size=size)
        t0 = time.perf_counter()
        out[size] = (lm.loglikelihood(reqs), lm.loglikelihood_rolling(rolling))
        print(f"batch {size}: {time.perf_counter() - t0:.3f} s")
        out[size] += (lm.early_exit_stats(),)
        assert lm.max_length == 32 and len(lm._encode(text[:200])) > 2 * 32  # several windows
    (one, roll_one, stats_one), (eight, roll_eight, stats_eight) = out[1], out[8]
    diff = max(abs(a[0] - b[0]) for a, b in zip(one, eight))
    roll_diff = max(abs(a - b) for a, b in zip(roll_one, roll_eight))
    print(f"max |batch 8 - batch 1|: loglikelihood {diff:.2e}, rolling {roll_diff:.2e}")
    assert len(eight) == len(PAIRS) and diff < 1e-5 and roll_diff < 1e-5
    assert [a[1] for a in one] == [b[1] for b in eight]
    assert stats_one == stats_eight
    shares = [stats_one[f"loglikelihood_exit@{layer}_pct"] for layer in (1, 2, 3)]
    assert sum(s > 0 for s in shares) >= 2  # the threshold really mixes the exits
    # the order is the requests' own: the first pair's number does not move when it is last
    lm = EexitLM(pretrained=str(tiny_checkpoint), threshold=MIXED, batch_size=8)
    again = lm.loglikelihood(reqs[::-1])
    assert max(abs(a[0] - b[0]) for a, b in zip(again[::-1], one)) < 1e-5
    assert all(ll < 0 for ll, _ in one) and all(r < 0 for r in roll_one)
    # lm-eval pads a short process's list with its last request again: not counted twice
    assert EexitLM._counted([reqs[0], reqs[1], reqs[1], reqs[1]]) == [True, True, False, False]


def test_generation_stops_at_the_until_strings_and_batches(tiny_checkpoint):
    ours = EexitLM(pretrained=str(tiny_checkpoint), threshold=1.0, batch_size=4)
    prompts = ["The history of the", "It", "He was born in the city of", "A", "The war"]
    free = ours.generate_until(
        [request("generate_until", (p, {"max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    )
    assert all(free) and all(len(ours._encode(f)) <= 12 for f in free)
    one = EexitLM(pretrained=str(tiny_checkpoint), threshold=1.0, batch_size=1)
    assert (
        one.generate_until(
            [request("generate_until", (p, {"max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
        )
        == free
    )  # left-padded batches of 4 decode as one prompt at a time
    stop = free[0][2:4]
    before = ours.early_exit_stats()["generation_tokens"]
    (cut,) = ours.generate_until(
        [request("generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 12}), 0)]
    )
    made = ours.early_exit_stats()["generation_tokens"] - before
    assert stop not in cut and cut == free[0][: free[0].index(stop)]
    # the decoder stopped once the text held the stop string, not after 12 tokens
    assert made == len(ours._encode(free[0][: free[0].index(stop) + len(stop)])) < 12


def test_unknown_model_args_are_refused_by_name(tiny_checkpoint, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lm_eval_harness, "load_model", no_load)
    make = lm_eval.api.registry.get_model("eexit").create_from_arg_string
    extra = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}  # what lm-eval adds
    cases = {
        "treshold=0.5": "unknown model_args key 'treshold' (did you mean 'threshold'?)",
        "kv=fast": "unknown KV mode 'fast'",
        "policy=max-prb": "did you mean 'max-prob'",
        "threshold=1.5": "threshold must be in [0, 1]",
        "min_exit_layer=two": "min_exit_layer must be an integer",
        "batch_size=auto": "no memory probe",
        "dtype=float8": "unknown --dtype 'float8'",
    }
    for arg, expect in cases.items():
        with pytest.raises(EexitError) as e:
            make(f"pretrained={tiny_checkpoint},{arg}", extra if "batch_size" not in arg else {})
        assert expect in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2
    with pytest.raises(EexitError, match="valid: batch_size, device, dtype, kv, max_length"):
        make(f"pretrained={tiny_checkpoint},trust_remote_code=True", extra)
    # lm-eval's CLI passes its own batch_size and device: in --model_args they are one line
    args = ["--model", "eexit", "--model_args", f"pretrained={tiny_checkpoint},batch_size=8"]
    assert lm_eval_harness.main([*args, "--tasks", "tiny_mc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: give batch_size as lm-eval's --batch_size, not in --model_args (lm-eval passes "
        "its own)"
    )
    # --limit 0 (lm-eval: a ValueError traceback) is one line too, before any work
    good = ["--model", "eexit", "--model_args", f"pretrained={tiny_checkpoint}"]
    for limit in (["--limit", "0"], ["--limit=-1"], ["-L", "x"]):
        assert lm_eval_harness.main([*good, "--tasks", "tiny_mc", *limit]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --limit must be"), err


def test_bfloat16_runs_on_the_cpu_close_to_float32(tiny_checkpoint, task_dir, tmp_path):
    reqs = [request("loglikelihood", pair, i) for i, pair in enumerate(PAIRS)]
    f32 = EexitLM(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32", batch_size=4)
    bf16 = EexitLM(pretrained=str(tiny_checkpoint), device="cpu", dtype="bfloat16", batch_size=4)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a, b = f32.loglikelihood(reqs), bf16.loglikelihood(reqs)
    assert all(torch.isfinite(torch.tensor(ll)) for ll, _ in b)
    rel = max(abs(x[0] - y[0]) / abs(x[0]) for x, y in zip(a, b))
    print(f"bfloat16 vs float32: max relative difference {rel:.2e}")
    assert 0 < rel < 0.02
    # the CLI, in bfloat16, batched, records where it ran
    out = tmp_path / "lm"
    code, _, err = run_cli(
        "lm-eval", "--model", str(tiny_checkpoint), "--tasks", "tiny_mc",
        "--include-path", str(task_dir), "--policy", "max-prob", "--threshold", "0.0",
        "--dtype", "bfloat16", "--device", "cpu", "--batch-size", "4", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    row = json.loads((out / "lm_eval.json").read_text())[0]
    assert row["task"] == "tiny_mc" and 0 <= row["acc"] <= 1
    assert row["loglikelihood_compute_pct"] == pytest.approx(100 / 3)
    assert row["loglikelihood_exit@1_pct"] == 100.0 and row["loglikelihood_tokens"] > 0
    config = json.loads((out / "provenance.json").read_text())["config"]
    assert config["runtime"]["dtype"] == "bfloat16" and config["runtime"]["device"] == "cpu"
    assert config["batch_size"] == 4 and config["max_length"] == 32


BEFORE_LOADING = [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--include-path", "/no/such/folder"], "--include-path /no/such/folder: no such folder"),
    (["--tasks", "tiny_mcc"], "unknown lm-eval task 'tiny_mcc' (did you mean 'tiny_mc'?)"),
    (["--tasks", "tiny_unparsable"], "unreadable YAML under --include-path: unparsable.yaml"),
    (["--tasks", "tiny_broken"], "lm-eval task tiny_broken: ValueError: Got invalid output_type"),
    (["--kv", "fast"], "unknown KV mode 'fast'"),
    (["--policy", "max-prb"], "unknown policy 'max-prb' (did you mean 'max-prob'?)"),
    (["--threshold", "1.5"], "threshold must be in [0, 1]"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-length", "1"], "max_length must be >= 2"),
    (["--dtype", "float8"], "unknown --dtype 'float8'"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
]
if not torch.cuda.is_available():
    BEFORE_LOADING.append((["--device", "cuda"], "no CUDA GPU"))


def lm_eval_cli(checkpoint, task_dir, *extra: str):
    args = ["--model", str(checkpoint), "--tasks", "tiny_mc", "--include-path", str(task_dir)]
    for flag in ("--tasks", "--include-path"):  # a case's own value replaces the default one
        if flag in extra:
            i = args.index(flag)
            del args[i : i + 2]
    return run_cli("lm-eval", *args, *extra)


def test_bad_input_is_one_line_before_the_model_loads(tiny_checkpoint, task_dir, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lm_eval_harness, "load_model", no_load)
    for extra, expect in BEFORE_LOADING:
        code, out, err = lm_eval_cli(tiny_checkpoint, task_dir, *extra)
        lines = message_lines(err)
        assert code == 2, (extra, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
        assert "Traceback" not in err and not out


def test_depth_checks_come_after_the_load_and_before_any_request(
    tiny_checkpoint, task_dir, monkeypatch
):
    def no_run(*args, **kwargs):
        raise AssertionError("the harness ran")

    monkeypatch.setattr(lm_eval, "simple_evaluate", no_run)
    for extra, expect in (
        (["--min-exit-layer", "4"], "--min-exit-layer 4 is beyond the model's 3 layers"),
        (["--max-length", "64"], "max_length 64 is beyond the model's 32 positions"),
    ):
        code, _, err = lm_eval_cli(tiny_checkpoint, task_dir, *extra)
        lines = message_lines(err)
        assert code == 2 and len(lines) == 1 and expect in lines[0], err


@pytest.mark.slow
def test_two_processes_give_the_metrics_and_exit_statistics_of_one(
    tiny_checkpoint, task_dir, tmp_path
):
    """`accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo) through lm-eval's own
    CLI: lm-eval gives each process its documents (5 of 6: 3 and 2, the short process padded
    with copies of its last request); metrics equal one process's, and the exit statistics,
    summed over the processes without the padding, too."""
    ours = EexitLM(pretrained=str(tiny_checkpoint), threshold=MIXED)
    _, stats, res = run_harness(ours, ["tiny_mc"], str(task_dir), 5)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
            "--num_processes", "2", "--main_process_port", "29531",
            "-m", "eexit.integrations.lm_eval_harness", "--model", "eexit",
            "--model_args", f"pretrained={tiny_checkpoint},threshold={MIXED}",
            "--tasks", "tiny_mc", "--include_path", str(task_dir), "--limit", "5",
            "--device", "cpu", "--output_path", str(tmp_path / "two"),
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("eexit early exit: ")]
    two_stats = json.loads(line.removeprefix("eexit early exit: "))
    (path,) = (tmp_path / "two").rglob("results_*.json")
    two = json.loads(path.read_text())["results"]["tiny_mc"]
    one = res["results"]["tiny_mc"]
    assert two["acc,none"] == one["acc,none"] and two["acc_norm,none"] == one["acc_norm,none"]
    assert two_stats == pytest.approx(stats)
    assert stats["loglikelihood_tokens"] > 0 and 0 < stats["loglikelihood_exit@1_pct"] < 100


@pytest.mark.slow
def test_two_processes_exit_cleanly_every_time(tiny_checkpoint, task_dir, tmp_path):
    """The data-parallel module entry tears its process group down before exit: five runs in a
    row, each exit 0 with no process aborting ("terminate called without an active
    exception" came in 2 of 4 runs before)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for run in range(5):
        proc = subprocess.run(
            [
                sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
                "--num_processes", "2", "--main_process_port", str(29541 + run),
                "-m", "eexit.integrations.lm_eval_harness", "--model", "eexit",
                "--model_args", f"pretrained={tiny_checkpoint}",
                "--tasks", "tiny_mc", "--include_path", str(task_dir), "--limit", "2",
                "--device", "cpu", "--output_path", str(tmp_path / f"run{run}"),
            ],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, f"run {run}: {proc.stderr[-2000:]}"
        assert "terminate called" not in proc.stderr, f"run {run}: {proc.stderr[-2000:]}"
