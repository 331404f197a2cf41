"""Selection history: how often each arm was selected, its probability and the active-parameter ratio per logging
window; where each arm sits in the model (`arm_layout`), and the picture drawn from the history."""

import json
import os
import re
from dataclasses import dataclass

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
        self.active_param_ratio: list[float] = []  # mean share of trainable elements that got a gradient
        self._counts = np.zeros(len(self.arm_names), dtype=np.int64)
        self._steps = 0
        self._active = 0.0

    def record(self, selected: np.ndarray, active_param_ratio: float) -> None:
        self._counts[selected] += 1
        self._steps += 1
        self._active += active_param_ratio

    def close_window(self, step: int, probabilities: np.ndarray) -> None:
        if self._steps == 0:
            return
        self.steps.append(int(step))
        self.window_steps.append(self._steps)
        self.counts.append(self._counts.tolist())
        self.probabilities.append([round(float(p), 6) for p in probabilities])
        self.active_param_ratio.append(round(self._active / self._steps, 6))
        self._counts[:] = 0
        self._steps = 0
        self._active = 0.0

    def state_dict(self) -> dict:
        return {
            "arm_names": self.arm_names,
            "steps": self.steps,
            "window_steps": self.window_steps,
            "counts": self.counts,
            "probabilities": self.probabilities,
            "active_param_ratio": self.active_param_ratio,
            "open_window": {"steps": self._steps, "counts": self._counts.tolist(), "active": self._active},
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["arm_names"]) != self.arm_names:
            raise ValueError("selection history names other arms than this model has")
        for key in ("steps", "window_steps", "counts", "probabilities", "active_param_ratio"):
            setattr(self, key, list(state[key]))
        self._steps = int(state["open_window"]["steps"])
        self._counts = np.asarray(state["open_window"]["counts"], dtype=np.int64).reshape(len(self.arm_names))
        self._active = float(state["open_window"]["active"])

    def save(self, output_dir: str, heatmap: bool = True) -> None:
        """Write `selection_history.json` and, with `heatmap` when matplotlib is installed, the picture
        `selection_heatmap.png` (about 1 s: the trainer draws it at the end of training, not at every checkpoint)."""
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, HISTORY_JSON), "w") as f:
            json.dump(self.state_dict(), f)
        if heatmap and self.steps:
            plot_selection(self.state_dict(), os.path.join(output_dir, HISTORY_PNG))


# ------------------------------------------------------------------------------------------ where arms sit

# Tensor kinds shown as columns, in this order: the module names transformers' common architectures use (Llama /
# Mistral / Qwen, BERT / RoBERTa, GPT-2, DistilBERT, T5), matched against the module path inside a block.
KIND_PATTERNS = {
    "q": r"(^|\.)(q_proj|query|q_lin|q)$",
    "k": r"(^|\.)(k_proj|key|k_lin|k)$",
    "v": r"(^|\.)(v_proj|value|v_lin|v)$",
    "qkv": r"(^|\.)(c_attn|qkv_proj|query_key_value|qkv)$",
    "o": r"(^|\.)(o_proj|out_proj|out_lin|o|attn\.c_proj|attention\.output\.dense)$",
    "gate": r"(^|\.)(gate_proj|wi_0)$",
    "up": r"(^|\.)(up_proj|fc1|c_fc|lin1|wi|wi_1|intermediate\.dense)$",
    "down": r"(^|\.)(down_proj|fc2|mlp\.c_proj|lin2|wo|output\.dense)$",
}
NORM_PATTERN = re.compile(r"norm|(^|\.)ln_?\w*$", re.IGNORECASE)
BLOCK_INDEX = re.compile(r"\.(\d+)(?=\.|$)")
LORA_ARM = re.compile(r"\.lora\.[^.]+$")  # `arms.tensor_arm_name`: `<module>.lora.<adapter>`
PEFT_PREFIX = "base_model.model."
GENERIC_MODULES = ("dense", "linear", "proj", "projection")


@dataclass
class ArmLayout:
    """Where each arm sits: `rows` (embeddings, each transformer block, head) and `kinds` (q/k/v/o, gate/up/down,
    norm, bias, LoRA adapters, named modules) in display order; per arm its row and kind index and a label."""

    rows: list[str]
    kinds: list[str]
    row_of: np.ndarray
    kind_of: np.ndarray
    labels: list[str]

    def grid(self, values: np.ndarray) -> np.ndarray:
        """rows x kinds: the mean of `values` (one per arm) over the arms in each cell, NaN where none is."""
        total = np.zeros((len(self.rows), len(self.kinds)))
        arms = np.zeros_like(total)
        np.add.at(total, (self.row_of, self.kind_of), values)
        np.add.at(arms, (self.row_of, self.kind_of), 1)
        with np.errstate(invalid="ignore"):
            return total / arms

    def row_means(self, values: np.ndarray) -> np.ndarray:
        """The mean of `values` over the arms of each row."""
        return np.bincount(self.row_of, values, len(self.rows)) / np.bincount(self.row_of, minlength=len(self.rows))


def arm_kind(path: str, in_block: bool) -> str:
    """The kind of the tensor or module at `path`: its path inside its block, or its full path outside blocks (where
    a module is named by itself: a RoBERTa head's `out_proj` is no attention output)."""
    lora = LORA_ARM.search(path)
    if lora:
        return f"{arm_kind(path[: lora.start()], in_block)} LoRA"
    module, _, tensor = path.rpartition(".")
    if tensor not in ("weight", "bias"):
        module = path
    if NORM_PATTERN.search(module):
        return "norm"
    if tensor == "bias":
        return "bias"
    if in_block:
        kind = next((kind for kind, pattern in KIND_PATTERNS.items() if re.search(pattern, module)), None)
        if kind:
            return kind
    parts = module.split(".")
    while len(parts) > 1 and parts[-1] in GENERIC_MODULES:
        parts.pop()
    return parts[-1] or "block"


def arm_layout(arm_names: list[str]) -> ArmLayout:
    """Group arms by where they sit, from their names alone (in the model's parameter order): a name with a numeric
    component is in block `<stack>.<index>` (one row per block); arms before the first block form the row
    'embeddings', the others 'head' (final norm, pooler, output layer). With one block stack the rows read 'block i'.
    """
    paths = [name.removeprefix(PEFT_PREFIX) for name in arm_names]
    blocks = [BLOCK_INDEX.search(path) for path in paths]
    stacks = list(dict.fromkeys(path[: b.start()] for path, b in zip(paths, blocks) if b))
    first_block = next((i for i, b in enumerate(blocks) if b), len(paths))
    keys, kinds, labels = [], [], []
    for i, (path, block) in enumerate(zip(paths, blocks)):
        if block:
            stack = path[: block.start()]
            row = f"block {block[1]}" if len(stacks) == 1 else f"{stack} {block[1]}"
            key, inside = (1, stacks.index(stack), int(block[1])), path[block.end() + 1 :]
        else:
            row = "embeddings" if i < first_block else "head"
            key, inside = (0 if i < first_block else 2,), path
        keys.append((key, row))
        kinds.append(arm_kind(inside, block is not None))
        labels.append(f"{row}: {LORA_ARM.sub(' LoRA', inside) or 'whole block'}")
    row_keys = sorted(set(keys))
    known = [*KIND_PATTERNS, "norm", "bias"]

    def kind_order(kind):
        """The kinds of `known` in that order; before them the others first seen in the embeddings, after them the
        rest, in the order of the arms (LoRA next to its module's kind)."""
        base, first = kind.removesuffix(" LoRA"), kinds.index(kind)
        if base in known:
            return 1, known.index(base), kind != base
        return keys[first][0][0], len(known) + first, kind != base

    kind_names = sorted(set(kinds), key=kind_order)
    return ArmLayout([row for _, row in row_keys], kind_names,
                     np.array([row_keys.index(key) for key in keys], dtype=np.int64),
                     np.array([kind_names.index(kind) for kind in kinds], dtype=np.int64), labels)


# ------------------------------------------------------------------------------------------ summaries and picture


def selection_share(state: dict) -> np.ndarray:
    """Per arm, the share of the recorded optimizer steps in which it was selected."""
    return np.asarray(state["counts"], dtype=float).sum(0) / sum(state["window_steps"])


def mean_active_param_ratio(state: dict) -> float:
    """The active-parameter ratio over all recorded steps (window means weighted by their steps)."""
    return float(np.average(state["active_param_ratio"], weights=state["window_steps"]))


def most_selected_rows(state: dict, top: int = 3) -> list[tuple[str, float]]:
    """The `top` rows (blocks) whose arms were selected in the largest share of steps: (row, mean share)."""
    layout = arm_layout(state["arm_names"])
    shares = layout.row_means(selection_share(state))
    return [(layout.rows[i], float(shares[i])) for i in np.argsort(-shares, kind="stable")[:top]]


def plot_selection(state: dict, path: str, lines: int = 3) -> bool:
    """Draw a history (`SelectionHistory.state_dict()` or its JSON) to `path`: block x kind grids of the final bandit
    probability and of the share of steps selected, the probability over steps of the `lines` most and least
    favoured arms, and the active-parameter ratio over steps. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    layout = arm_layout(state["arm_names"])
    probabilities = np.asarray(state["probabilities"], dtype=float)
    steps = state["steps"]
    height = 0.22 * len(layout.rows) + 1.5
    fig = plt.figure(figsize=(12, height + 3.5))
    axes = fig.subplots(2, 2, gridspec_kw={"height_ratios": [height, 3]})
    grids = [(probabilities[-1], f"bandit probability at step {steps[-1]}"),
             (selection_share(state), f"share of steps selected (steps 1-{steps[-1]})")]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.9")
    for ax, (values, title) in zip(axes[0], grids):
        image = ax.imshow(layout.grid(values), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0)
        ax.set_xticks(range(len(layout.kinds)), layout.kinds, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layout.rows)), layout.rows, fontsize=7)
        ax.set_title(f"{title}\nmean over the arms in each cell", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
    ranked = np.argsort(-probabilities[-1], kind="stable")
    favoured = list(ranked[:lines]) + [i for i in ranked[-lines:] if i not in ranked[:lines]]
    for i in favoured:
        axes[1, 0].plot(steps, probabilities[:, i], marker=".", label=layout.labels[i])
    axes[1, 0].axhline(probabilities[-1].mean(), color="0.5", linestyle="--", label="mean (selection budget)")
    axes[1, 0].set(xlabel="optimizer step", ylabel="probability", title="most and least favoured arms")
    axes[1, 0].legend(fontsize=6)
    for ax in axes[1]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 1].plot(steps, state["active_param_ratio"], marker=".")
    axes[1, 1].set(xlabel="optimizer step", ylabel="share of trainable elements", ylim=(0, None),
                   title="active-parameter ratio (mean per logging window)")
    fig.suptitle(f"SL-SAM arm selection: {len(layout.labels)} arms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
