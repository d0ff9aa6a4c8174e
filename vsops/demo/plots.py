"""The demo's pictures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

__all__ = ["selection_figure", "accuracy_figure", "prefill_figure", "kernels_figure", "save", "selection_size",
           "overlay_mask"]

DPI = 100
ACCURACY_SIZE, PREFILL_SIZE, KERNELS_SIZE = (11, 4), (11, 4), (12, 4)


def save(figure, path) -> None:
    """Writes ``figure`` as a PNG of its size in inches times :data:`DPI`."""
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def selection_size(boards: int, methods: int, budgets: int) -> tuple[float, float]:
    """Inches of :func:`selection_figure`."""
    return 2.0 * (2 + budgets), 2.0 * boards * methods + 0.5


def overlay_mask(keep: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float32 ``[height, width]``: 1 over the image area of each kept token of ``keep [rows,
    cols]`` (each token covers the same share of the image the processor resized), 0 elsewhere."""
    rows, cols = keep.shape
    return keep.float()[torch.arange(height) * rows // height][:, torch.arange(width) * cols // width]


def _show_cells(ax, image, grid, keep=None, target=None):
    """The board, with the cells not kept dimmed and the kept ones outlined in white; the asked
    target outlined in red."""
    picture = image.permute(1, 2, 0).numpy()
    cell = image.shape[1] // grid
    if keep is not None:
        dim = overlay_mask(keep, *image.shape[1:]).numpy()
        picture = picture * (0.15 + 0.85 * dim[..., None])
        for r, c in keep.nonzero().tolist():
            ax.add_patch(Rectangle((c * cell - 0.5, r * cell - 0.5), cell, cell, fill=False, edgecolor="white",
                                   linewidth=1.0))
    ax.imshow(picture, interpolation="nearest")
    if target is not None:
        r, c = target
        ax.add_patch(Rectangle((c * cell - 0.5, r * cell - 0.5), cell, cell, fill=False, edgecolor="red", linewidth=2.0))
    ax.set_xlim(-0.5, image.shape[2] - 0.5)
    ax.set_ylim(image.shape[1] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def selection_figure(boards, methods, budgets, title="Synthetic task"):
    """Per board: the image and the learned scorer's heat map, then one row per method with
    the kept cells at each budget (a check or cross: the answer)."""
    columns = 2 + len(budgets)
    rows = len(boards) * len(methods)
    figure, axes = plt.subplots(rows, columns, figsize=selection_size(len(boards), len(methods), len(budgets)),
                                squeeze=False, layout="constrained")
    for b, board in enumerate(boards):
        for m, method in enumerate(methods):
            row = axes[b * len(methods) + m]
            for ax in row[:2]:
                ax.axis("off")
            if m == 0:
                row[0].axis("on")
                _show_cells(row[0], board.image, board.scores.shape[0], target=board.target)
                row[0].set_title(f"board {board.index}", fontsize=9)
                row[1].axis("on")
                row[1].imshow(board.scores.numpy(), cmap="magma", interpolation="nearest")
                row[1].set_xticks([])
                row[1].set_yticks([])
                row[1].set_title("learned scores", fontsize=9)
            for j, budget in enumerate(budgets):
                ax = row[2 + j]
                _show_cells(ax, board.image, board.scores.shape[0], board.keep[method][budget], board.target)
                mark = "right" if board.correct[method][budget] else "wrong"
                ax.set_title(f"{budget:.0%} kept: {mark}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(method, fontsize=9)
    figure.suptitle(f"{title}: kept visual tokens per method and budget (red: the cell the question asks about)",
                    fontsize=11)
    return figure


def accuracy_figure(accuracy, target_kept, budgets, title="Synthetic task"):
    """Answer accuracy and target-kept rate against the budget, one line per method; the
    full-token accuracy as a reference line."""
    figure, (left, right) = plt.subplots(1, 2, figsize=ACCURACY_SIZE, layout="constrained")
    full = next(iter(accuracy.values()))["1.0"]
    for method in accuracy:
        left.plot(budgets, [100 * accuracy[method][str(b)] for b in budgets], marker="o", label=method)
        right.plot(budgets, [100 * target_kept[method][str(b)] for b in budgets], marker="o", label=method)
    left.axhline(100 * full, linestyle="--", color="gray", label="all tokens")
    left.set(xlabel="budget (fraction of visual tokens kept)", ylabel="answer accuracy (%)", ylim=(0, 105))
    right.set(xlabel="budget (fraction of visual tokens kept)", ylabel="asked target kept (%)", ylim=(0, 105))
    left.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(budgets)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{title}, held-out boards")
    return figure


def prefill_figure(rows, vision_ms):
    """Prefill time and speedup against the budget, with the token-ratio ideal and the
    whole-prefill bound (the vision tower does not shrink)."""
    unpatched = rows[0]
    pruned = [r for r in rows[1:]]
    budgets = [r.budget for r in pruned]
    speedups = [unpatched.ms / r.ms for r in pruned]
    token_ideal = [r.ideal_speedup for r in pruned]
    whole = [unpatched.ms / (vision_ms + (unpatched.ms - vision_ms) * r.kept / r.tokens) for r in pruned]
    figure, (left, right) = plt.subplots(1, 2, figsize=PREFILL_SIZE, layout="constrained")
    left.plot(budgets, [r.ms for r in pruned], marker="o", label="patched")
    left.axhline(unpatched.ms, linestyle="--", color="gray", label="unpatched")
    left.axhline(vision_ms, linestyle=":", color="gray", label="vision tower alone")
    left.set(xlabel="budget", ylabel="prefill ms", ylim=(0, None))
    right.plot(budgets, speedups, marker="o", label="measured")
    right.plot(budgets, token_ideal, marker="x", linestyle="--", label="ideal: token ratio L/L'")
    right.plot(budgets, whole, marker="s", linestyle=":", label="bound with the vision tower")
    right.set(xlabel="budget", ylabel="speedup over unpatched", ylim=(0, None))
    for ax in (left, right):
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(f"Prefill, {unpatched.tokens} tokens (vision tower {vision_ms:.0f} ms of {unpatched.ms:.0f} ms)")
    return figure


def kernels_figure(rows):
    """Each operator's speedup over its PyTorch baseline and share of its bound."""
    names = [f"{r.operator}\n({r.case})" for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=KERNELS_SIZE, layout="constrained")
    speedups = [r.speedup for r in rows]
    shares = [100 * r.share for r in rows]
    left.barh(names, speedups, color="tab:blue")
    left.axvline(1.0, color="gray", linestyle="--")
    left.set(xscale="log", xlabel="speedup over the PyTorch baseline")
    right.barh(names, shares, color=["tab:green" if r.bound == "memory" else "tab:orange" for r in rows])
    # A small case's bytes can stay in cache, beating the copy that measures the bandwidth.
    right.set(xlabel="share of the bound (%): green memory bandwidth, orange compute", xlim=(0, max(110, 1.15 * max(shares))))
    right.axvline(100, color="gray", linestyle="--")
    right.set_yticks([])
    for ax, values, fmt in ((left, speedups, "{:.1f}x"), (right, shares, "{:.0f}%")):
        for y, value in enumerate(values):
            ax.annotate(fmt.format(value), (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
    figure.suptitle("Operators against PyTorch and against their bound")
    return figure
