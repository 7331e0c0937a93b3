"""Experiment configuration: YAML -> dataclasses, with `--set key=value` overrides.

Precedence: command line > YAML file > the defaults below. Unknown keys are errors
(with a "did you mean"), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eexit.errors import EexitError
from eexit.models.families import FAMILIES
from eexit.registry import unknown_name_error


@dataclass
class ModelConfig:
    # family built from scratch (eexit/models/families/): gpt2 | llama | qwen2 | t5 (t5: exits on
    # the decoder blocks)
    arch: str = "gpt2"
    pretrained: str | None = (
        None  # hub name, local HF folder or .gguf file (then the size fields are ignored)
    )
    n_layers: int = 4  # transformer blocks (t5: decoder blocks, the ones with exits)
    n_encoder_layers: int = 0  # t5: encoder blocks (0 = n_layers)
    d_model: int = 128  # hidden size
    n_heads: int = 4  # attention heads
    d_ff: int = 512  # MLP inner size
    max_len: int = 256  # longest sequence (position embeddings)
    vocab_size: int = 4096  # size of the BPE vocabulary trained on the training split
    exit_layers: Any = (
        "all"  # "all" or a list of 1-based layers, e.g. [1, 3]; the last layer is always an exit
    )
    min_exit_layer: int = 1  # exits below this layer are not created
    # shared: the model's final norm + LM head at every exit; separate: own norm + head per
    # exit; lens: an exit adapter (identity-initialised affine) before the shared norm + head
    exit_heads: str = "shared"
    dropout: float = 0.0  # dropout in attention / MLP / embeddings
    lens_rank: int = 0  # exit_heads lens: adapter rank (0 = full d x d affine)
    freeze_backbone: bool = False  # train only what eexit adds (exit adapters / heads / gate)
    # LoRA adapters on the backbone through peft (0 = off): the rest of the backbone is frozen;
    # checkpoints hold the merged weights (plain transformers loads them)
    lora_rank: int = 0
    lora_alpha: float = 16.0  # LoRA scale is lora_alpha / lora_rank
    lora_targets: Any = "all-linear"  # peft target_modules: "all-linear" or a list of names


@dataclass
class DataConfig:
    # LM corpus (see `eexit.data.corpora`), a hub dataset, a .txt/.jsonl file, or a task dataset
    # (see `eexit.data.task_data`)
    dataset: str = "wiki-gensim"
    seq_len: int = 128  # tokens per training / evaluation window
    text_field: str = "text"  # field holding the text (.jsonl / .csv / .parquet, hub)
    # your own splits: one local .txt / .jsonl / .csv / .parquet file each (else the dataset's
    # splits, or a 90/5/5 hash split of a single file)
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None

    def split_files(self) -> dict[str, str] | None:
        files = {
            "train": self.train_file,
            "validation": self.validation_file,
            "test": self.test_file,
        }
        return {k: v for k, v in files.items() if v} or None

    max_source_len: int = (
        192  # task datasets: source tokens kept (encoder input / the text inside the prompt)
    )
    max_target_len: int = (
        64  # task datasets: target tokens kept (training) / new tokens generated (evaluation)
    )


@dataclass
class LossConfig:
    name: str = "weighted-ce"  # training objective (see `eexit.training.losses`)
    exit_token_fraction: float = 1.0  # share of positions scored at intermediate exits (1 = exact)
    # the loss's own settings (its `Params` in eexit/training/losses.py), e.g. free-kd:
    # {kd_mapping: last, kd_weight: 1.0, shallow_layer: 4}; ponder: {ponder_beta: 0.01}
    params: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # global batch (split evenly over processes)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup
    weight_decay: float = 0.1  # AdamW weight decay (not on norms/biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas, each in [0, 1)
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    save_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    eval_every: int = 200  # steps between validation passes
    eval_batches: int = 8  # validation batches per pass
    log_every: int = 10  # steps between log lines in train_log.jsonl
    grad_accum_steps: int = 1  # micro-batches per step (same global batch, less memory)
    # tokens of exit logits computed at a time in the loss, recomputed in the backward pass
    # (memory follows the chunk, not exits x tokens x vocabulary); 0 = auto: whole while the
    # exits' float32 logits fit 1 GiB, else 256 MiB chunks
    logits_chunk_tokens: int = 0
    # recompute each block in the backward pass instead of keeping its activations
    # (transformers' gradient checkpointing; layer dropout included): less memory, more time
    activation_checkpointing: bool = False
    # LayerSkip layer dropout: a block is skipped per sequence with a rate rising with depth,
    # 0 at the first block and layer_dropout at the last (0 = off)
    layer_dropout: float = 0.0
    layer_dropout_scale: str = "exp"  # how the rate rises: exp | linear | uniform
    # experiment trackers through accelerate (e.g. [tensorboard], [wandb]); jsonl is always written
    report_to: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    run_name: str = "run"  # name of the run; default output folder is checkpoints/<run_name>
    seed: int = 0  # seeds model init, batch order and loss sampling
    out_dir: str | None = None  # where checkpoints and the final model go
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or f"checkpoints/{self.run_name}")


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML / --set value against the field's declared type (casting what is
    unambiguous: "3" -> 3, 1 -> 1.0); anything else is an error naming the key, the value and
    the type allowed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except EexitError as e:
                errors.append(str(e))
        raise EexitError(errors[0] + (" or null" if type(None) in args else ""))
    if value is None:
        raise EexitError(f"config key {key!r} must be {_type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise EexitError(f"config key {key!r} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float or "." in value or "e" in value else int(value)
            except ValueError:
                raise EexitError(f"config key {key!r} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EexitError(f"config key {key!r} must be a number, got {value!r}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise EexitError(f"config key {key!r} must be a whole number, got {value!r}")
            return int(value)
        if not math.isfinite(value):
            raise EexitError(f"config key {key!r} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise EexitError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    if origin is list or tp is list:
        if isinstance(value, str) and args == (str,):  # a list of names given as one string,
            value = [v.strip() for v in value.split(",") if v.strip()]  # "a" or "a,b" (HF's form)
        if not isinstance(value, list):
            raise EexitError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise EexitError(f"config key {key!r} must be a mapping, got {value!r}")
        return value
    return value


def fill_dataclass(obj, data: dict, prefix: str = ""):
    """Set the fields of dataclass `obj` from a mapping, strictly (unknown keys are errors with a
    "did you mean", values are cast to the field's type); returns `obj`."""
    _apply(obj, data, prefix)
    return obj


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise EexitError(
            f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {data!r}"
        )
    names = _field_names(obj)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise unknown_name_error("config key", full, [f"{prefix}{n}" for n in names])
        current = getattr(obj, key)
        tp = typing.get_type_hints(type(obj)).get(key, Any)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{full}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, {**current, **value})  # --set loss.params.a=1 --set loss.params.b=2
        else:
            setattr(obj, key, _coerce(value, tp, full))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise EexitError(f"--set expects key=value (e.g. train.lr=3e-4), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise EexitError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise EexitError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        raise EexitError(f"config file {p} is empty")
    if not isinstance(data, dict):
        raise EexitError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg = RunConfig()
    if path is not None:
        _apply(cfg, read_yaml(path))
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, nest(key, value))
    validate(cfg)
    check_new_run(cfg)
    return cfg


def check_new_run(cfg: RunConfig) -> None:
    """Rules for a run about to train that a saved config (a checkpoint's train_config, read by
    `config_from_dict`) is not held to, so that checkpoints of earlier versions still load."""
    m = cfg.model
    if m.lora_rank and m.freeze_backbone:
        raise EexitError(
            "model.lora_rank and model.freeze_backbone exclude each other: freezing the backbone "
            "freezes its LoRA adapters too (LoRA already freezes the rest of the backbone)"
        )
    if not m.pretrained:  # a pretrained model's depth and vocabulary are known once it loads
        check_exits(m, m.n_layers)
        if m.vocab_size < MIN_BPE_VOCAB:
            raise EexitError(
                f"model.vocab_size must be >= {MIN_BPE_VOCAB} (the byte-level BPE holds the 256 "
                f"bytes and the end-of-text token before any merge); got {m.vocab_size}"
            )


EXIT_HEADS = ("shared", "separate", "lens")
MIN_BPE_VOCAB = 257  # byte-level BPE: 256 byte tokens + the end-of-text token

# loss settings that earlier versions kept in LossConfig itself (older checkpoints' eexit.json)
LEGACY_LOSS_KEYS = {
    "free-kd": ("kd_mapping", "kd_weight", "shallow_layer"),
    "ponder": ("ponder_beta",),
}
LEGACY_ALL = tuple(k for keys in LEGACY_LOSS_KEYS.values() for k in keys)


def config_from_dict(data: dict) -> RunConfig:
    """A `RunConfig` from a saved config (a checkpoint's train_config), strictly checked."""
    data = {**data}
    loss = data.get("loss")
    if isinstance(loss, dict) and any(k in loss for k in LEGACY_ALL):
        own = LEGACY_LOSS_KEYS.get(loss.get("name"), ())
        moved = {k: loss[k] for k in own if loss.get(k) is not None}
        rest = {k: v for k, v in loss.items() if k not in LEGACY_ALL}
        params = rest.get("params", {})
        # params not a mapping: refused below, naming the key (not the legacy keys)
        data["loss"] = {**rest, "params": {**params, **moved}} if isinstance(params, dict) else rest
    cfg = RunConfig()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    m, t, lo = cfg.model, cfg.train, cfg.loss
    FAMILIES.get(m.arch)
    if m.n_encoder_layers < 0:
        raise EexitError(
            f"model.n_encoder_layers must be >= 0 (0 = n_layers); got {m.n_encoder_layers}"
        )
    if cfg.data.max_source_len < 1 or cfg.data.max_target_len < 1:
        raise EexitError("data.max_source_len and data.max_target_len must be positive")
    if m.exit_heads not in EXIT_HEADS:
        raise EexitError(f"model.exit_heads must be shared, separate or lens; got {m.exit_heads!r}")
    if m.lens_rank < 0:
        raise EexitError(f"model.lens_rank must be >= 0 (0 = full affine); got {m.lens_rank}")
    for name in ("n_layers", "d_model", "n_heads", "d_ff", "max_len", "vocab_size"):
        if getattr(m, name) <= 0:
            raise EexitError(f"model.{name} must be positive; got {getattr(m, name)}")
    if m.d_model % m.n_heads:
        raise EexitError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})"
        )
    if cfg.data.seq_len <= 1 or cfg.data.seq_len > m.max_len:
        raise EexitError(
            f"data.seq_len must be in 2..model.max_len ({m.max_len}); got {cfg.data.seq_len}"
        )
    if t.steps <= 0 or t.batch_size <= 0 or t.lr <= 0:
        raise EexitError("train.steps, train.batch_size and train.lr must be positive")
    for name in (
        "save_every",
        "eval_every",
        "log_every",
        "keep_checkpoints",
        "eval_batches",
        "warmup_steps",
        "grad_accum_steps",
    ):
        if getattr(t, name) < (0 if name == "warmup_steps" else 1):
            raise EexitError(
                f"train.{name} must be >= {0 if name == 'warmup_steps' else 1}; got "
                f"{getattr(t, name)}"
            )
    if t.logits_chunk_tokens < 0:
        raise EexitError(
            "train.logits_chunk_tokens must be >= 0 (tokens of exit logits at a time; 0 = auto); "
            f"got {t.logits_chunk_tokens}"
        )
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise EexitError(
            f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {t.betas}"
        )
    if not 0 <= t.min_lr_ratio <= 1:
        raise EexitError(f"train.min_lr_ratio must be in [0, 1]; got {t.min_lr_ratio}")
    if t.weight_decay < 0 or t.grad_clip < 0:
        raise EexitError("train.weight_decay and train.grad_clip must be >= 0 (grad_clip 0 = off)")
    if not 0 <= m.dropout < 1:
        raise EexitError(f"model.dropout must be in [0, 1); got {m.dropout}")
    if not 0 <= t.layer_dropout < 1:
        raise EexitError(f"train.layer_dropout must be in [0, 1); got {t.layer_dropout}")
    from eexit.training.layer_dropout import SCALES

    if t.layer_dropout_scale not in SCALES:
        raise EexitError(
            f"train.layer_dropout_scale must be one of {', '.join(SCALES)}; got "
            f"{t.layer_dropout_scale!r}"
        )
    check_lora(m)
    if m.min_exit_layer < 1:
        raise EexitError(f"model.min_exit_layer must be >= 1; got {m.min_exit_layer}")
    if cfg.seed < 0:
        raise EexitError(f"seed must be >= 0; got {cfg.seed}")
    if not 0 < lo.exit_token_fraction <= 1:
        raise EexitError(
            f"loss.exit_token_fraction must be in (0, 1]; got {lo.exit_token_fraction}"
        )


def check_lora(m: ModelConfig) -> None:
    """LoRA fields: rank >= 0 (0 = off), alpha > 0, targets "all-linear", a non-empty list of
    layer names or one name pattern (peft's regular expression over the full module names).
    Whether they match a layer is known once the model is built (`eexit.models.lora.add_lora`)."""
    if m.lora_rank < 0:
        raise EexitError(f"model.lora_rank must be >= 0 (0 = off); got {m.lora_rank}")
    if m.lora_alpha <= 0:
        raise EexitError(
            f"model.lora_alpha must be > 0 (the LoRA scale is lora_alpha / lora_rank); got "
            f"{m.lora_alpha}"
        )
    t = m.lora_targets
    names = isinstance(t, list) and t and all(isinstance(n, str) and n.strip() for n in t)
    if not names and not (isinstance(t, str) and t.strip()):
        raise EexitError(
            'model.lora_targets must be "all-linear" or a non-empty list of layer names, e.g. '
            f"[c_attn, c_proj] or [q_proj, v_proj]; got {t!r}"
        )


def resolve_exit_layers(spec, num_layers: int, min_exit_layer: int = 1) -> list[int]:
    """'all' or a list of 1-based layers -> sorted list that always ends with the last layer."""
    if spec in (None, "all"):
        layers = list(range(1, num_layers + 1))
    else:
        if isinstance(spec, str):
            try:
                spec = [int(s) for s in spec.replace(" ", "").split(",") if s]
            except ValueError:
                raise EexitError(
                    f"exit layers must be 'all' or a comma list of layer numbers, got {spec!r}"
                ) from None
        if isinstance(spec, int):
            spec = [spec]
        bad = [x for x in spec if not isinstance(x, int) or not 1 <= x <= num_layers]
        if bad:
            raise EexitError(f"exit layers must be integers in 1..{num_layers}; got {bad}")
        layers = sorted(set(spec))
    layers = [x for x in layers if x >= min_exit_layer]
    if num_layers not in layers:
        layers.append(num_layers)
    return layers


def check_exits(m: ModelConfig, depth: int) -> None:
    """model.exit_layers and model.min_exit_layer against the model's depth (the config's
    n_layers, or a pretrained model's once it loads): an exit setting beyond the depth would
    silently leave only the last exit."""
    if m.min_exit_layer > depth:
        raise EexitError(
            f"model.min_exit_layer {m.min_exit_layer} is beyond the model's {depth} layers; "
            f"choose 1..{depth}"
        )
    spec = m.exit_layers
    if not (spec == "all" or isinstance(spec, (str, list)) or type(spec) is int):
        raise EexitError(f"model.exit_layers must be 'all' or a list of layers; got {spec!r}")
    try:
        resolve_exit_layers(spec, depth, m.min_exit_layer)
    except EexitError as e:
        raise EexitError(f"model.exit_layers: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
