"""What a learned plan learned: its channel importance as a heatmap and a per-layer summary.

LeanK's analysis looks at the learned factors per layer, KV head and channel: which frequencies of
RoPE matter, which heads keep nothing (streaming heads). `kvcompile importance PLAN` draws the
same view for any plan that carries factors (`Plan.importance`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvcompile.plan import Plan, PlanError


def _factors(plan: Plan) -> torch.Tensor:
    if plan.importance is None:
        raise PlanError("the plan carries no learned importance (only plans from k_method 'leank' do)")
    return plan.importance.float()


def summary(plan: Plan) -> str:
    """One line per layer: each KV head's kept count (S marks a streaming head) and mean factor."""
    factors = _factors(plan)
    lines = ["layer  kept channels per KV head (S: streaming)  mean factor per head"]
    for layer in range(factors.shape[0]):
        kept = plan.kept_counts(layer) if layer in plan.k_channels else (factors.shape[2],) * factors.shape[1]
        cells = " ".join(f"{count:>3}" if count else "  S" for count in kept)
        means = " ".join(f"{value:.2f}" for value in factors[layer].mean(dim=-1).tolist())
        lines.append(f"{layer:>5}  {cells:<40}  {means}")
    return "\n".join(lines)


def plot(plan: Plan, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of the factors: one row per layer, the KV heads' channels side by side, kept channels
    outlined below in a second panel (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = _factors(plan)
    layers, heads, head_dim = factors.shape
    kept = torch.zeros_like(factors)
    for layer, per_head in plan.k_channels.items():
        for head, ids in enumerate(per_head):
            kept[layer, head, list(ids)] = 1
    figure, axes = plt.subplots(2, 1, figsize=(max(8, heads * head_dim / 24), 2 + layers / 4), sharex=True)
    for ax, values, label, cmap in ((axes[0], factors, "learned factor", "viridis"), (axes[1], kept, "kept", "Greys")):
        image = ax.imshow(values.flatten(1).numpy(), aspect="auto", interpolation="nearest", cmap=cmap,
                          vmin=0, vmax=max(1.0, float(values.max())))
        for head in range(1, heads):
            ax.axvline(head * head_dim - 0.5, color="red", linewidth=0.8)
        ax.set_ylabel("layer")
        figure.colorbar(image, ax=ax, label=label)
    # a label per head, a minor tick every 16 channels of it (channel 0 of each head is its red line's right)
    axes[1].set_xticks([head * head_dim + (head_dim - 1) / 2 for head in range(heads)], [f"head {h}" for h in range(heads)])
    axes[1].set_xticks([head * head_dim + c for head in range(heads) for c in range(0, head_dim, 16)], minor=True)
    axes[1].set_xlabel(f"KV head × channel ({heads} heads of {head_dim}, minor ticks every 16 channels)")
    sparsity = plan.meta.get("sparsity")
    axes[0].set_title(title or f"learned K-channel importance ({plan.meta.get('method', 'plan')}"
                      + (f", {sparsity:.0%} sparsity" if sparsity is not None else "") + ")")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
