"""What identifies a model for the files fitted on it (exit classifiers, the predictor): depth,
width, vocabulary, exits and a hash of the weights. A fitted file records it, and is refused on
another model, naming both, instead of being applied without a word."""

from __future__ import annotations

import hashlib

import torch

from eexit.errors import EexitError


def weights_digest(model) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(model) -> dict:
    """The identity of an EarlyExitModel, as recorded beside what is fitted on it."""
    return {
        "num_layers": int(model.num_layers),
        "hidden_size": int(model.hidden_size),
        "vocab_size": int(model.vocab_size),
        "exit_layers": [int(x) for x in model.exit_layers],
        "weights_sha256": weights_digest(model),
    }


def describe(identity: dict) -> str:
    exits = identity.get("exit_layers")
    return (
        f"{identity.get('num_layers')} layers, d {identity.get('hidden_size')}, vocabulary "
        f"{identity.get('vocab_size')}"
        + (f", exits {','.join(str(x) for x in exits)}" if exits is not None else "")
        + f", weights {str(identity.get('weights_sha256', '?'))[:12]}"
    )


def check_identity(
    recorded: dict | None,
    model,
    what: str,
    made: str = "fitted",
    redo: str = "fit it again on this model (eexit calibrate --fit ...)",
) -> None:
    """Refuse `what` (a fitted file) when the identity it recorded is not `model`'s. Files from
    before identities were recorded (None) are checked by their sizes where they have them."""
    if not recorded:
        return
    here = model_identity(model)
    keys = ("num_layers", "hidden_size", "vocab_size", "weights_sha256")
    # a run may use fewer exits than the file was fitted on (--exit-layers), not others
    exits_ok = set(here["exit_layers"]) <= set(recorded.get("exit_layers", here["exit_layers"]))
    if not exits_ok or any(recorded.get(k) != here[k] for k in keys if k in recorded):
        raise EexitError(
            f"{what} was {made} on another model ({describe(recorded)}), not this one "
            f"({describe(here)}); {redo}"
        )
