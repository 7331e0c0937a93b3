"""`eexit train`: setup -> run -> save, on `accelerate` (one process, or many via
`accelerate launch` / `torchrun --nproc_per_node N`).

Batches are a pure function of (seed, step): the global batch of step s is drawn by a generator
seeded with (seed, s) and each process takes its share, so a resumed run sees exactly the
batches an uninterrupted run would, and N processes see the same global batch as one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext

import torch
from torch import nn

from eexit.config import RunConfig, check_exits, to_dict
from eexit.data import corpora as data_mod
from eexit.data import pairs as pairs_mod
from eexit.errors import EexitError, Interrupted, TrainingDiverged
from eexit.files import WRITE_ERRNOS, FolderLock, atomic_json, write_error
from eexit.models.early_exit import EarlyExitModel, resolve_exit_layers
from eexit.models.families import FAMILIES
from eexit.models.loading import build_lm, load_model
from eexit.models.lora import add_lora, has_lora
from eexit.reporting import command_line, log, progress_bar
from eexit.runtime import check_launch, training_placement
from eexit.training.checkpointing import (
    ACCELERATE_STATE,
    RunFolder,
    check_output_dir,
    check_resumable,
    checkpoint_step,
    checkpoints,
    gathered_model_state,
    save_checkpoint,
    trim_log,
    use_hf_folder_for_weights,
)
from eexit.training.layer_dropout import install_layer_dropout, layer_dropout_rates
from eexit.training.losses import LossBatch, make_loss


class TrainingModule(nn.Module):
    """Model + loss in one forward, so data-parallel wrappers see every parameter use."""

    def __init__(self, model: EarlyExitModel, cfg: RunConfig):
        super().__init__()
        self.model = model
        self.exit_token_fraction = cfg.loss.exit_token_fraction
        self.loss_fn = make_loss(cfg.loss)
        self.total_steps = cfg.train.steps
        self.logits_chunk_tokens = cfg.train.logits_chunk_tokens
        t = cfg.train  # LayerSkip's layer dropout: skip rates rising with depth
        self.skip_rates = layer_dropout_rates(
            model.num_layers, t.layer_dropout, t.layer_dropout_scale
        )
        # installed for good (active while the model trains, not in validation): a block
        # recomputed in the backward pass (train.activation_checkpointing) must skip exactly
        # as in the forward pass
        self._skip_hooks = install_layer_dropout(
            model.parts.layers, self.skip_rates, lambda: model.training
        )
        if t.activation_checkpointing:  # transformers' own, per block (non-reentrant)
            if not getattr(model.lm, "supports_gradient_checkpointing", False):
                raise EexitError(
                    f"train.activation_checkpointing: {type(model.lm).__name__} does not support "
                    "gradient checkpointing in transformers; set it to false"
                )
            model.lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )

    def forward(self, inputs, targets, step: int = 0):
        if isinstance(inputs, dict):  # task pairs: padded, prompt positions ignored
            states, targets = pairs_mod.keep_labelled(self.model(**inputs), targets)
        else:
            states = self.model(inputs)
        batch = LossBatch(
            self.model,
            states,
            targets,
            self.exit_token_fraction,
            step,
            self.total_steps,
            self.logits_chunk_tokens,
        )
        return self.loss_fn(batch)


def lr_lambda(cfg) -> callable:
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


def prepare_data(cfg: RunConfig, tokenizer=None, seq2seq: bool = False):
    """(tokenizer, train, validation): token streams of an LM corpus, or `EncodedPairs` of a task
    dataset."""
    from eexit.data.task_data import TASK_DATA, load_task_data

    if cfg.data.dataset in TASK_DATA:
        return prepare_task_data(cfg, tokenizer, seq2seq, *load_task_data(cfg.data.dataset))
    if seq2seq:
        raise EexitError(
            "an encoder-decoder model trains on a task dataset (one of "
            f"{', '.join(TASK_DATA.names())}); got {cfg.data.dataset!r}"
        )
    files = cfg.data.split_files()
    corpus = data_mod.load_corpus(cfg.data.dataset, cfg.data.text_field, files)
    train_docs = data_mod.corpus_split(corpus, "train", cfg.data.dataset, files)
    val_docs = data_mod.corpus_split(corpus, "validation", cfg.data.dataset, files)
    if tokenizer is None:
        tokenizer = data_mod.train_tokenizer(train_docs, cfg.model.vocab_size)
    train = data_mod.encode_documents(tokenizer, train_docs, f"{cfg.data.dataset}:train")
    val = data_mod.encode_documents(tokenizer, val_docs, f"{cfg.data.dataset}:validation")
    return tokenizer, train, val


def prepare_task_data(cfg: RunConfig, tokenizer, seq2seq: bool, task_name: str, splits: dict):
    from eexit.data.tasks import get_task

    task, d = get_task(task_name), cfg.data
    train_ex, val_ex = splits.get("train") or [], splits.get("validation") or []
    if not train_ex or not val_ex:
        raise EexitError(f"task dataset {d.dataset!r} needs train and validation examples")
    if tokenizer is None:  # BPE on both sides of the training pairs
        texts = [task.source_text(e) for e in train_ex] + [e.target for e in train_ex]
        tokenizer = data_mod.train_tokenizer(texts, cfg.model.vocab_size)

    def encode(exs):
        return pairs_mod.encode_pairs(
            tokenizer, task, exs, seq2seq, d.max_source_len, d.max_target_len
        )

    train, val = encode(train_ex), encode(val_ex)
    longest = max(len(s) + len(t) for s, t in zip(train.sources, train.targets))
    fixed_positions = FAMILIES.get(cfg.model.arch).learned_positions and not cfg.model.pretrained
    if not seq2seq and fixed_positions and longest > cfg.model.max_len:
        raise EexitError(
            f"prompt + target reach {longest} tokens but model.max_len is {cfg.model.max_len}; "
            "raise model.max_len or lower data.max_source_len / data.max_target_len"
        )
    return tokenizer, train, val


def check_vocab(cfg: RunConfig, tokenizer) -> None:
    """The BPE learns at most as many tokens as its training text allows: a model.vocab_size it
    could not reach is refused (the checkpoint would record a size the model does not have)."""
    if len(tokenizer) < cfg.model.vocab_size:
        raise EexitError(
            f"model.vocab_size is {cfg.model.vocab_size} but the BPE tokenizer learned only "
            f"{len(tokenizer)} tokens from the training split of {cfg.data.dataset!r}; set "
            f"model.vocab_size <= {len(tokenizer)}"
        )


def build_model(
    cfg: RunConfig, tokenizer, pretrained: EarlyExitModel | None = None
) -> EarlyExitModel:
    """The model to train: the pretrained backbone when given, else a fresh one from the config."""
    if pretrained is not None:
        lm, depth = pretrained.lm, pretrained.num_layers
    else:
        lm, depth = (
            build_lm(cfg.model, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id),
            cfg.model.n_layers,
        )
    check_exits(cfg.model, depth)  # a pretrained model's depth is known now
    layers = resolve_exit_layers(cfg.model.exit_layers, depth, cfg.model.min_exit_layer)
    gate = make_loss(cfg.loss).needs_halting_gate
    model = EarlyExitModel(lm, layers, cfg.model.exit_heads, gate, cfg.model.lens_rank)
    if cfg.model.lora_rank:  # LoRA on the backbone; the rest of it frozen
        add_lora(model.lm, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    if cfg.model.freeze_backbone:  # only what eexit adds is trained: the full model is unchanged
        for param in model.lm.parameters():
            param.requires_grad_(False)
        if not any(p.requires_grad for p in model.parameters()):
            raise EexitError(
                "model.freeze_backbone leaves nothing to train: use model.exit_heads lens or "
                "separate (or a halting gate)"
            )
    return model


@torch.no_grad()
def validation_losses(model: EarlyExitModel, val: torch.Tensor, cfg: RunConfig) -> dict[str, float]:
    model.eval()
    sums = {l: 0.0 for l in model.exit_layers}
    n = 0
    for states, yb in _validation_batches(model, val, cfg):
        n += yb.numel()
        for l in model.exit_layers:
            logits = model.exit_logits(states[l - 1], l).float()
            sums[l] += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum"
            ).item()
    model.train()
    return {f"val_ce@{l}": s / n for l, s in sums.items()} | {
        f"val_ppl@{l}": math.exp(s / n) for l, s in sums.items()
    }


def _validation_batches(model, val, cfg: RunConfig):
    """(states, labels) of the validation batches; task pairs keep their labelled positions only."""
    bs, dev = cfg.train.batch_size, model.device
    if isinstance(val, pairs_mod.EncodedPairs):
        for inputs, y in pairs_mod.batches(val, bs, cfg.train.eval_batches * bs):
            yield pairs_mod.keep_labelled(
                model(**{k: v.to(dev) for k, v in inputs.items()}), y.to(dev)
            )
        return
    x, y = data_mod.eval_windows(
        val, cfg.data.seq_len, max_tokens=cfg.train.eval_batches * bs * cfg.data.seq_len
    )
    for i in range(0, len(x), bs):
        yield model(x[i : i + bs].to(dev)), y[i : i + bs].to(dev)


def run_training(
    cfg: RunConfig,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    show_progress: bool = True,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Train under a lock on the output folder; --overwrite replaces the old run only once the
    new one has a checkpoint; Ctrl-C says where the run stopped and how to resume."""
    if stop_after is not None and stop_after < 1:
        raise EexitError(f"--stop-after must be >= 1; got {stop_after}")
    placement = training_placement(device, dtype)  # refused before any work, like every command
    check_output_dir(cfg, resume, overwrite)
    out = cfg.output_dir
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
    staged = overwrite and not resume and out.is_dir() and any(out.iterdir())
    folder = RunFolder(out, staged, fresh=not resume)
    with FolderLock(out) if main else nullcontext():
        if main:  # holding the lock: what killed runs left here is nobody's work
            folder.clear_leftovers()
        if resume:  # before any work: a changed setting would make another run
            check_resumable(checkpoints(out)[-1], cfg)
        failed = True
        try:
            result = _train(cfg, folder, resume, stop_after, show_progress, placement)
            failed = False
            return result
        except KeyboardInterrupt:
            done = checkpoints(folder.path) if not folder.staged else []
            where = (
                f"the newest checkpoint is {done[-1]}; continue with the same command and --resume"
                if done
                else f"no checkpoint of this run was written; {out} is as it was before"
            )
            raise Interrupted(f"training interrupted: {where}") from None
        finally:
            if main:
                folder.abandon(failed)  # no-op once the new run has a checkpoint


def _train(
    cfg: RunConfig, folder: RunFolder, resume, stop_after, show_progress, placement: dict
) -> dict:
    from accelerate import Accelerator
    from safetensors.torch import load_file

    # ---- setup
    check_trackers(cfg.train.report_to)
    make_loss(
        cfg.loss
    )  # unknown loss ("did you mean") or bad loss.params: an error before any work
    # where it runs: `runtime.training_placement` (--device / --dtype); accelerate takes a
    # multi-process run without GPUs only with cpu=True
    from accelerate.utils import DistributedDataParallelKwargs

    if placement["cuda_index"] is not None:
        torch.cuda.set_device(placement["cuda_index"])
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # one process: this run's own settings,
        from accelerate.state import AcceleratorState  # not an earlier run's in this process

        AcceleratorState._reset_state(reset_partial_state=False)
    precision = (
        {"mixed_precision": placement["mixed_precision"]} if placement["mixed_precision"] else {}
    )
    # exits / heads a loss does not use get no gradient: let DDP tolerate that
    acc = Accelerator(
        cpu=placement["cpu"],
        **precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=cfg.train.report_to or None,
        project_dir=str(folder.out / "logs"),
    )
    world, rank = acc.num_processes, acc.process_index
    check_launch(world, "train")
    accum = cfg.train.grad_accum_steps
    if (cfg.train.batch_size // max(1, world)) % accum:
        raise EexitError(
            f"the per-process batch ({cfg.train.batch_size} // {world} processes) must be "
            f"divisible by train.grad_accum_steps ({accum})"
        )
    if cfg.train.batch_size % world:
        raise EexitError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
            f"processes ({world})"
        )
    torch.manual_seed(cfg.seed)
    pretrained, pretrained_tok = (
        load_model(cfg.model.pretrained)[:2] if cfg.model.pretrained else (None, None)
    )
    seq2seq = (
        pretrained.is_seq2seq if pretrained is not None else FAMILIES.get(cfg.model.arch).seq2seq
    )
    tokenizer, train_tokens, val_tokens = prepare_data(cfg, pretrained_tok, seq2seq)
    if pretrained is None:
        check_vocab(cfg, tokenizer)
    if pretrained is None and FAMILIES.get(cfg.model.arch).learned_positions:
        tokenizer.model_max_length = cfg.model.max_len  # truncation=True stays within positions
    model = build_model(cfg, tokenizer, pretrained)
    out = folder.out
    if acc.is_main_process:
        if folder.staged:
            shutil.rmtree(folder.path, ignore_errors=True)
        folder.path.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    module = TrainingModule(model, cfg)
    optimizer = make_optimizer(module, cfg)
    start, ck = 0, checkpoints(out)[-1] if resume else None
    lora = has_lora(model.lm)
    if resume:
        start = checkpoint_step(ck)
        if not lora:  # the HF folder's weights (with LoRA: accelerate's state, unmerged)
            model.lm.load_state_dict(type(model.lm).from_pretrained(ck).state_dict())
            if (ck / "exit_modules.safetensors").is_file():
                exits = load_file(str(ck / "exit_modules.safetensors"))
                model.load_state_dict(exits, strict=False)
        if acc.is_main_process:
            trim_log(out / "train_log.jsonl", start)
    # on --resume, accelerate's load_state below restores the scheduler, optimizer and RNG
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    torch.manual_seed(
        cfg.seed * 1000 + rank
    )  # loss-side sampling (exit_token_fraction) per process
    wrapped, optimizer = acc.prepare(module, optimizer)
    # the scheduler is checkpointed, not prepared: a prepared one steps once per process
    acc.register_for_checkpointing(scheduler)
    if not lora:
        use_hf_folder_for_weights(acc)
    if resume:
        acc.load_state(str(ck / ACCELERATE_STATE))
    wrapped.train()
    if cfg.train.report_to:
        acc.init_trackers(cfg.run_name, config=flat_config(cfg))

    # ---- run
    per_rank = cfg.train.batch_size // world
    history: list[dict] = []
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    seen = 0.0  # target tokens trained on in this run
    progress = progress_bar(show_progress and acc.is_main_process, "info")
    task = (
        progress.add_task("train", total=cfg.train.steps, completed=start, info="")
        if progress
        else None
    )
    t0, last_logs = time.perf_counter(), {}
    with progress if progress else nullcontext():
        for step in range(start, end):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            x, y = next_batch(train_tokens, cfg, g)
            seen += float((y != pairs_mod.IGNORE).sum())
            share = slice(rank * per_rank, (rank + 1) * per_rank)
            if isinstance(x, dict):
                x = {k: v[share].to(acc.device) for k, v in x.items()}
            else:
                x = x[share].to(acc.device)
            y = y[share].to(acc.device)
            loss, logs = accumulate(acc, wrapped, x, y, accum, step)
            bad = acc.reduce(
                torch.tensor(0.0 if torch.isfinite(loss).item() else 1.0, device=acc.device), "sum"
            ).item()
            if bad:
                good = [] if folder.staged else checkpoints(folder.path)
                where = (
                    f"the last good checkpoint is {good[-1]}"
                    if good
                    else f"no checkpoint of this run was written; {out} is as it was before"
                )
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step + 1}; training stopped ({where}); "
                    "lower train.lr or raise warmup"
                )
            if cfg.train.grad_clip > 0:
                acc.clip_grad_norm_(wrapped.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            mean_loss = acc.reduce(loss.detach(), "mean").item()
            tps = seen / (time.perf_counter() - t0)
            last_logs = {
                "step": done,
                "loss": mean_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tps,
                **logs,
            }
            if progress:
                progress.update(
                    task, completed=done, info=f"loss {mean_loss:.3f}  {tps:,.0f} tok/s"
                )
            elif acc.is_main_process and (done % cfg.train.log_every == 0 or done == end):
                eta = (time.perf_counter() - t0) / (done - start) * (end - done)
                log(
                    f"step {done}/{cfg.train.steps}: loss {mean_loss:.4f}, {tps:,.0f} tok/s, "
                    f"about {eta:.0f} s left"
                )
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                history.append(last_logs)
                if cfg.train.report_to:
                    acc.log({k: v for k, v in last_logs.items() if k != "step"}, step=done)
                if acc.is_main_process:
                    append_log(folder.path, last_logs)
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                val = validation_losses(acc.unwrap_model(wrapped).model, val_tokens, cfg)
                last_logs.update(val)
                if cfg.train.report_to:  # val_ce@k / val_ppl@k reach the tracker too
                    acc.log(val, step=done)
                if acc.is_main_process:
                    append_log(folder.path, {"step": done, **val})
                    if not progress:
                        ppl = " ".join(f"{k}={v:.2f}" for k, v in val.items() if "ppl" in k)
                        log(f"step {done}: validation {ppl}")
            if done % cfg.train.save_every == 0 and done < cfg.train.steps:
                save_checkpoint(acc, wrapped, done, tokenizer, cfg, folder.path)
                folder.promote(acc)

    # ---- save
    result = {
        "step": end,
        "finished": end == cfg.train.steps,
        "processes": world,
        "main_process": acc.is_main_process,
        **last_logs,
    }
    if end == cfg.train.steps:
        acc.wait_for_everyone()
        state = gathered_model_state(acc, wrapped)  # every process: a collective under FSDP
        if acc.is_main_process:
            meta = {
                "train_config": to_dict(cfg),
                "step": end,
                "final": last_logs,
                "processes": world,
                "mixed_precision": acc.mixed_precision,
                "command": command_line(),
            }
            model.save(folder.path, tokenizer, meta, state_dict=state)
            atomic_json(folder.path / "metrics.json", result)
        folder.promote(acc)
    acc.end_training()
    return result


def append_log(folder, row: dict) -> None:
    """One line of train_log.jsonl (a line cut off by a full disk is dropped on --resume)."""
    path = folder / "train_log.jsonl"
    try:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(e, str(path)) from None


def accumulate(acc, wrapped, x, y, accum: int, step: int = 0):
    """Forward and backward over `accum` equal micro-batches (gradients summed, each loss
    scaled by 1 / accum; DDP syncs on the last one). Returns the mean loss and logs; a
    non-finite loss is returned before any backward."""
    n = y.shape[0] // accum
    losses, logs = [], {}
    for i in range(accum):
        part = slice(i * n, (i + 1) * n)
        xi = {k: v[part] for k, v in x.items()} if isinstance(x, dict) else x[part]
        sync = acc.no_sync(wrapped) if i < accum - 1 else nullcontext()
        with sync:
            loss, logs_i = wrapped(xi, y[part], step)
            if not torch.isfinite(loss):
                return loss, logs_i
            acc.backward(loss / accum)
        losses.append(loss.detach())
        for k, v in logs_i.items():
            logs[k] = logs.get(k, 0.0) + v / accum
    return torch.stack(losses).mean(), logs


def check_trackers(names: list[str]) -> None:
    """Experiment trackers must be installed (jsonl logs are always written)."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(sorted(LOGGER_TYPE_TO_CLASS))
            raise EexitError(f"unknown tracker {name!r} in train.report_to; known: {known}")
        if name not in available:
            raise EexitError(
                f"tracker {name!r} (train.report_to) is not installed: pip install {name}"
            )


def flat_config(cfg: RunConfig) -> dict:
    """The config as flat key -> scalar (what trackers accept)."""
    out = {}
    for section, values in to_dict(cfg).items():
        for k, v in values.items() if isinstance(values, dict) else [("", values)]:
            key = f"{section}.{k}" if k else section
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def next_batch(train, cfg: RunConfig, g: torch.Generator):
    """The global batch of a step: random windows of an LM stream, or random task examples."""
    if isinstance(train, pairs_mod.EncodedPairs):
        return pairs_mod.random_batch(train, cfg.train.batch_size, g)
    return data_mod.random_windows(train, cfg.data.seq_len, cfg.train.batch_size, g)
