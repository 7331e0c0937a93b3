"""What every evaluation works on, resolved once: the request (what the user asked), then the
model, its tokenizer and checkpoint metadata, the bound policy and the dataset.

`EvalRequest` is built by keyword by the CLI (or a script); `open_context` loads the model once,
reads the checkpoint's metadata once (`CheckpointInfo`), fills the defaults from the training
config (dataset, window, task lengths) and binds the policy (learned policies load their
classifier from beside the checkpoint). The inputs of teacher-forced passes (`lm_windows`,
`task_pairs`) come from here too, for evaluation, calibration and analysis alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eexit.data import corpora
from eexit.data.task_data import TASK_DATA, task_split
from eexit.data.tasks import get_task
from eexit.errors import EexitError
from eexit.models.checkpoint import CheckpointInfo
from eexit.models.identity import check_identity
from eexit.models.loading import load_model
from eexit.policies import ExitPolicy, make_policy
from eexit.reporting import portable
from eexit.runtime import LOCAL, Runtime, resolve_runtime, runtime_of

DEFAULT_DATASET = "wiki-gensim"


@dataclass(kw_only=True)
class EvalRequest:
    model: str  # eexit checkpoint folder, HF folder / hub name, or .gguf file
    policy: str = "max-prob"  # exit policy (eexit.policies)
    thresholds: list[float] = field(default_factory=lambda: [0.9])  # one row per threshold
    min_exit_layer: int = 1  # no exit below this layer
    policy_params: dict = field(default_factory=dict)  # e.g. {"layer": 2} for static
    dataset: str | None = None  # default: the checkpoint's training data, else wiki-gensim
    split: str = "test"
    seq_len: int | None = None  # LM window (default: the training one, else 128)
    max_tokens: int | None = None  # bound the evaluated targets
    batch_size: int = 8
    exit_layers: str | None = None  # override the checkpoint's exits ("all" or "1,3")
    device: str = "auto"  # auto (cuda, then mps, else cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bf16 on a GPU that has it, float32 on the CPU), float32, ...
    # set by `--calibrated DIR`: (DIR, the model identity its threshold was calibrated on)
    calibrated_on: tuple[str, dict] | None = None

    def describe(self) -> dict:
        """The request as provenance (JSON-ready; a calibration by its folder)."""
        out = {k: v for k, v in self.__dict__.items() if k != "calibrated_on"}
        out["calibrated"] = self.calibrated_on[0] if self.calibrated_on else None
        return out


@dataclass(kw_only=True)
class EvalContext:
    request: EvalRequest
    model: object  # EarlyExitModel
    tokenizer: object
    checkpoint: CheckpointInfo
    policy: ExitPolicy  # bound, at the request's first threshold
    dataset: str
    runtime: Runtime = LOCAL  # device, dtype, this process's shard

    @property
    def is_task(self) -> bool:
        return self.dataset in TASK_DATA

    def identity(self) -> dict:
        """The columns that say what a row is about (the same in every table)."""
        model = portable(self.request.model)  # package:file, or relative to the project
        return {"model": model, "policy": self.request.policy, "dataset": self.dataset}

    def resolved(self, **extra) -> dict:
        """Provenance of the run: the request with its defaults filled in."""
        r = self.request
        out = {**r.describe(), "dataset": self.dataset, "exit_layers": self.model.exit_layers}
        out["num_layers"] = self.model.num_layers
        out["trained_by"] = self.checkpoint.extra.get("command")  # the command that made it
        out["runtime"] = self.runtime.describe()  # device name, dtype, attention, processes
        return {**out, **extra}


def check_sizes(batch_size: int, max_tokens: int | None) -> None:
    if batch_size < 1:
        raise EexitError(f"--batch-size must be >= 1; got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise EexitError(f"--max-tokens must be >= 1; got {max_tokens}")


def make_bound_policy(r: EvalRequest, model, checkpoint: CheckpointInfo) -> ExitPolicy:
    """The request's policy at its first threshold, with what it loads for this model."""
    threshold = r.thresholds[0] if r.thresholds else 0.9
    policy = make_policy(r.policy, threshold, r.min_exit_layer, **(r.policy_params or {}))
    policy.bind(model, checkpoint.folder)
    return policy


def open_context(
    r: EvalRequest, model=None, tokenizer=None, bind: bool = True, runtime: Runtime | None = None
) -> EvalContext:
    """Resolve where the command runs (`runtime`, or the request's device and dtype), load (or
    reuse) the model there, read its checkpoint once, build the policy and the dataset."""
    check_sizes(r.batch_size, r.max_tokens)
    probe = make_policy(r.policy, 0.5, r.min_exit_layer, **(r.policy_params or {}))  # bad input
    if runtime is None:
        runtime = resolve_runtime(r.device, r.dtype) if model is None else runtime_of(model)
    if model is None:
        model, tokenizer, checkpoint = load_model(r.model, r.exit_layers, runtime)
    else:
        checkpoint = CheckpointInfo.read(r.model)
    if r.calibrated_on is not None:  # a threshold calibrated on other weights is refused
        check_identity(
            r.calibrated_on[1],
            model,
            f"the threshold at {r.calibrated_on[0]}",
            "calibrated",
            "calibrate it again on this model (eexit calibrate --policy ...)",
        )
    dataset = r.dataset or checkpoint.trained_dataset or DEFAULT_DATASET
    if r.min_exit_layer > model.num_layers:
        raise EexitError(
            f"--min-exit-layer {r.min_exit_layer} is beyond the model's {model.num_layers} layers"
        )
    probe.check_model(model)  # e.g. a shortlist beyond the vocabulary, before any work
    if bind:
        policy = make_bound_policy(r, model, checkpoint)
    else:
        policy = make_policy(r.policy, 0.5, r.min_exit_layer, **(r.policy_params or {}))
    return EvalContext(
        request=r,
        model=model,
        tokenizer=tokenizer,
        checkpoint=checkpoint,
        policy=policy,
        dataset=dataset,
        runtime=runtime,
    )


def max_positions(model) -> int | None:
    cfg = model.lm.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_task_fits(ctx: EvalContext, longest_prompt: int, answer: int, answer_option: str):
    """A decoder-only model reads prompt and answer as one sequence: a task whose longest prompt
    plus answer exceeds the model's positions is refused before any work (else an embedding
    index error midway)."""
    limit = max_positions(ctx.model)
    if ctx.model.is_seq2seq or not limit or longest_prompt + answer <= limit:
        return
    source = ctx.checkpoint.data.max_source_len
    if longest_prompt < limit:
        fix = f"set {answer_option} to at most {limit - longest_prompt}"
    else:
        fix = (
            "the prompts alone exceed it (sources are cut to data.max_source_len = "
            f"{source} tokens of the checkpoint's config): evaluate a model with more positions"
        )
    raise EexitError(
        f"{ctx.dataset}: prompts of up to {longest_prompt} tokens + answers of up to {answer} "
        f"({answer_option}) need {longest_prompt + answer} positions, beyond the model's "
        f"{limit}; {fix}"
    )


def lm_windows(ctx: EvalContext, split: str | None = None):
    """(inputs [N, T], targets [N, T], resolved settings): the split's text as LM windows."""
    r, model = ctx.request, ctx.model
    if model.is_seq2seq:
        raise EexitError(
            "an encoder-decoder model is evaluated on a task dataset "
            "(--dataset bible-en-fr, aclsum, wiki-cloze-qa, ...)"
        )
    split = split or r.split
    data = ctx.checkpoint.data
    seq_len = r.seq_len if r.seq_len is not None else data.seq_len
    limit = max_positions(model)
    if seq_len < 1 or (limit and seq_len > limit):
        raise EexitError(
            f"--seq-len must be in 1..{limit or 'inf'} (the model's positions); got {seq_len}"
        )
    # the training run's own split files, when evaluating on its data
    files = data.split_files() if ctx.dataset == ctx.checkpoint.trained_dataset else None
    corpus = corpora.load_corpus(ctx.dataset, data.text_field, files)
    docs = corpora.corpus_split(corpus, split, ctx.dataset, files)
    tokens = corpora.encode_documents(ctx.tokenizer, docs, f"{ctx.dataset}:{split}")
    x, y = corpora.eval_windows(tokens, seq_len, r.max_tokens)
    return x, y, ctx.resolved(split=split, seq_len=seq_len)


def task_pairs(ctx: EvalContext, split: str | None = None):
    """(EncodedPairs, None, resolved settings): the split's task examples teacher-forced
    (targets = the reference answers), whole examples up to --max-tokens."""
    from eexit.data.pairs import encode_pairs

    r, model = ctx.request, ctx.model
    split = split or r.split
    data = ctx.checkpoint.data
    task_name, examples = task_split(ctx.dataset, split)
    start = model.lm.config.decoder_start_token_id if model.is_seq2seq else None
    pairs = encode_pairs(
        ctx.tokenizer,
        get_task(task_name),
        examples,
        model.is_seq2seq,
        data.max_source_len,
        data.max_target_len,
        start,
    )
    if r.max_tokens:
        total, n = 0, 0
        while n < len(pairs) and total < r.max_tokens:
            total, n = total + len(pairs.targets[n]), n + 1
        pairs = pairs[:n]
    if len(pairs):  # teacher-forced: the prompt, then the answer (its final EOS is no input)
        answer = max(map(len, pairs.targets)) - 1
        check_task_fits(ctx, max(map(len, pairs.sources)), answer, "data.max_target_len")
    resolved = ctx.resolved(
        split=split,
        task=task_name,
        max_source_len=data.max_source_len,
        max_target_len=data.max_target_len,
    )
    return pairs, None, resolved


def teacher_forced_inputs(ctx: EvalContext, split: str | None = None):
    """(inputs, targets, resolved): LM windows, or the task pairs of a task dataset."""
    return task_pairs(ctx, split) if ctx.is_task else lm_windows(ctx, split)
