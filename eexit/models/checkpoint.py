"""A checkpoint's eexit metadata, read once into a typed object.

An eexit checkpoint is a `save_pretrained` folder (plain `transformers` loads the backbone) plus
`eexit.json` (exits, exit heads, halting gate, the training config and step) and
`exit_modules.safetensors` (separate exit heads, halting gate). Hub names, HF folders without
eexit.json and .gguf files have no metadata: every field then takes its default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from eexit.config import EXIT_HEADS, DataConfig, RunConfig, config_from_dict
from eexit.errors import EexitError

EEXIT_META = "eexit.json"
EXTRA_WEIGHTS = "exit_modules.safetensors"


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    spec: str  # what the user named: checkpoint folder, HF folder, hub name or .gguf file
    folder: Path | None = None  # the local folder (fitted classifiers are saved beside the model)
    exit_layers: list[int] | None = None  # None: every layer
    exit_heads: str = "shared"  # shared | separate
    halting_gate: bool = False  # trained with the ponder loss
    lens_rank: int = 0  # exit adapters (exit_heads lens): 0 = full affine, r = low rank
    train_config: RunConfig | None = None  # the config the checkpoint was trained with
    step: int | None = None
    extra: dict = field(default_factory=dict)  # other keys of eexit.json (final metrics, ...)

    @property
    def data(self) -> DataConfig:
        """The training data settings (dataset, window, task lengths), or the defaults."""
        return self.train_config.data if self.train_config else DataConfig()

    @property
    def trained_dataset(self) -> str | None:
        return self.train_config.data.dataset if self.train_config else None

    @classmethod
    def read(cls, spec: str) -> CheckpointInfo:
        path = Path(spec)
        folder = path if path.is_dir() else None
        meta_file = path / EEXIT_META if folder else None
        if meta_file is None or not meta_file.is_file():
            return cls(spec=spec, folder=folder)
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise EexitError(f"{meta_file} is not valid JSON ({str(e).splitlines()[0]})") from None
        known = {"exit_layers", "exit_heads", "halting_gate", "lens_rank", "train_config", "step"}
        check_fields(meta, meta_file)
        train = meta.get("train_config")
        try:
            cfg = config_from_dict(train) if train is not None else None
        except EexitError as e:
            raise EexitError(f"{meta_file}: train_config: {e}") from None
        return cls(
            spec=spec,
            folder=folder,
            exit_layers=meta.get("exit_layers"),
            exit_heads=meta.get("exit_heads", "shared"),
            halting_gate=meta.get("halting_gate", False),
            lens_rank=meta.get("lens_rank", 0),
            train_config=cfg,
            step=meta.get("step"),
            extra={k: v for k, v in meta.items() if k not in known},
        )


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# eexit.json's fields: (accepts, what is allowed); a missing field takes its default
META_FIELDS = {
    "exit_layers": (
        lambda v: (
            v is None
            or v == "all"
            or (isinstance(v, list) and bool(v) and all(_whole(x, 1) for x in v))
        ),
        'null, "all" or a non-empty list of layer numbers >= 1',
    ),
    "exit_heads": (lambda v: v in EXIT_HEADS, " or ".join(EXIT_HEADS)),
    "halting_gate": (lambda v: isinstance(v, bool), "true or false"),
    "lens_rank": (lambda v: _whole(v, 0), "a whole number >= 0"),
    "step": (lambda v: v is None or _whole(v, 0), "null or a whole number >= 0"),
    "train_config": (lambda v: v is None or isinstance(v, dict), "a mapping of config sections"),
    "final": (lambda v: v is None or isinstance(v, dict), "a mapping of metric -> value"),
    "command": (lambda v: v is None or isinstance(v, str), "a string"),
}


def check_fields(meta: dict, meta_file: Path) -> None:
    """A hand-edited or damaged eexit.json: one line naming the file, the field and what is
    allowed, instead of a traceback where the value is first used."""
    for key, (accepts, allowed) in META_FIELDS.items():
        if key in meta and not accepts(meta[key]):
            got = repr(meta[key])
            got = got if len(got) <= 80 else got[:77] + "..."
            raise EexitError(f"{meta_file}: field {key!r} must be {allowed}; got {got}")


def newest_checkpoint(root: Path) -> Path | None:
    """The most recently finished eexit checkpoint under `root` (eexit.json beside the weights),
    not counting the intermediate checkpoint-N folders of a run."""
    if not root.is_dir():
        return None
    found = [
        meta.parent
        for meta in root.glob(f"**/{EEXIT_META}")
        if not meta.parent.name.startswith(("checkpoint-", "."))
        and (meta.parent / "config.json").is_file()
    ]
    return max(found, key=lambda p: (p / EEXIT_META).stat().st_mtime, default=None)


def model_card(meta: dict, model_class: str) -> str:
    """README.md of a checkpoint: what it is, how it was trained, its exits and metrics."""
    cfg = meta.get("train_config") or {}
    model, data, loss, train = (cfg.get(k, {}) for k in ("model", "data", "loss", "train"))
    final = meta.get("final") or {}
    ppl = {k.split("@")[1]: v for k, v in final.items() if k.startswith("val_ppl@")}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [early-exit, eexit]",
        "---",
        f"# Early-exit {model.get('arch', model_class)} ({model_class})",
        "",
        "A `transformers` checkpoint trained with [eexit](https://pypi.org/project/eexit/): "
        "plain `AutoModelForCausalLM.from_pretrained` (or `AutoModelForSeq2SeqLM` for T5) loads "
        "the backbone; `eexit.json` and `exit_modules.safetensors` add the exits.",
        "",
        f"- exits after layers: {meta.get('exit_layers')} (heads: {meta.get('exit_heads')}; "
        f"halting gate: {meta.get('halting_gate')})",
    ]
    if cfg:
        lines += [
            f"- training: loss `{loss.get('name')}` {loss.get('params') or ''}, "
            f"{meta.get('step')} of {train.get('steps')} steps, batch {train.get('batch_size')}, "
            f"lr {train.get('lr')}, seed {cfg.get('seed')}",
            f"- data: `{data.get('dataset')}`, windows of {data.get('seq_len')} tokens",
        ]
        if model.get("pretrained"):  # the size fields of the config do not apply
            lines.append(f"- started from `{Path(model['pretrained']).name}` (pretrained)")
        else:
            lines.append(
                f"- size: {model.get('n_layers')} layers, d_model {model.get('d_model')}, "
                f"{model.get('n_heads')} heads, vocabulary {model.get('vocab_size')}"
            )
        if model.get("lora_rank"):
            lines.append(
                f"- LoRA rank {model['lora_rank']} (alpha {model.get('lora_alpha')}) on "
                f"{model.get('lora_targets')}, merged into these weights"
            )
        if train.get("layer_dropout"):
            lines.append(
                f"- layer dropout up to {train['layer_dropout']} "
                f"({train.get('layer_dropout_scale')} scale over depth)"
            )
    if ppl:
        shown = ", ".join(f"layer {k}: {v:.2f}" for k, v in ppl.items())
        lines.append(f"- validation perplexity per exit: {shown}")
    lines += [
        "",
        "Usage: `eexit evaluate --model <this folder> --policy margin --threshold 0.9`",
        "",
    ]
    return "\n".join(lines)
