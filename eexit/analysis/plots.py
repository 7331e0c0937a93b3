"""Figures for `eexit analyze-monotonicity` (layer on the x-axis, models overlaid)."""

from __future__ import annotations

from pathlib import Path

from eexit.reporting import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _int_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def plot_all(out: Path, layer_rows, sat_rows, examples, subword, sublayer) -> None:
    plt = _plt()
    models = _by_model(layer_rows)
    # figure 1: fraction of top-1 predictions that do not change after each layer
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rows in models.items():
        ax.plot(
            [r["layer"] for r in rows],
            [r["top1_never_changes_after"] for r in rows],
            marker="o",
            label=m,
        )
    ax.set(
        xlabel="layer",
        ylabel="% of tokens",
        title="Top-1 prediction never changes after the layer",
        ylim=(0, 101),
    )
    _int_x(ax)
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout(), save_figure(fig, out / "fig1_fraction_no_change.png"), plt.close(fig)
    # figure 2: mean and std of the probability of the final prediction, one panel per model
    fig, axes = plt.subplots(
        1, len(models), figsize=(4 * len(models), 3.6), squeeze=False, sharey=True
    )
    for ax, (m, rows) in zip(axes[0], models.items()):
        x = [r["layer"] for r in rows]
        mu = [r["p_final_mean"] for r in rows]
        sd = [r["p_final_std"] for r in rows]
        ax.plot(x, mu, marker="o")
        ax.fill_between(
            x, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], alpha=0.25
        )
        ax.set(title=m, xlabel="layer", ylim=(0, 1))
        _int_x(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("p(final prediction)")
    fig.tight_layout(), save_figure(fig, out / "fig2_mean_top1.png"), plt.close(fig)
    # figure 3: top-3 predictions per layer for example tokens (first example of each model)
    fig, axes = plt.subplots(1, len(examples), figsize=(4.5 * len(examples), 3.8), squeeze=False)
    for ax, (m, exs) in zip(axes[0], examples.items()):
        if not exs:
            continue
        ex = exs[0]
        tokens = {t for layer in ex["layers"] for t, _ in layer["top"]}
        layers = [l["layer"] for l in ex["layers"]]
        for tok in sorted(
            tokens, key=lambda t: -max(dict(l["top"]).get(t, 0) for l in ex["layers"])
        )[:6]:
            ax.plot(
                layers,
                [dict(l["top"]).get(tok, float("nan")) for l in ex["layers"]],
                marker=".",
                label=repr(tok),
            )
        ax.set(
            title=f"{m}: next = {ex['final']!r}",
            xlabel="layer",
            ylabel="probability (top-3 only)",
            ylim=(0, 1),
        )
        _int_x(ax)
        ax.legend(fontsize=7)
    fig.tight_layout(), save_figure(fig, out / "fig3_examples.png"), plt.close(fig)
    # top-k saturation order
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, rows in _by_model(sat_rows).items():
        ax.plot(
            [r["rank"] for r in rows],
            [r["mean_saturation_layer"] for r in rows],
            marker="o",
            label=m,
        )
    ax.set(
        xlabel="rank k",
        ylabel="mean layer where rank k is fixed",
        title="Top-k saturation (seed 003)",
    )
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout(), save_figure(fig, out / "topk_saturation.png"), plt.close(fig)
    # sub-word view
    fig, axes = plt.subplots(
        1, len(subword), figsize=(4.5 * len(subword), 3.4), squeeze=False, sharey=True
    )
    for ax, (m, sw) in zip(axes[0], subword.items()):
        for name in ("word_start", "continuation"):
            h = sw[name]["exit_histogram_pct"]
            ax.plot(range(1, len(h) + 1), h, marker="o", label=f"{name} (n={sw[name]['tokens']})")
        ax.set(title=m, xlabel="oracle exit layer", ylabel="% of tokens")
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout(), save_figure(fig, out / "subword_exits.png"), plt.close(fig)
    if sublayer:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, rows in sublayer.items():
            pts = [r for r in rows if r["point"] is not None]
            ax.plot(
                [r["point"] for r in pts],
                [r["top1_equals_final"] for r in pts],
                marker=".",
                label=m,
            )
        ax.set(
            xlabel="layer (x.5 = after attention, x = after MLP)",
            ylabel="% top-1 = final",
            title="Sub-layer exits (seed 004)",
        )
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
        fig.tight_layout(), save_figure(fig, out / "sublayer.png"), plt.close(fig)
