"""Arms: the groups of trainable parameter tensors that layer selection turns on and off (pure torch)."""

import re
import warnings
from dataclasses import dataclass, field

from torch import nn

# Task heads a model adds on top of a pretrained body (BERT-style, Llama-style, QA); `lm_head` is not one of
# them: it is pretrained and often tied to the input embeddings.
AUTO_HEAD_PATTERN = re.compile(r"(^|\.)(classifier|pre_classifier|score|qa_outputs)\.")
PEFT_SAVED_MODULE_PATTERN = re.compile(r"(^|\.)modules_to_save\.")
# A LoRA adapter's tensors in an adapted module: `<module>.lora_A.<adapter>.weight` and the like.
LORA_TENSOR_PATTERN = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.(?P<adapter>[^.]+)"
)


@dataclass
class Arm:
    """One bandit arm: a name and the parameter tensors it switches together."""

    name: str
    param_names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def is_new_head(name: str, param: nn.Parameter, module: nn.Module, loaded: bool) -> bool:
    """A tensor that `from_pretrained` initialised instead of loading (a new task head), or a PEFT modules_to_save copy.

    transformers marks (`_is_hf_initialized`) each tensor it loaded from the checkpoint and each module it built.
    On a `loaded` model (some tensor carries the mark), a tensor without the mark in a module transformers built is
    new, whatever its name (a BART `classification_head`, a pooler the checkpoint lacked); modules added later,
    such as PEFT adapters, are not heads. Models built from a config have no tensor marks: the head names decide.
    """
    if PEFT_SAVED_MODULE_PATTERN.search(name):
        return True
    if getattr(param, "_is_hf_initialized", False):
        return False
    return (loaded and getattr(module, "_is_hf_initialized", False)) or bool(AUTO_HEAD_PATTERN.search(name))


def matches_always_selected(name: str, new_head: bool, patterns: list[str]) -> bool:
    """`patterns` are regexes searched in the parameter name; 'auto' means a new head (`is_new_head`), 'none'
    nothing."""
    for pattern in patterns:
        if pattern == "none":
            continue
        if pattern == "auto":
            if new_head:
                return True
        elif re.search(pattern, name):
            return True
    return False


def tensor_arm_name(param_name: str) -> str:
    """The arm of a tensor under 'tensor' granularity: the tensor itself, except that the LoRA tensors of one adapter
    in one adapted module share the arm `<module>.lora.<adapter>`. At PEFT's init B = 0, so dL/dA = 0 exactly, and
    later |dL/dA| stays ~|B| small: a bandit over single tensors would starve every A."""
    match = LORA_TENSOR_PATTERN.search(param_name)
    return param_name if match is None else f"{param_name[: match.start()]}.lora.{match['adapter']}"


def _top_level_module_lists(model: nn.Module) -> list[str]:
    """Paths of the ModuleLists that sit inside no other ModuleList (the transformer block stacks)."""
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and name]
    return [n for n in lists if not any(n.startswith(outer + ".") for outer in lists)]


def block_name(param_name: str, module_lists: list[str]) -> str:
    """The block a parameter belongs to: `<list>.<index>` inside a block stack, else the shortest module path
    that holds no block stack (`bert.embeddings`, `model.norm`, `classifier`)."""
    for stack in module_lists:
        if param_name.startswith(stack + "."):
            index = param_name[len(stack) + 1 :].split(".", 1)[0]
            return f"{stack}.{index}"
    parts = param_name.split(".")
    for k in range(1, len(parts)):
        prefix = ".".join(parts[:k])
        if not any(stack == prefix or stack.startswith(prefix + ".") for stack in module_lists):
            return prefix
    return param_name


def group_arms(
    model: nn.Module, granularity: str = "tensor", always_selected: list[str] = ("auto",)
) -> tuple[list[Arm], Arm]:
    """Split the trainable parameters of `model` into bandit arms and the always-selected group.

    Returns `(arms, always)`; `always.params` train every step and are not arms. A regex of `always_selected` that
    matches no trainable tensor (a typo, `lm_head` tied to the embeddings, "auto,classifier" as one string) warns.
    """
    if granularity not in ("tensor", "block"):
        raise ValueError(f"arm_granularity must be one of ['tensor', 'block'], got {granularity!r}")
    module_lists = _top_level_module_lists(model) if granularity == "block" else []
    arms: dict[str, Arm] = {}
    always = Arm("always_selected")
    loaded = any(getattr(p, "_is_hf_initialized", False) for p in model.parameters())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new_head = is_new_head(name, param, model.get_submodule(name.rpartition(".")[0]), loaded)
        if matches_always_selected(name, new_head, list(always_selected)):
            arm = always
        else:
            key = block_name(name, module_lists) if granularity == "block" else tensor_arm_name(name)
            arm = arms.setdefault(key, Arm(key))
        arm.param_names.append(name)
        arm.params.append(param)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    for pattern in always_selected:
        if pattern not in ("auto", "none") and not any(re.search(pattern, name) for name in trainable):
            warnings.warn(f"always_selected pattern {pattern!r} matches no trainable parameter tensor (patterns are "
                          "regexes searched in parameter names, one per list entry)", stacklevel=2)
    return list(arms.values()), always
