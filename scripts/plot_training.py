"""Draw a training run's loss curve and held-out checks: scripts/plot_training.py TRAINING_JSON OUT_PNG [TWIN_JSON].

Reads the `training.json` that `pdlm-ros train` writes beside the weights (the bundled model's is in
pdlm_ros/assets/default/); an optional second file (the autoregressive twin's) is drawn on the same axes.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(paths: list[str], out: str) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for path, label in zip(paths, ("diffusion", "autoregressive twin")):
        run = json.load(open(path))
        curve = run["curve"]
        ax_loss.plot([c["seconds"] / 60 for c in curve], [c["smooth"] for c in curve], label=label)
        evals = run["evals"]
        minutes = {c["step"]: c["seconds"] / 60 for c in curve}
        for attr, style in (("shape", "-o"), ("exact", "--s")):
            ax_acc.plot([minutes.get(e["step"], 0) for e in evals], [e[attr] for e in evals], style,
                        label=f"{label}: {attr}")
    ax_loss.set(xlabel="minutes", ylabel="training loss (EMA)", yscale="log", title="loss")
    ax_acc.set(xlabel="minutes", ylabel="% of held-out regions", ylim=(0, 100), title="held-out checks (masks)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main([sys.argv[1]] + sys.argv[3:], sys.argv[2])
