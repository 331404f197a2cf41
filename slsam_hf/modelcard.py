"""What the model card (README.md) says about a `SAMTrainer` run: the method, its measured figures, tags, citation."""

from dataclasses import fields

from huggingface_hub import ModelCard
from transformers import TrainingArguments

from .history import mean_active_param_ratio, most_selected_rows
from .training_args import SAMTrainingArguments

SAM_TAGS = ["sam", "slsam_hf"]

ASCENTS = {
    "zo": "zero-order (ZO-SAM): two no-grad forwards along a probe direction give the ascent",
    "sam": "first-order (SAM): a backward pass at the weights gives the ascent",
    "asam": "adaptive SAM: the first-order ascent scaled element-wise by |θ|",
    "msam": "MSAM: ε = −ρ·m/‖m‖ along the optimizer's first moment m, no extra pass",
    "lookback": "each selected tensor's last update gradient, no extra pass",
}
ZO_DIRECTIONS = {
    "momentum": "the optimizer's first moment (the probe picks its sign)",
    "gaussian": "{zo_num_directions} Gaussian direction(s)",
}
SELECTIONS = {
    "bandit": "SL-SAM bandit (EXP3 over gradient norms; reward `{bandit_reward}`, α = {bandit_lr}, "
    "p_min = {bandit_min_prob})",
    "random": "uniform random",
}
SPARSE_UPDATES = {
    "scale": "each selected arm's optimizer step multiplied by min(1/p, {sparse_update_max_scale}), p its probability",
    "freeze": "selected arms step as usual, the others stay frozen (SL-SAM)",
    "momentum": "unselected tensors with optimizer state move along their first moment",
}

# From the two papers' arXiv abstract pages; the SL-SAM authors in the order that page lists them (alphabetical by
# given name, which may not be the paper's); the ZO-SAM page gives neither title nor authors.
CITATION = """\
SL-SAM: Chao Huang, Dianhai Yu, Fei Ma, Guoxia Wang, Li Shen, Xianglin Yang, Xiaochun Cao, Yifei Cheng (as listed on
the abstract page). *Sparse Layer Sharpness-Aware Minimization for Efficient Fine-Tuning.* arXiv:2602.09395, 2026.

ZO-SAM: *Zero-Order Sharpness-Aware Minimization (ZO-SAM).* arXiv:2603.13115, 2026 (the method's name; see arXiv for
the paper's title and authors).

```bibtex
@misc{slsam2026,
  title         = {Sparse Layer Sharpness-Aware Minimization for Efficient Fine-Tuning},
  author        = {Chao Huang and Dianhai Yu and Fei Ma and Guoxia Wang and Li Shen and Xianglin Yang and
                   Xiaochun Cao and Yifei Cheng},
  year          = {2026},
  eprint        = {2602.09395},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
}

@misc{zosam2026,
  note          = {Zero-Order Sharpness-Aware Minimization (ZO-SAM)},
  year          = {2026},
  eprint        = {2603.13115},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
}
```
"""


def sam_options(args: SAMTrainingArguments) -> dict:
    """The options `SAMTrainingArguments` adds to `TrainingArguments`, by name."""
    stock = {f.name for f in fields(TrainingArguments)}
    return {f.name: getattr(args, f.name) for f in fields(SAMTrainingArguments) if f.name not in stock}


def method_section(options: dict, history: dict) -> str:
    """Markdown on how a model was trained: the method from `options` (`sam_options`), and from `history` (a
    `SelectionHistory.state_dict()`) the measured active-parameter ratio and the most-selected blocks."""
    mode = options["sam_mode"]
    if mode == "none" or options["sam_rho"] == 0:
        ascent = "none: no perturbation"
    else:
        ascent = f"{ASCENTS[mode]}; radius ρ = {options['sam_rho']}"
        if mode == "zo":
            direction = ZO_DIRECTIONS[options["zo_direction"]].format(**options)
            ascent += (f"; probe along {direction}, on {options['zo_probe_fraction']:.0%} of each micro-batch, "
                       f"δ = {options['zo_eps']}")
    lines = ["### Sharpness-aware training (slsam_hf)", "",
             "Trained with `slsam_hf.SAMTrainer`, sharpness-aware minimization whose layer selection follows SL-SAM "
             "and whose zero-order ascent follows ZO-SAM (cited below):", "",
             f"- ascent (`sam_mode={mode}`): {ascent}"]
    selection = options["layer_selection"]
    if selection == "all":
        lines.append("- layer selection: none, every trainable tensor takes part in every step")
    else:
        arms = len(history["arm_names"])
        budget = options["selection_budget"]
        lines += [f"- layer selection (`layer_selection={selection}`): {SELECTIONS[selection].format(**options)}; "
                  f"budget {budget}: {budget * arms:.1f} of {arms} arms "
                  f"(`arm_granularity={options['arm_granularity']}`) per step, drawn every "
                  f"{options['selection_interval']} step(s)",
                  f"- sparse update (`sparse_update={options['sparse_update']}`): "
                  f"{SPARSE_UPDATES[options['sparse_update']].format(**options)}"]
        if history["steps"]:
            blocks = ", ".join(f"{row} ({share:.0%})" for row, share in most_selected_rows(history))
            lines += [f"- measured active-parameter ratio: {mean_active_param_ratio(history):.1%} of the trainable "
                      f"elements got a gradient, mean over {sum(history['window_steps'])} steps",
                      f"- most-selected blocks (share of steps their arms were selected): {blocks}"]
    settings = ", ".join(f"`{name}={value}`" for name, value in options.items())
    return "\n".join([*lines, "", f"All options: {settings}.", ""])


def with_method(text: str, section: str) -> str:
    """Card text with `section` at the top of its '## Training procedure' (added at the end when missing) and the
    citation of the two papers at the end."""
    heading = "## Training procedure\n"
    if heading in text:
        head, _, tail = text.partition(heading)
        text = f"{head}{heading}\n{section}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{heading}\n{section}"
    return f"{text.rstrip()}\n\n## Citation\n\n{CITATION}"


def add_to_model_card(path: str, section: str) -> None:
    """Add the method `section`, the citation and the tags `sam`, `slsam_hf` to the model card at `path`."""
    card = ModelCard.load(path)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *SAM_TAGS]))
    card.text = with_method(card.text, section)
    card.save(path)
