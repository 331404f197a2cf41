"""Where arms sit (rows = embeddings / blocks / head, columns = tensor kind) on real models, and the selection picture
drawn again from selection_history.json."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from slsam_hf.__main__ import main
from slsam_hf.arms import group_arms
from slsam_hf.assets import MINILM, SMOLLM2, resolve_model
from slsam_hf.history import (HISTORY_JSON, arm_layout, mean_active_param_ratio, most_selected_rows,
                              plot_selection, selection_share)


def cells(arm_names):
    """{arm name: (row, kind)} as `arm_layout` places them."""
    layout = arm_layout(arm_names)
    return {name: (layout.rows[r], layout.kinds[k]) for name, r, k in zip(arm_names, layout.row_of, layout.kind_of)}


def test_smollm2_lora_arms_sit_in_their_block_and_projection():
    """The recipe's model: the real SmolLM2-135M architecture (30 blocks) with LoRA on every linear layer; one arm
    per adapted module (A and B together), no embeddings or head arm."""
    with torch.device("meta"):  # names only: no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(SMOLLM2)))
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    names = [arm.name for arm in group_arms(model)[0]]
    modules = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    expected = {f"base_model.model.model.layers.{i}.{module}.lora.default": (f"block {i}", f"{kind} LoRA")
                for i in range(30) for kind, module in modules.items()}
    assert cells(names) == expected
    layout = arm_layout(names)
    assert layout.rows == [f"block {i}" for i in range(30)]
    assert layout.kinds == [f"{kind} LoRA" for kind in modules]
    assert layout.labels[0] == "block 0: self_attn.q_proj LoRA"


def test_minilm_arms_sit_in_embeddings_blocks_and_head():
    """The real MiniLM-L6 sequence classifier, fully fine-tuned: the new classifier is always selected (no arm)."""
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(MINILM), num_labels=2)
    names = [arm.name for arm in group_arms(model)[0]]
    block = {"attention.self.query.weight": "q", "attention.self.key.weight": "k", "attention.self.value.weight": "v",
             "attention.output.dense.weight": "o", "intermediate.dense.weight": "up", "output.dense.weight": "down",
             "attention.output.LayerNorm.weight": "norm", "attention.output.LayerNorm.bias": "norm",
             "output.LayerNorm.weight": "norm", "output.LayerNorm.bias": "norm"}
    biases = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]
    block.update({f"{module}.bias": "bias" for module in biases})
    expected = {f"bert.embeddings.{name}.weight": ("embeddings", name)
                for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    expected.update({"bert.embeddings.LayerNorm.weight": ("embeddings", "norm"),
                     "bert.embeddings.LayerNorm.bias": ("embeddings", "norm")})
    expected.update({f"bert.encoder.layer.{i}.{tensor}": (f"block {i}", kind) for i in range(6)
                     for tensor, kind in block.items()})
    expected.update({"bert.pooler.dense.weight": ("head", "pooler"), "bert.pooler.dense.bias": ("head", "bias")})
    assert cells(names) == expected
    layout = arm_layout(names)
    assert layout.rows == ["embeddings", *(f"block {i}" for i in range(6)), "head"]
    assert layout.kinds == ["word_embeddings", "position_embeddings", "token_type_embeddings", "q", "k", "v", "o",
                            "up", "down", "norm", "bias", "pooler"]


def test_block_arms_and_several_block_stacks():
    names = [arm.name for arm in group_arms(tiny_llama(), "block")[0]]
    assert cells(names) == {"model.embed_tokens": ("embeddings", "embed_tokens"), "model.norm": ("head", "norm"),
                            "model.layers.0": ("block 0", "block"), "model.layers.1": ("block 1", "block")}
    # An encoder-decoder (T5 names): one row per block of each stack, named by the stack.
    t5 = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
          "encoder.block.0.layer.1.DenseReluDense.wo.weight", "encoder.final_layer_norm.weight",
          "decoder.block.0.layer.1.EncDecAttention.o.weight"]
    assert cells(t5) == {"shared.weight": ("embeddings", "shared"), t5[1]: ("encoder.block 0", "q"),
                         t5[2]: ("encoder.block 0", "down"), t5[3]: ("head", "norm"), t5[4]: ("decoder.block 0", "o")}
    assert arm_layout(t5).rows == ["embeddings", "encoder.block 0", "decoder.block 0", "head"]


# Four arms, two logging windows of 2 and 6 steps.
STATE = {
    "arm_names": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                  "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"],
    "steps": [2, 8], "window_steps": [2, 6],
    "counts": [[0, 1, 2, 1], [2, 3, 6, 0]],
    "probabilities": [[0.2, 0.3, 0.4, 0.1], [0.1, 0.4, 0.45, 0.05]],
    "active_param_ratio": [0.5, 0.25],
}


def test_grid_and_summaries_match_hand_computed_values():
    share = selection_share(STATE)
    np.testing.assert_allclose(share, [2 / 8, 4 / 8, 8 / 8, 1 / 8])
    layout = arm_layout(STATE["arm_names"])
    assert layout.rows == ["embeddings", "block 0", "block 1"] and layout.kinds == ["embed_tokens", "q", "up"]
    grid = layout.grid(np.array(STATE["probabilities"][-1]))
    expected = [[0.1, np.nan, np.nan], [np.nan, 0.4, 0.45], [np.nan, 0.05, np.nan]]
    np.testing.assert_allclose(grid, expected)
    assert mean_active_param_ratio(STATE) == pytest.approx((2 * 0.5 + 6 * 0.25) / 8)
    # block 0: its two arms selected in 4/8 and 8/8 of the steps
    assert most_selected_rows(STATE, 2) == [("block 0", pytest.approx(0.75)), ("embeddings", pytest.approx(0.25))]


def test_picture_is_drawn_again_from_the_json(tmp_path, capsys):
    with open(tmp_path / HISTORY_JSON, "w") as f:
        json.dump(STATE, f)
    main([str(tmp_path), "--top", "1"])
    assert (tmp_path / "selection_heatmap.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "4 arms, 8 steps, active-parameter ratio 31.2%" in printed
    assert "block 0: its arms selected in 75.0%" in printed
    assert plot_selection(STATE, str(tmp_path / "again.png"))
