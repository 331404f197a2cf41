"""Selection history: how often each arm was selected, and its probability, per logging window."""

import json
import os

import numpy as np

HISTORY_JSON = "selection_history.json"
HISTORY_PNG = "selection_heatmap.png"


class SelectionHistory:
    """Counts selections per arm over a window of optimizer steps; `close_window` stores one row per window."""

    def __init__(self, arm_names: list[str]):
        self.arm_names = list(arm_names)
        self.steps: list[int] = []  # optimizer step that closed each window
        self.window_steps: list[int] = []  # steps in each window
        self.counts: list[list[int]] = []  # selections per arm in each window
        self.probabilities: list[list[float]] = []  # arm probabilities when the window closed
        self._counts = np.zeros(len(self.arm_names), dtype=np.int64)
        self._steps = 0

    def record(self, selected: np.ndarray) -> None:
        self._counts[selected] += 1
        self._steps += 1

    def close_window(self, step: int, probabilities: np.ndarray) -> None:
        if self._steps == 0:
            return
        self.steps.append(int(step))
        self.window_steps.append(self._steps)
        self.counts.append(self._counts.tolist())
        self.probabilities.append([round(float(p), 6) for p in probabilities])
        self._counts[:] = 0
        self._steps = 0

    def state_dict(self) -> dict:
        return {
            "arm_names": self.arm_names,
            "steps": self.steps,
            "window_steps": self.window_steps,
            "counts": self.counts,
            "probabilities": self.probabilities,
            "open_window": {"steps": self._steps, "counts": self._counts.tolist()},
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["arm_names"]) != self.arm_names:
            raise ValueError("selection history names other arms than this model has")
        for key in ("steps", "window_steps", "counts", "probabilities"):
            setattr(self, key, list(state[key]))
        self._steps = int(state["open_window"]["steps"])
        self._counts = np.asarray(state["open_window"]["counts"], dtype=np.int64).reshape(len(self.arm_names))

    def save(self, output_dir: str, heatmap: bool = True) -> None:
        """Write `selection_history.json` and, with `heatmap` when matplotlib is installed, `selection_heatmap.png`
        (about 0.8 s: the trainer draws it at the end of training, not at every checkpoint)."""
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, HISTORY_JSON), "w") as f:
            json.dump(self.state_dict(), f)
        if heatmap and self.steps:
            plot_heatmap(self, os.path.join(output_dir, HISTORY_PNG))


def plot_heatmap(history: SelectionHistory, path: str) -> bool:
    """Arms x logging windows, colour = share of the window's steps in which the arm was selected."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    freq = np.asarray(history.counts, dtype=float).T / np.asarray(history.window_steps, dtype=float)
    height = min(2 + 0.12 * len(history.arm_names), 40)
    fig, ax = plt.subplots(figsize=(10, height))
    image = ax.imshow(freq, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("optimizer step (end of logging window)")
    ax.set_ylabel("arm")
    ticks = np.linspace(0, len(history.steps) - 1, min(10, len(history.steps))).astype(int)
    ax.set_xticks(ticks, [str(history.steps[i]) for i in ticks])
    if len(history.arm_names) <= 120:
        ax.set_yticks(range(len(history.arm_names)), history.arm_names, fontsize=5)
    fig.colorbar(image, ax=ax, label="share of steps selected")
    ax.set_title("SL-SAM arm selection")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
