"""Draws docs/images/bowl_trajectories.png, the README's picture: ``python docs/images/bowl_trajectories.py``."""

import pathlib

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rmsprop_jax import _demo_bowl


def main() -> None:
    paths = {name: _demo_bowl.trajectory(opt) for name, opt in _demo_bowl.optimizers().items()}
    fig, ax = plt.subplots(figsize=(5.4, 4.6), dpi=100)
    _demo_bowl.plot(ax, paths)
    ax.set_title(f"f(W, b) = 0.1 W² + 2 b²: 20 steps at learning rate {_demo_bowl.LEARNING_RATE}", fontsize=10)
    fig.tight_layout()
    out = pathlib.Path(__file__).with_suffix(".png")
    fig.savefig(out, metadata={"Software": None})
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
