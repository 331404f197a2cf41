"""`SAMTrainingArguments`: every SL-SAM / ZO-SAM option as a `TrainingArguments` field with help text."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

SAM_MODES = ("none", "sam", "asam", "zo", "msam", "lookback")
ZO_DIRECTIONS = ("gaussian", "momentum")
SPARSE_UPDATES = ("freeze", "scale", "momentum")
LAYER_SELECTIONS = ("all", "random", "bandit")
ARM_GRANULARITIES = ("tensor", "block")
BANDIT_REWARDS = ("normalized", "raw", "per_parameter")


@dataclass
class SAMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the sharpness-aware and layer-selection options of `SAMTrainer`.

    One step: pick arms S_t (`layer_selection`), find an ascent direction g on S_t (`sam_mode`), move to
    theta + rho * g / ||g||, take the update gradient there with one backward pass on S_t, come back, and let
    the base optimizer step. The defaults are the combination the benchmark grid found most accurate at AdamW's
    training time (benchmarks/README.md, section 5): the bandit's sparse step scaled by 1/p, without perturbation.
    """

    sam_mode: str = field(
        default="none",
        metadata={
            "help": "How the ascent direction is found. 'none': no perturbation (the default; with "
            "layer_selection='all' it equals Trainer): at AdamW's training time no ascent below paid for its cost "
            "in the benchmark grid (benchmarks/README.md, section 5), and 'sam' was the most accurate per step, at "
            "twice the cost. 'zo': zero-order two-point estimate (2m no-grad forwards, ZO-SAM); 'sam': first "
            "backward pass (SAM); 'asam': SAM scaled element-wise by |theta| (adaptive SAM, use a ~10x larger "
            "sam_rho); 'msam': MSAM, -rho * m / ||m|| along the base optimizer's first moment (no extra pass; use a "
            "~10x larger sam_rho); 'lookback': each selected tensor's last stored update gradient, however many "
            "steps old (about 1/selection_budget), with no extra pass but a copy of every trainable tensor in "
            "memory and in each checkpoint.",
            "choices": list(SAM_MODES),
        },
    )
    sam_rho: float = field(
        default=0.05,
        metadata={"help": "Perturbation radius rho: epsilon = rho * g / ||g||. 0 disables it: no ascent pass, the "
                          "step (and the bandit's reward, the update gradient) is that of sam_mode='none'."},
    )
    sam_ascent_fraction: float = field(
        default=1.0,
        metadata={"help": "Share of each micro-batch (leading rows) the ascent gradient g of sam_mode='sam' / 'asam' is "
                          "computed on, in (0, 1]: the ascent costs that share of a forward and backward (SAM's "
                          "'m-sharpness' with a smaller m). Below 1 the logged loss is the perturbed one, as in the "
                          "zero-order modes."},
    )
    zo_direction: str = field(
        default="momentum",
        metadata={
            "help": "Probe direction u of sam_mode='zo'. 'gaussian': u ~ N(0, I) (ZO-SAM); 'momentum': u = the base "
            "optimizer's first moment (AdamW exp_avg, SGD momentum_buffer) over the selected tensors, so the probe "
            "only picks the sign: epsilon = rho * sign(c) * u / ||u||. Tensors without optimizer state yet add "
            "nothing; with none, the step is not perturbed.",
            "choices": list(ZO_DIRECTIONS),
        },
    )
    zo_num_directions: int = field(
        default=1,
        metadata={"help": "Random Gaussian directions m averaged by the zero-order estimate (2 forwards each); "
                          "must be 1 with zo_direction='momentum' (there is one prior direction)."},
    )
    zo_eps: float = field(
        default=1e-3,
        metadata={"help": "Finite-difference step delta of the zero-order estimate: (l(t+du) - l(t-du)) / 2delta."},
    )
    zo_probe_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Share of each micro-batch (leading rows) the zero-order probe forwards use, in (0, 1]: "
            "trades the probe's cost against its noise. A one-row micro-batch (batch size 1, packed sequences) is "
            "probed whole."
        },
    )
    layer_selection: str = field(
        default="bandit",
        metadata={
            "help": "Which parameter tensors (arms) train each step. 'bandit': EXP3 over gradient norms (SL-SAM); "
            "'random': uniform with the same budget; 'all': every trainable tensor (plain SAM / ZO-SAM).",
            "choices": list(LAYER_SELECTIONS),
        },
    )
    selection_budget: float = field(
        default=0.2,
        metadata={"help": "Budget s in (0, 1]: expected share of arms selected per step (sum of p = s * N)."},
    )
    sparse_update: str = field(
        default="scale",
        metadata={
            "help": "How a step with layer selection moves the weights. 'freeze': only selected tensors get a "
            "gradient and move (SL-SAM); 'scale': as 'freeze', and each selected arm's optimizer step (including "
            "weight decay) is multiplied by min(1 / p_i, sparse_update_max_scale), p_i its selection probability, "
            "so the expected update is the dense one (always-selected tensors are not scaled); 'momentum': "
            "unselected tensors that already have optimizer state get a zero gradient, so the base optimizer moves "
            "them along its decaying first moment (and applies weight decay), with no backward cost.",
            "choices": list(SPARSE_UPDATES),
        },
    )
    sparse_update_max_scale: float = field(
        default=10.0, metadata={"help": "Upper bound (>= 1) of the 1 / p_i factor of sparse_update='scale'."}
    )
    selection_interval: int = field(
        default=1,
        metadata={"help": "Hold each drawn selection for this many optimizer steps (LISA / BAdam style); the "
                          "bandit still learns every step. 1 draws a new selection every step."},
    )
    bandit_lr: float = field(
        default=1e-3, metadata={"help": "EXP3 learning rate alpha: w_i = p_i * exp(-alpha * loss_i / p_i)."}
    )
    bandit_reward: str = field(
        default="normalized",
        metadata={
            "help": "Reward a_i of a selected arm. 'raw': its gradient norm (the released SL-SAM rule, not "
            "scale-invariant); 'normalized': gradient norm divided by the largest among the selected arms; "
            "'per_parameter': gradient norm / sqrt(number of elements) (the RMS gradient, so big tensors are not "
            "favoured for their size), divided by the largest.",
            "choices": list(BANDIT_REWARDS),
        },
    )
    bandit_min_prob: float = field(
        default=1e-3,
        metadata={
            "help": "Floor p_min of every arm's probability, in (0, selection_budget). SL-SAM's code uses 1e-8; "
            "a real floor keeps every arm explored."
        },
    )
    arm_granularity: str = field(
        default="tensor",
        metadata={
            "help": "'tensor': one arm per trainable parameter tensor, except that a LoRA adapter's A and B in one "
            "module form one arm (either has zero gradient while the other is zero); 'block': one arm per "
            "transformer block (indexed child of a top-level ModuleList) or other top-level module.",
            "choices": list(ARM_GRANULARITIES),
        },
    )
    always_selected: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": "Parameter-name regexes (re.search) that join every step's selection and are not bandit arms. "
            "'auto': a newly initialised task head (classifier / score / qa_outputs weights missing from the "
            "checkpoint) and PEFT modules_to_save; 'none': nothing (the paper's rule, the head is an arm).",
            "nargs": "+",
        },
    )
    sam_cosine_log_steps: int = field(
        default=0,
        metadata={
            "help": "Every k optimizer steps, log ascent_cosine = cos(ascent direction, true gradient) on the "
            "selected arms (one extra backward). 0 turns the diagnostic off."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.always_selected, str):
            self.always_selected = [self.always_selected]
        self._check_choice("sam_mode", SAM_MODES)
        self._check_choice("layer_selection", LAYER_SELECTIONS)
        self._check_choice("arm_granularity", ARM_GRANULARITIES)
        self._check_choice("bandit_reward", BANDIT_REWARDS)
        self._check_choice("zo_direction", ZO_DIRECTIONS)
        self._check_choice("sparse_update", SPARSE_UPDATES)
        self._check_range("sparse_update_max_scale", self.sparse_update_max_scale >= 1, ">= 1")
        self._check_range("selection_interval", self.selection_interval >= 1, "an integer >= 1")
        self._check_range("sam_rho", self.sam_rho >= 0, ">= 0")
        self._check_range("zo_eps", self.zo_eps > 0, "> 0")
        self._check_range("zo_num_directions", self.zo_num_directions >= 1, "an integer >= 1")
        if self.zo_direction == "momentum" and self.zo_num_directions != 1:
            raise ValueError(
                f"zo_num_directions must be 1 with zo_direction='momentum' (one prior direction), got "
                f"{self.zo_num_directions}"
            )
        self._check_range("zo_probe_fraction", 0 < self.zo_probe_fraction <= 1, "in (0, 1]")
        self._check_range("sam_ascent_fraction", 0 < self.sam_ascent_fraction <= 1, "in (0, 1]")
        self._check_range("selection_budget", 0 < self.selection_budget <= 1, "in (0, 1]")
        self._check_range("bandit_lr", self.bandit_lr >= 0, ">= 0")
        self._check_range(
            "bandit_min_prob", 0 < self.bandit_min_prob < self.selection_budget, "in (0, selection_budget)"
        )
        self._check_range("sam_cosine_log_steps", self.sam_cosine_log_steps >= 0, ">= 0")
        # Unselected arms get no gradient: DDP must not wait for them.
        if self.layer_selection != "all" and self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        if self.layer_selection != "all" and self.ddp_find_unused_parameters is False:
            raise ValueError(
                f"ddp_find_unused_parameters=False cannot be combined with layer_selection={self.layer_selection!r}: "
                "unselected tensors get no gradient, and DDP would wait for them at the second step. Leave it unset "
                "(SAMTrainer sets it to True) or use layer_selection='all'."
            )
        if self.layer_selection != "all" and (self.activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "activation_checkpointing_kwargs={'use_reentrant': True} cannot be combined with "
                f"layer_selection={self.layer_selection!r}: reentrant checkpointing gives no gradient to selected "
                "tensors above a frozen input. Use {'use_reentrant': False} (the default) or layer_selection='all'."
            )

    def _check_choice(self, name, allowed):
        if getattr(self, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

    def _check_range(self, name, ok, allowed):
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
