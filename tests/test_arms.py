"""Arm grouping: tensors or blocks, and which tensors are always selected."""

import warnings

import pytest
from conftest import tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import BertForMaskedLM, BertForSequenceClassification

from slsam_hf.arms import group_arms


def names(arms):
    return [arm.name for arm in arms]


def test_tensor_arms_leave_the_new_head_always_selected():
    model = tiny_bert()
    arms, always = group_arms(model, "tensor", ["auto"])
    assert always.param_names == ["classifier.weight", "classifier.bias"]
    assert names(arms) == [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]
    assert all(len(arm.params) == 1 for arm in arms)


def reloaded(tmp_path, saved_as, loaded_as):
    """tiny_bert's body saved as `saved_as` with save_pretrained and loaded back as `loaded_as` with
    from_pretrained (which marks the tensors it loaded)."""
    saved_as(tiny_bert().config).save_pretrained(tmp_path / "saved")
    return loaded_as.from_pretrained(tmp_path / "saved")


def test_loaded_head_is_an_arm_and_none_makes_every_tensor_an_arm(tmp_path):
    model = reloaded(tmp_path, BertForSequenceClassification, BertForSequenceClassification)
    arms, always = group_arms(model, "tensor", ["auto"])
    assert always.params == [] and names(arms) == [n for n, _ in model.named_parameters()]
    arms, always = group_arms(tiny_bert(), "tensor", ["none"])
    assert always.params == [] and len(arms) == len(list(tiny_bert().parameters()))


def test_auto_selects_every_tensor_the_checkpoint_lacked_whatever_its_name(tmp_path):
    """A masked-LM checkpoint has no pooler and no classifier: both are new in a sequence classifier."""
    model = reloaded(tmp_path, BertForMaskedLM, BertForSequenceClassification)
    arms, always = group_arms(model, "tensor", ["auto"])
    assert always.param_names == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                  "classifier.bias"]
    assert names(arms) == [n for n, _ in model.named_parameters() if n not in always.param_names]


def test_lora_adapters_on_a_loaded_model_stay_arms(tmp_path):
    """Adapter tensors carry no load mark either, but transformers did not build their modules."""
    model = reloaded(tmp_path, BertForSequenceClassification, BertForSequenceClassification)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    arms, always = group_arms(model, "tensor", ["auto"])
    assert_one_arm_per_adapted_module(arms)
    assert always.param_names == ["base_model.model.classifier.modules_to_save.default.weight",
                                  "base_model.model.classifier.modules_to_save.default.bias"]


def test_custom_patterns():
    arms, always = group_arms(tiny_bert(), "tensor", [r"LayerNorm", r"^bert\.pooler\."])
    assert always.param_names and all("LayerNorm" in n or n.startswith("bert.pooler.") for n in always.param_names)
    assert not any("LayerNorm" in n for n in names(arms))


def test_block_arms_of_an_encoder():
    arms, always = group_arms(tiny_bert(), "block", ["auto"])
    assert names(arms) == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler"]
    assert sum(arm.numel for arm in arms) + sum(p.numel() for p in always.params) == sum(
        p.numel() for p in tiny_bert().parameters())


def test_block_arms_of_a_decoder_with_tied_head():
    arms, always = group_arms(tiny_llama(), "block", ["auto"])
    # lm_head is tied to embed_tokens: one tensor, one arm, and not "always selected".
    assert names(arms) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"]
    assert always.params == []


def assert_one_arm_per_adapted_module(arms):
    """tiny_bert with LoRA on query and value: 2 layers x (query, value) arms, each holding that module's A and B."""
    modules = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}"
               for i in (0, 1) for m in ("query", "value")]
    assert names(arms) == [f"{m}.lora.default" for m in modules]
    for arm, module in zip(arms, modules):
        assert arm.param_names == [f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"]


def test_lora_arms_pair_each_modules_a_and_b_and_modules_to_save_is_always_selected():
    config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(), config)
    arms, always = group_arms(model, "tensor", ["auto"])
    assert_one_arm_per_adapted_module(arms)
    assert always.param_names == ["base_model.model.classifier.modules_to_save.default.weight",
                                  "base_model.model.classifier.modules_to_save.default.bias"]
    blocks, _ = group_arms(model, "block", ["auto"])
    assert names(blocks) == ["base_model.model.bert.encoder.layer.0", "base_model.model.bert.encoder.layer.1"]


def test_frozen_parameters_are_not_arms():
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    arms, _ = group_arms(model, "tensor", ["auto"])
    assert not any(n.startswith("bert.embeddings.") for n in names(arms))


def test_unknown_granularity():
    with pytest.raises(ValueError, match="arm_granularity"):
        group_arms(tiny_bert(), "layer", ["auto"])


def test_always_selected_pattern_that_matches_nothing_warns():
    model = tiny_bert()
    with pytest.warns(UserWarning, match="'auto,classifier' matches no trainable parameter"):
        group_arms(model, "tensor", ["auto,classifier"])
    with pytest.warns(UserWarning, match="'lm_head' matches no"):
        group_arms(model, "tensor", ["classifier", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arms, always = group_arms(model, "tensor", ["auto", "pooler"])
    assert any("pooler" in name for name in always.param_names)
