"""The benchmark scripts run end to end on a tiny setting (real models, a few steps) and write sane numbers, so
they do not rot between the long runs recorded in benchmarks/README.md. The drivers run in this process (the
step-cost workers and the LLM recipes still start their own)."""

import json
import math
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ascent_cosine
import glue_accuracy
import llm_accuracy
import step_cost
import step_overhead
from step_cost import read_jsonl

from slsam_hf.assets import MINILM, resolve_model


def run_benchmark(module, *args) -> None:
    module.main([str(arg) for arg in args])


def test_step_cost_counts_passes_and_writes_ratios(tmp_path):
    run_benchmark(step_cost, "--models", "minilm", "--methods", "adamw", "sam", "sl_zo", "sl_zo_momentum_probe025",
                  "--repeats", 1,
                  "--steps", 2, "--warmup_steps", 1, "--batch_size", 2, "--seq_length", 16, "--threads", 1,
                  "--output_dir", tmp_path, "--tag", "tiny")
    result = json.loads((tmp_path / "tiny.json").read_text())
    rows = {row["method"]: row for row in result["summary"]}
    assert set(rows) == {"adamw", "sam", "sl_zo", "sl_zo_momentum_probe025"}
    # Passes per step, counted by hooks: AdamW F+B, SAM 2F+2B, ZO-SAM (m=1) 2 no-grad F0 + F + B.
    assert (rows["adamw"]["forward_nograd"], rows["adamw"]["forward_grad"], rows["adamw"]["backward"]) == (0, 1, 1)
    assert (rows["sam"]["forward_nograd"], rows["sam"]["forward_grad"], rows["sam"]["backward"]) == (0, 2, 2)
    assert (rows["sl_zo"]["forward_nograd"], rows["sl_zo"]["forward_grad"], rows["sl_zo"]["backward"]) == (2, 1, 1)
    assert rows["adamw"]["time_ratio"] == rows["adamw"]["memory_ratio"] == 1.0
    assert rows["adamw"]["active_param_ratio"] == 1.0 and 0 < rows["sl_zo"]["active_param_ratio"] < 1
    runs = {run["method"]: run for run in result["runs"]}
    assert math.isclose(rows["sam"]["time_ratio"], runs["sam"]["seconds"] / runs["adamw"]["seconds"])
    assert all(len(run["step_seconds"]) == 2 and run["peak_memory_mb"] > 0 for run in runs.values())
    assert (tmp_path / "tiny.png").stat().st_size > 0


def test_step_cost_compares_each_fsdp_run_with_the_same_rounds_ddp_run():
    """--fsdp: '<method>/fsdp' rows hold ratios to the same round's DDP AdamW run and to the DDP run of <method>."""
    seconds = {("adamw", 0): 1.0, ("adamw", 1): 2.0, ("sam", 0): 2.0, ("sam", 1): 4.0, ("sam/fsdp", 0): 3.0,
               ("sam/fsdp", 1): 4.0}
    keys = ("peak_memory_mb", "optimizer_state_mb", "active_param_ratio", "forward_nograd", "forward_grad", "backward",
            "backward_depth", "seconds_forward_nograd", "seconds_forward_grad", "seconds_optimizer", "selected_arms",
            "arms")
    records = [{"model": "minilm", "method": method, "round": round_index, "seconds": value, "cpu_seconds": value,
                **dict.fromkeys(keys, 1.0)} for (method, round_index), value in seconds.items()]
    rows = {row["method"]: row for row in step_cost.summarize(records, ["minilm"], ["adamw", "sam", "sam/fsdp"])}
    fsdp = rows["sam/fsdp"]
    assert (fsdp["time_ratio"], fsdp["time_ratio_range"]) == (2.5, [2.0, 3.0])  # 3/1, 4/2
    assert (fsdp["ddp_time_ratio"], fsdp["ddp_time_ratio_range"]) == (1.25, [1.0, 1.5])  # 3/2, 4/4
    assert "ddp_time_ratio" not in rows["sam"]
    assert "1.25x (1.00-1.50)" in step_cost.format_table(list(rows.values()))


def test_glue_accuracy_both_budgets_flatness_and_resume(tmp_path, capsys):
    args = ["--tasks", "sst2", "--methods", "adamw", "sl_zo", "--seeds", 0, "--max_train_samples", 16,
            "--max_eval_samples", 16, "--num_train_epochs", 1, "--max_seq_length", 32, "--label_noise", 0.25,
            "--per_device_train_batch_size", 8, "--sharpness_samples", 8, "--sharpness_batch_size", 4,
            "--sharpness_directions", 1, "--sharpness_hessian_iters", 2, "--output_dir", tmp_path]
    path = tmp_path / "glue_accuracy.jsonl"
    run_benchmark(glue_accuracy, *args)
    results = read_jsonl(path)
    assert [(r["method"], r["budget"]) for r in results] == [("adamw", "steps"), ("sl_zo", "steps"),
                                                             ("sl_zo", "equal_time")]
    adamw, sl_zo, equal_time = results
    for r in results:
        assert (16 * r["metrics"]["accuracy"]).is_integer()  # k of the 16 dev examples right
        assert set(glue_accuracy.SHARPNESS_KEYS) <= set(r["sharpness"]) and r["sharpness"]["cpu_seconds"] > 0
        assert "label_noise=0.25" in r["setting"]
    assert adamw["steps"] == sl_zo["steps"] == 2
    # Equal time: the schedule shortened by the measured ratio (one seed: the median is that seed's ratio).
    ratio = sl_zo["train_cpu_seconds"] / adamw["train_cpu_seconds"]
    assert equal_time["time_ratio"] == pytest.approx(ratio) and equal_time["ratio_seeds"] == [0]
    assert equal_time["steps"] == equal_time["max_steps"] == max(1, round(2 / ratio))
    capsys.readouterr()
    run_benchmark(glue_accuracy, *args)  # everything done: nothing is trained again
    assert len(read_jsonl(path)) == 3
    assert "| sst2 | equal_time | sl_zo | 1 |" in capsys.readouterr().out
    assert (tmp_path / "glue_accuracy.md").is_file() and (tmp_path / "glue_accuracy_sst2_noise0.25.png").is_file()
    # A line without the flatness figures is run again; the newest line of a key is the one that counts.
    path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "sharpness" or r is not adamw})
                              for r in results) + "\n")
    run_benchmark(glue_accuracy, *args)
    rerun = read_jsonl(path)
    assert len(rerun) == 4 and rerun[-1]["method"] == "adamw" and "sharpness" in rerun[-1]
    assert glue_accuracy.latest(rerun)["sst2", "adamw", 0, "steps", adamw["setting"]] == rerun[-1]


def test_glue_data_flips_training_labels_only():
    limits = dict(tasks=["sst2"], max_train_samples=40, max_eval_samples=20)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MINILM))
    clean_train, clean_dev, _ = glue_accuracy.glue_data("sst2", tokenizer, glue_accuracy.GlueAccuracyArguments(**limits))
    train, dev, _ = glue_accuracy.glue_data("sst2", tokenizer,
                                            glue_accuracy.GlueAccuracyArguments(label_noise=0.2, **limits))
    assert sum(a != b for a, b in zip(train["label"], clean_train["label"])) == 8
    assert train["input_ids"] == clean_train["input_ids"]
    assert dev["label"] == clean_dev["label"] and dev["input_ids"] == clean_dev["input_ids"]


def test_llm_accuracy_reports_finetuned_model(tmp_path):
    run_benchmark(llm_accuracy, "--methods", "sl_zo", "--eval_base", "False", "--max_steps", 1, "--seeds", 0,
                  "--max_seq_length", 128, "--heldout_size", 4, "--benchmarks", "arc_easy", "--eval_limit", 2,
                  "--output_dir", tmp_path)
    (result,) = read_jsonl(tmp_path / "llm_accuracy.jsonl")
    assert result["method"] == "sl_zo" and result["steps"] == 1
    assert math.isclose(result["perplexity"], math.exp(result["heldout_loss"]), rel_tol=1e-6)
    accuracy, stderr = result["accuracy"]["arc_easy"], result["accuracy_stderr"]["arc_easy"]
    assert accuracy in (0.0, 0.5, 1.0)
    assert stderr == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 1))  # lm-eval: sample std / sqrt(n), n = 2
    assert "| sl_zo | 1 |" in (tmp_path / "llm_accuracy.md").read_text()


def test_llm_paired_table_gives_differences_to_adamw_with_intervals():
    args = llm_accuracy.LLMAccuracyArguments(methods=["adamw", "sam"], benchmarks="piqa")
    other_setting = {"method": "sam", "seed": 0, "setting": "other", "heldout_loss": 9.0, "accuracy": {"piqa": 0.0}}
    runs = [other_setting]  # left out
    runs += [{"method": m, "seed": s, "setting": args.setting, "heldout_loss": loss, "accuracy": {"piqa": acc}}
            for m, s, loss, acc in [("adamw", 0, 1.5, 0.60), ("sam", 0, 1.4, 0.62), ("adamw", 1, 1.6, 0.61),
                                    ("sam", 1, 1.4, 0.65), ("sam", 2, 1.0, 0.9)]]  # seed 2 has no AdamW pair
    row = llm_accuracy.paired_table(runs, args.setting).splitlines()[-1]
    # loss differences -0.1, -0.2: mean -0.15, half-width t(0.975, 1) * 0.0707 / sqrt(2) = 0.635
    assert row.startswith("| sam | 2 | -0.15 (-0.785 .. +0.485) | +3 (")
    base = {"method": "base", "seed": 0, "setting": args.setting, "heldout_loss": 2.0, "perplexity": 7.4,
            "accuracy": {"piqa": 0.5}, "train_seconds": 0.0}
    rows = llm_accuracy.table([{**r, "perplexity": 1.0, "train_seconds": 1.0} for r in runs] + [base],
                              args.setting).splitlines()[2:]
    # Every method of the setting, the untuned model first, whatever this run's --methods: sam's 3 seeds 1.4, 1.4, 1.0.
    # mean 3.8 / 3 = 1.267, std (ddof 0) sqrt((2 * (2/15)^2 + (4/15)^2) / 3) = 0.189; AdamW: 1.5, 1.6.
    assert [row.split(" | ")[:3] for row in rows] == [["| base", "1", "2.000 ± 0.000"],
                                                     ["| adamw", "2", "1.550 ± 0.050"],
                                                     ["| sam", "3", "1.267 ± 0.189"]]


def test_ascent_cosine_separates_the_momentum_probe_from_the_gaussian_one(tmp_path):
    run_benchmark(ascent_cosine, "--models", "minilm", "--methods", "sl_zo", "sl_zo_momentum", "--steps", 3,
                  "--seq_length", 16, "--output_dir", tmp_path)
    runs = {r["method"]: r for r in read_jsonl(tmp_path / "ascent_cosine.jsonl")}
    assert set(runs) == {"sl_zo", "sl_zo_momentum"}
    for r in runs.values():
        assert r["steps"] == 3 and len(r["cosines"]) + r["skipped"] == 3
        assert all(-1 <= c <= 1 for c in r["cosines"])
    assert runs["sl_zo_momentum"]["skipped"] == 1  # the first step has no optimizer state to probe along
    assert runs["sl_zo"]["coverage"] == [1.0] * 3  # a Gaussian direction spans every selected tensor
    coverage = runs["sl_zo_momentum"]["coverage"]
    assert len(coverage) == 3 and coverage[0] == 0 and all(0 < c <= 1 for c in coverage[1:])
    assert min(runs["sl_zo_momentum"]["cosines"]) > 0.1 and max(abs(c) for c in runs["sl_zo"]["cosines"]) < 0.05


def test_ascent_cosine_measures_the_priors_against_each_steps_gradient(tmp_path):
    run_benchmark(ascent_cosine, "--priors", "--models", "minilm", "--steps", 3, "--seq_length", 16,
                  "--output_dir", tmp_path)
    (record,) = read_jsonl(tmp_path / "ascent_cosine.jsonl")
    priors = record["priors"]
    assert record["method"] == "priors" and record["steps"] == 3
    # AdamW has state from step 2 on, a previous gradient too: two cosines each, all in [-1, 1].
    assert {k: len(v) for k, v in priors.items()} == {"first_moment": 2, "adam_update": 2, "previous_gradient": 2}
    assert all(-1 <= c <= 1 for values in priors.values() for c in values)
    # After one AdamW step m_1 = (1 - b1) g_1: the first moment and the previous gradient are the same direction.
    assert priors["first_moment"][0] == pytest.approx(priors["previous_gradient"][0], abs=1e-5)


def test_paired_differences_to_adamw_with_a_t_interval():
    def result(method, seed, accuracy, budget="steps"):
        return {"task": "mrpc", "budget": budget, "method": method, "seed": seed, "setting": "s",
                "metrics": {"accuracy": accuracy}}

    results = [result("adamw", s, a) for s, a in enumerate([0.80, 0.78, 0.82])]
    results += [result("sam", s, a) for s, a in enumerate([0.81, 0.80, 0.82])]  # d = +1, +2, 0 points
    results += [result("sam", 3, 0.99), result("sam", 0, 0.5, budget="time")]  # no AdamW partner: left out
    table = glue_accuracy.paired_differences(results, "s", ["mrpc"], ["adamw", "sam"])
    # mean 1, std 1, n 3: half width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732 = 2.484
    assert "| mrpc | steps | sam | 3 | +1.0 | -1.5 .. +3.5 | +1.0, +2.0, +0.0 |" in table
    assert "| time |" not in table


def test_mean_over_settings_averages_each_settings_mean_difference():
    def result(setting, task, method, seed, accuracy, budget="steps"):
        return {"task": task, "budget": budget, "method": method, "seed": seed, "setting": setting,
                "metrics": {"accuracy": accuracy}}

    noisy = "s,label_noise=0.2,label_noise_seed=0"
    results = [result("s", "sst2", "adamw", s, 0.80) for s in range(2)] + [result(noisy, "sst2", "adamw", 0, 0.70)]
    results += [result("s", "sst2", "sam", 0, 0.81), result("s", "sst2", "sam", 1, 0.83)]  # d = +1, +3: mean +2
    results += [result(noisy, "sst2", "sam", 0, 0.66), result(noisy, "sst2", "sam", 1, 0.99)]  # seed 1 unpaired: -4
    results += [result("s", "sst2", "sam", 0, 0.60, budget="equal_time")]  # AdamW's steps run stands for its time
    table = glue_accuracy.mean_over_settings(results, ["adamw", "sam"])
    assert "| steps | sam | 2 | -1.0 | sst2 +2.0 (2), sst2_noise0.2 -4.0 (1) |" in table
    assert "| equal_time | sam | 1 | -20.0 | sst2 -20.0 (1) |" in table
    assert "adamw |" not in table


def test_the_plot_draws_only_the_methods_with_the_most_seeds_up_to_three(tmp_path):
    def result(method, seed, budget="steps"):
        return {"task": "rte", "budget": budget, "method": method, "seed": seed, "setting": "s",
                "metrics": {"accuracy": 0.5 + 0.01 * seed}, "train_cpu_seconds": 10.0 + seed}

    three = [result(m, s) for m in ("adamw", "sam") for s in range(3)] + [result("sam", 0, "equal_time")]
    one = [result("sl_zo", 0), result("sl_zo", 1, "equal_time")]
    path = tmp_path / "rte.png"
    assert glue_accuracy.plot_task(three + one, "s", "rte", ["adamw", "sam", "sl_zo"], path) == ["adamw", "sam"]
    assert path.stat().st_size > 0
    assert glue_accuracy.plot_task(one, "s", "rte", ["adamw", "sl_zo"], path) == ["sl_zo"]  # nothing has more
    assert glue_accuracy.plot_task(three, "s", "mrpc", ["adamw"], tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_step_overhead_times_the_work_outside_the_passes_and_counts_syncs(tmp_path):
    run_benchmark(step_overhead, "--models", "minilm", "--steps", 1, "--warmup_steps", 1, "--output_dir", tmp_path,
                  "--tag", "tiny")
    result = json.loads((tmp_path / "tiny.json").read_text())
    stock, sam = result["runs"]
    assert (stock["arms"], sam["arms"]) == (None, 103) and len(sam["step_seconds"]) == 1
    for run in (stock, sam):  # the passes take most of a step; what is outside them is a part of it
        assert 0 < run["passes"] < run["step"] and run["outside"] < run["step"]
    (row,) = result["summary"]
    assert math.isclose(row["overhead_ms"], 1e3 * (sam["outside"] - stock["outside"]))
    assert math.isclose(row["overhead_share"], (sam["outside"] - stock["outside"]) / stock["step"])
    assert row["sam_syncs"] >= row["adamw_syncs"] >= 1 and row["history_save_ms"] > 0  # stock: the loss NaN check
