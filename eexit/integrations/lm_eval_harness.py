"""Early exit inside lm-evaluation-harness: an lm-eval model ("eexit") whose loglikelihoods
and generations run with early exit, reporting compute % and exit shares beside the harness's
metrics.

    eexit lm-eval --model CKPT --tasks hellaswag --policy margin --threshold 0.9
    python -m eexit.integrations.lm_eval_harness --model eexit \\
        --model_args pretrained=CKPT,policy=margin,threshold=0.9 --tasks hellaswag

Loglikelihood: the (context, continuation) pair runs teacher-forced once; every continuation
token takes the exit chosen by the policy's exit rule (`exit_indices`, the same rule as
`eexit evaluate`) and contributes that exit's log-probability; `is_greedy` compares that
exit's top-1. With threshold 1.0 (never exit) the numbers are the plain model's. Generation
uses eexit's early-exit decoder (`kv`: propagate, recompute or full). Tokenisation follows
lm-eval's Hugging Face model (trailing spaces of the context move to the continuation).
"""

from __future__ import annotations

from collections import Counter

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - checked by the CLI with a one-line error
    raise ImportError("lm-eval is not installed: pip install 'eexit[lmeval]'") from e

from eexit.evaluation.context import EvalRequest, make_bound_policy, max_positions
from eexit.evaluation.records import collect_exit_table, exit_indices
from eexit.models.decoding import EarlyExitDecoder
from eexit.models.loading import load_model


@register_model("eexit")
class EexitLM(LM):
    def __init__(
        self,
        pretrained: str,
        policy: str = "max-prob",
        threshold: float = 1.0,
        min_exit_layer: int = 1,
        kv: str = "propagate",
        max_length: int | None = None,
        batch_size: int | str = 1,
        **kwargs,
    ):
        super().__init__()
        self.model, self.tokenizer, info = load_model(str(pretrained))
        request = EvalRequest(
            model=str(pretrained),
            policy=str(policy),
            thresholds=[float(threshold)],
            min_exit_layer=int(min_exit_layer),
        )
        self.policy = make_bound_policy(request, self.model, info)
        self.kv = str(kv)
        self.max_length = int(max_length) if max_length else (max_positions(self.model) or 2048)
        self.eot = self.tokenizer.eos_token_id
        self.exits = {"loglikelihood": Counter(), "generation": Counter()}

    # ------------------------------------------------------------------ statistics
    def early_exit_stats(self) -> dict:
        """Compute % (mean exit layer / depth) and exit shares, per kind of request."""
        L, out = self.model.num_layers, {}
        for kind, counts in self.exits.items():
            n = sum(counts.values())
            if not n:
                continue
            out[f"{kind}_tokens"] = n
            out[f"{kind}_compute_pct"] = 100 * sum(k * v for k, v in counts.items()) / (n * L)
            for layer in self.model.exit_layers:
                out[f"{kind}_exit@{layer}_pct"] = 100 * counts.get(layer, 0) / n
        return out

    # ------------------------------------------------------------------ scoring
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return (ctx or [self.eot]), whole[len(ctx) :]

    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1) :]
        x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        table = collect_exit_table(self.model, x, y, self.policy, batch_size=1)
        idx = exit_indices(table, self.policy)
        cols = torch.arange(table.tokens)
        n = len(continuation)
        nll = table.nll[idx, cols][-n:]
        top1 = table.top1[idx, cols][-n:]
        layers = torch.tensor(table.exit_layers)[idx][-n:]
        self.exits["loglikelihood"].update(layers.tolist())
        greedy = bool((top1 == torch.tensor(continuation)).all())
        return -float(nll.double().sum()), greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._score(*self._pair(*r.args)) for r in requests]

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self._encode(r.args[0]),
                    prefix_token=self.eot,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            out.append(sum(self._score(list(c), list(t))[0] for c, t in windows))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        decoder = EarlyExitDecoder(self.model, self.policy, self.kv)
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", 64))
            ids = self._encode(context)[-(self.max_length - new) :] or [self.eot]
            res = decoder.generate(
                torch.tensor([ids]), None, new, eos_token_id=self.eot, pad_token_id=self.eot
            )
            tokens = res.new_tokens[0].tolist()
            end = tokens.index(self.eot) if self.eot in tokens else len(tokens)
            self.exits["generation"].update(res.exit_layers[0, :end].tolist())
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def run_harness(model: EexitLM, tasks: list[str], include_path: str | None, limit) -> tuple:
    """(metric rows per task, early-exit statistics, the harness's result dict)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    res = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=manager, limit=limit, log_samples=True
    )
    rows = []
    for task, metrics in sorted(res["results"].items()):
        row = {"task": task}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key.replace(",none", "")] = float(value)
        rows.append(row)
    return rows, model.early_exit_stats(), res


if __name__ == "__main__":  # lm-eval's own CLI with the "eexit" model registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
