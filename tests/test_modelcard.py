"""The model card says how the model was trained: method, measured figures, tags and citation."""

import numpy as np
import pytest
from conftest import classification_data, lm_data, sam_args, tiny_bert, tiny_llama
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from slsam_hf import SAMTrainer
from slsam_hf.assets import MINILM, hub_id
from slsam_hf.modelcard import CITATION, method_section, sam_options, with_method

# Three arms (embeddings, block 0, block 1), two logging windows of 1 and 3 steps.
HISTORY = {
    "arm_names": ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"],
    "steps": [1, 4], "window_steps": [1, 3], "counts": [[0, 1, 0], [1, 3, 2]],
    "probabilities": [[0.5, 0.5, 0.5], [0.3, 0.9, 0.3]], "active_param_ratio": [0.2, 0.6],
}


def test_method_section_states_the_options_and_the_measured_figures(tmp_path):
    options = sam_options(sam_args(tmp_path, sam_mode="sam", sam_rho=0.1, selection_budget=0.5))
    assert options["sam_mode"] == "sam" and "learning_rate" not in options
    section = method_section(options, HISTORY)
    assert "- ascent (`sam_mode=sam`): first-order (SAM)" in section and "radius ρ = 0.1" in section
    assert "budget 0.5: 1.5 of 3 arms" in section and "SL-SAM bandit" in section
    assert "measured active-parameter ratio: 50.0% of the trainable elements" in section  # (0.2 + 3 * 0.6) / 4
    assert "mean over 4 steps" in section
    assert "most-selected blocks (share of steps their arms were selected): block 0 (100%), block 1 (50%), " \
           "embeddings (25%)" in section
    dense = method_section(sam_options(sam_args(tmp_path, sam_rho=0, layer_selection="all")), HISTORY)
    assert "- ascent (`sam_mode=zo`): none: no perturbation" in dense
    assert "every trainable tensor takes part in every step" in dense and "measured" not in dense


def test_the_method_goes_under_training_procedure_and_the_citation_at_the_end():
    card = "# m\n\n## Training procedure\n\n### Training hyperparameters\n\n- lr: 1\n"
    text = with_method(card, "METHOD\n")
    assert text.index("## Training procedure") < text.index("METHOD") < text.index("### Training hyperparameters")
    assert text.endswith(f"## Citation\n\n{CITATION}")
    assert with_method("# m\n", "METHOD\n").startswith("# m\n\n## Training procedure\n\nMETHOD\n\n## Citation")


def card_of(trainer):
    trainer.train()
    trainer.save_model()
    return ModelCard.load(f"{trainer.args.output_dir}/README.md")


def test_a_saved_model_has_a_card_with_the_method_its_figures_tags_and_citation(tmp_path):
    trainer = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, max_steps=6, logging_steps=2),
                         train_dataset=classification_data())
    card = card_of(trainer)
    assert {"generated_from_trainer", "sam", "slsam_hf"} <= set(card.data.tags)
    ratios = [log["active_param_ratio"] for log in trainer.state.log_history if "active_param_ratio" in log]
    assert len(ratios) == 3  # three windows of two steps: the run's mean is their mean
    assert f"measured active-parameter ratio: {np.mean(ratios):.1%}" in card.text
    rows = {"embeddings": [], "block 0": [], "block 1": [], "head": []}  # tiny_bert's, in model order
    for arm, selections in zip(trainer.arms, np.sum(trainer.history.counts, axis=0)):
        layer = [row for row in ("block 0", "block 1") if f".layer.{row[-1]}." in arm.name]
        row = layer[0] if layer else "embeddings" if ".embeddings." in arm.name else "head"
        rows[row].append(selections / 6)
    top = sorted(rows, key=lambda row: -np.mean(rows[row]))[:3]  # stable: ties stay in model order
    blocks = ", ".join(f"{row} ({np.mean(rows[row]):.0%})" for row in top)
    assert f"blocks (share of steps their arms were selected): {blocks}\n" in card.text
    assert "`sam_mode=zo`" in card.text and "arXiv:2602.09395" in card.text and "arXiv:2603.13115" in card.text
    assert card.text.count("## Citation") == 1
    trainer.create_model_card()  # again, as push_to_hub does after a save: one method section, one citation
    assert ModelCard.load(tmp_path / "README.md").text.count("### Sharpness-aware training") == 1


def test_a_lora_adapters_card_keeps_peft_metadata_and_sam_tags(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    card = card_of(SAMTrainer(model=model, args=sam_args(tmp_path, max_steps=2), train_dataset=lm_data()))
    assert card.data.library_name == "peft" and {"sam", "slsam_hf"} <= set(card.data.tags)
    assert "### Sharpness-aware training (slsam_hf)" in card.text and "block 1 (" in card.text


@pytest.mark.parametrize("name, expected", [(MINILM, "sentence-transformers/all-MiniLM-L6-v2"),
                                            ("org/model", "org/model"), (".", None)])
def test_hub_id_of_an_alias_a_hub_name_and_a_folder(name, expected):
    assert hub_id(name) == expected
