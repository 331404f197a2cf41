"""recipes/run_glue.py: launched with `accelerate launch` as a user would (offline) on the shipped SST-2, MRPC and RTE
data with the real MiniLM, and on small TSVs in the CoLA (no header), STS-B (regression) and MNLI (matched and
mismatched) layouts with a tiny BERT; plus its GLUE TSV reader in-process for all nine layouts."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_glue_metrics import reference_metrics
from transformers import AutoTokenizer, BertConfig, BertModel

from slsam_hf.assets import MINILM, resolve_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "run_glue.py"
GLUE = ROOT / "data" / "glue"
N_EVAL = 12  # --max_eval_samples = --max_predict_samples: dev predictions and dev metrics see the same rows
N_TEST = 5  # rows of the test.tsv files written here

BINARY = ["0", "1"]
NLI = ["entailment", "not_entailment"]
MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
STSB_COLUMNS = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
# The original GLUE files: task -> (train/dev columns, header row written?, test columns, text columns, label column,
# label values or None for scores, the Hub's text column names, dev file stems).
LAYOUTS = {
    "cola": (["source", "label", "original_label", "sentence"], False, ["index", "sentence"], ["sentence"], "label",
             BINARY, ["sentence"], ["dev"]),
    "sst2": (["sentence", "label"], True, ["index", "sentence"], ["sentence"], "label", BINARY, ["sentence"], ["dev"]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], True,
             ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["#1 String", "#2 String"], "Quality", BINARY,
             ["sentence1", "sentence2"], ["dev"]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], True, ["id", "question1", "question2"],
            ["question1", "question2"], "is_duplicate", BINARY, ["question1", "question2"], ["dev"]),
    "stsb": (STSB_COLUMNS + ["score"], True, STSB_COLUMNS, ["sentence1", "sentence2"], "score", None,
             ["sentence1", "sentence2"], ["dev"]),
    "mnli": (MNLI_COLUMNS + ["label1", "gold_label"], True, MNLI_COLUMNS, ["sentence1", "sentence2"], "gold_label",
             ["entailment", "neutral", "contradiction"], ["premise", "hypothesis"], ["dev_matched", "dev_mismatched"]),
    "qnli": (["index", "question", "sentence", "label"], True, ["index", "question", "sentence"],
             ["question", "sentence"], "label", NLI, ["question", "sentence"], ["dev"]),
    "rte": (["index", "sentence1", "sentence2", "label"], True, ["index", "sentence1", "sentence2"],
            ["sentence1", "sentence2"], "label", NLI, ["sentence1", "sentence2"], ["dev"]),
    "wnli": (["index", "sentence1", "sentence2", "label"], True, ["index", "sentence1", "sentence2"],
             ["sentence1", "sentence2"], "label", BINARY, ["sentence1", "sentence2"], ["dev"]),
}
WORDS = "the cat sat on a mat , dog ran home \" quoted ' it is not very good bad film".split()


def write_tsv(path, columns, rows, header=True):
    """Tab-separated, no quoting at all (GLUE's own format; fields may hold unbalanced quote characters)."""
    lines = (["\t".join(columns)] if header else []) + ["\t".join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_glue_folder(folder, task, n_rows=24, seed=0, test_stems=None):
    """train.tsv, dev and test files (default: one for each dev file) in the task's GLUE layout, filled with random
    sentences and labels."""
    columns, header, test_columns, texts, label, values, _, dev_stems = LAYOUTS[task]
    if test_stems is None:
        test_stems = [stem.replace("dev", "test") for stem in dev_stems]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem in ["train", *dev_stems, *test_stems]:
        rows = []
        for i in range(N_TEST if stem.startswith("test") else n_rows):
            row = {c: i if c in ("index", "id") else f"x{i}" for c in columns + test_columns}
            row.update({c: " ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for c in texts})
            row[label] = f"{rng.uniform(0, 5):.3f}" if values is None else rng.choice(values)
            rows.append(row)
        is_test = stem.startswith("test")
        write_tsv(folder / f"{stem}.tsv", test_columns if is_test else columns, rows, header=header or is_test)
    return folder


def read_rows(path, columns=None):
    """The rows of a GLUE TSV file as dicts, read independently of the recipe (columns: of a headerless file)."""
    with open(path, encoding="utf-8-sig") as f:
        return list(csv.DictReader(f, fieldnames=columns, delimiter="\t", quoting=csv.QUOTE_NONE))


def read_predictions(path):
    with open(path) as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "prediction"]
    assert [int(index) for index, _ in rows[1:]] == list(range(len(rows) - 1))
    return [prediction for _, prediction in rows[1:]]


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("run_glue", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All recipe runs at once, one thread each: shipped data through `accelerate launch`, the tiny model with plain
    `python`. Returns the folder that holds each run's output_dir and log."""
    tmp = tmp_path_factory.mktemp("run_glue")
    tiny = tmp / "tiny_bert"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MINILM))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    tiny_model = ["--model_name_or_path", str(tiny), "--learning_rate", "1e-2"]
    commands = {
        "sst2": ["--task_name", "sst2", "--data_dir", str(GLUE / "SST-2")],
        "mrpc": ["--task_name", "mrpc", "--data_dir", str(GLUE / "MRPC"), "--sam_mode", "sam"],
        "rte": ["--task_name", "RTE", "--layer_selection", "random", "--selection_budget", "0.5"],
        "cola": ["--task_name", "cola", "--data_dir", str(write_glue_folder(tmp / "CoLA", "cola", test_stems=()))]
        + tiny_model,
        "stsb": ["--task_name", "stsb", "--data_dir", str(write_glue_folder(tmp / "STS-B", "stsb"))] + tiny_model,
        "mnli": ["--task_name", "mnli", "--data_dir",
                 str(write_glue_folder(tmp / "MNLI", "mnli", test_stems=("test_matched",)))] + tiny_model,
    }
    common = ["--do_train", "--do_eval", "--do_predict", "--max_steps", "3", "--per_device_train_batch_size", "4",
              "--per_device_eval_batch_size", "12", "--max_train_samples", "16", "--max_eval_samples", str(N_EVAL),
              "--max_predict_samples", str(N_EVAL), "--max_seq_length", "32", "--save_strategy", "no",
              "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"]
    processes = {}
    for name, args in commands.items():
        launcher = launch if name in ("sst2", "mrpc", "rte") else [sys.executable]
        log = open(tmp / f"{name}.log", "w")
        command = launcher + [str(RECIPE)] + args + common + ["--output_dir", str(tmp / name)]
        processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    for name, process in processes.items():
        assert process.wait(timeout=600) == 0, (tmp / f"{name}.log").read_text()[-5000:]
    return tmp


def results(runs, name):
    return json.loads((runs / name / "eval_results.json").read_text())


@pytest.mark.parametrize(
    "name, folder, metric",
    [("sst2", "SST-2", "sst2"), ("mrpc", "MRPC", "mrpc"), ("rte", "RTE", "rte")],
)
def test_shipped_task_metrics_match_dev_predictions(runs, name, folder, metric):
    """Real MiniLM, real GLUE data: the dev metrics are the GLUE metrics of the written dev predictions."""
    columns, _, _, _, label, values, _, _ = LAYOUTS[name]
    eval_results = results(runs, name)
    all_results = json.loads((runs / name / "all_results.json").read_text())
    assert all_results["train_samples"] == 16 and np.isfinite(all_results["train_loss"])
    assert all_results["eval_loss"] == eval_results["eval_loss"]
    predictions = read_predictions(runs / name / f"{folder}.tsv")  # no test.tsv shipped: dev predictions
    assert len(predictions) == N_EVAL and set(predictions) <= set(values)
    gold = [row[label] for row in read_rows(GLUE / folder / "dev.tsv")[:N_EVAL]]
    expected = reference_metrics(metric, [values.index(p) for p in predictions], [values.index(g) for g in gold])
    for key, value in expected.items():
        assert 0 <= eval_results[f"eval_{key}"] <= 1
        assert eval_results[f"eval_{key}"] == pytest.approx(value, abs=1e-6)
    assert json.loads((runs / name / "config.json").read_text())["id2label"] == dict(zip(["0", "1"], values))
    card = (runs / name / "README.md").read_text()
    assert "fine-tuned version of [sentence-transformers/all-MiniLM-L6-v2]" in card
    assert f"on the GLUE {name.upper()} dataset" in card and "results on the evaluation set:\n- Loss: " in card
    assert "### Sharpness-aware training (slsam_hf)" in card and (runs / name / "selection_heatmap.png").is_file()


def test_cola_headerless_layout(runs):
    eval_results = results(runs, "cola")
    predictions = read_predictions(runs / "cola" / "CoLA.tsv")
    gold = [row["label"] for row in read_rows(runs / "CoLA" / "dev.tsv", LAYOUTS["cola"][0])[:N_EVAL]]
    assert len(predictions) == N_EVAL
    expected = reference_metrics("cola", [int(p) for p in predictions], [int(g) for g in gold])
    assert eval_results.keys() >= {"eval_matthews_correlation", "eval_loss"}
    assert eval_results["eval_matthews_correlation"] == pytest.approx(expected["matthews_correlation"], abs=1e-6)


def test_stsb_regression_predicts_test_file(runs):
    eval_results = results(runs, "stsb")
    assert len(json.loads((runs / "stsb" / "config.json").read_text())["id2label"]) == 1  # one output: a score
    for key in ("eval_pearson", "eval_spearmanr"):
        assert -1 <= eval_results[key] <= 1
    predictions = read_predictions(runs / "stsb" / "STS-B.tsv")
    assert len(predictions) == N_TEST  # test.tsv exists: its rows are predicted, not the dev rows
    assert all(np.isfinite(float(p)) and len(p.split(".")[1]) == 3 for p in predictions)


def test_mnli_matched_and_mismatched(runs):
    eval_results = results(runs, "mnli")
    values = LAYOUTS["mnli"][5]
    for part in ("matched", "mismatched"):
        assert 0 <= eval_results[f"eval_{part}_accuracy"] <= 1
    matched = read_predictions(runs / "mnli" / "MNLI-m.tsv")
    mismatched = read_predictions(runs / "mnli" / "MNLI-mm.tsv")
    assert len(matched) == N_TEST  # from test_matched.tsv
    assert len(mismatched) == N_EVAL  # no test_mismatched.tsv: dev_mismatched rows
    assert set(matched + mismatched) <= set(values)
    gold = [row["gold_label"] for row in read_rows(runs / "MNLI" / "dev_mismatched.tsv")[:N_EVAL]]
    accuracy = np.mean([p == g for p, g in zip(mismatched, gold)])
    assert eval_results["eval_mismatched_accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.parametrize("task", list(LAYOUTS))
def test_glue_tsv_layouts(recipe, tmp_path, task):
    """Every task's files load with the Hub's column names; labels become class ids, scores floats."""
    columns, header, _, texts, label, values, hub_texts, dev_stems = LAYOUTS[task]
    folder = write_glue_folder(tmp_path / task, task, n_rows=6, seed=1)
    raw = recipe.load_glue_folder(folder, recipe.TASKS[task])
    raw = recipe.encode_labels(raw, recipe.label_names(raw, task))
    suffixes = [stem.removeprefix("dev") for stem in dev_stems]
    assert set(raw) == {"train"} | {f"{kind}{s}" for s in suffixes for kind in ("validation", "test")}
    for stem, suffix in zip(dev_stems, suffixes):
        dev = raw[f"validation{suffix}"]
        written = read_rows(folder / f"{stem}.tsv", None if header else columns)
        assert sorted(dev.column_names) == sorted(hub_texts + ["label"]) and len(dev) == 6
        for hub, tsv in zip(hub_texts, texts):
            assert dev[hub] == [row[tsv] for row in written]
        expected = [float(row[label]) if values is None else values.index(row[label]) for row in written]
        assert dev["label"] == pytest.approx(expected, abs=1e-6)
        test = raw[f"test{suffix}"]
        assert sorted(test.column_names) == sorted(hub_texts) and len(test) == N_TEST


@pytest.mark.parametrize(
    "folder, task, rows",
    [("MRPC", "mrpc", {"train": 3668, "validation": 408}), ("SST-2", "sst2", {"train": 67349, "validation": 872}),
     ("RTE", "rte", {"train": 2490, "validation": 277}), ("WNLI", "wnli", {"train": 635, "validation": 71}),
     ("QNLI", "qnli", {"validation": 5463})],
)
def test_shipped_glue_files_read_completely(recipe, folder, task, rows):
    """Row counts of the shipped files (data/README): unbalanced quotes must not merge rows, MRPC's BOM must not
    hide its label column."""
    raw = recipe.load_glue_folder(GLUE / folder, recipe.TASKS[task])
    assert {split: len(ds) for split, ds in raw.items()} == rows
    assert not any(None in ds["label"] for ds in raw.values())


def test_unknown_label_is_a_clear_error(recipe, tmp_path):
    folder = write_glue_folder(tmp_path / "RTE", "rte", n_rows=4)
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta b\tc d\tmaybe\n")
    raw = recipe.load_glue_folder(folder, recipe.TASKS["rte"])
    with pytest.raises(ValueError, match="maybe"):
        recipe.encode_labels(raw, recipe.label_names(raw, "rte"))


def test_csv_and_json_files(recipe, tmp_path):
    """--train_file/--validation_file: columns found as in transformers' example, labels by name or by value."""
    (tmp_path / "train.csv").write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    (tmp_path / "dev.csv").write_text("text,label\nawful,neg\n")
    args = recipe.DataTrainingArguments(train_file=str(tmp_path / "train.csv"),
                                        validation_file=str(tmp_path / "dev.csv"))
    raw = recipe.load_raw_datasets(args, None)
    labels = recipe.label_names(raw, None)
    raw = recipe.encode_labels(raw, labels)
    assert labels == ["neg", "pos"] and raw["train"]["label"] == [1, 0, 1] and raw["validation"]["label"] == [0]
    assert recipe.text_columns(raw, None) == ["text"] and raw["train"]["text"][0] == "good, really"

    rows = [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "c", "sentence2": "d", "label": 0}]
    (tmp_path / "train.json").write_text("\n".join(json.dumps(row) for row in rows))
    args = recipe.DataTrainingArguments(task_name="rte", train_file=str(tmp_path / "train.json"))
    raw = recipe.load_raw_datasets(args, None)
    raw = recipe.encode_labels(raw, recipe.label_names(raw, "rte"))
    assert raw["train"]["label"] == [1, 0] and recipe.text_columns(raw, "rte") == ["sentence1", "sentence2"]
    with pytest.raises(ValueError, match="task qqp needs the columns"):
        recipe.text_columns(raw, "qqp")


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(task_name="mnli-mm"), "task_name must be one of"),
     (dict(data_dir="data/glue/MRPC"), "needs --task_name"),
     (dict(task_name="mrpc", dataset_name="nyu-mll/glue", train_file="t.csv"), "one data source"),
     (dict(train_file="train.tsv"), "csv or json"),
     (dict(), "give --task_name")],
)
def test_data_argument_errors(recipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        recipe.DataTrainingArguments(**kwargs)


def test_task_name_alone_uses_shipped_folder(recipe):
    assert Path(recipe.DataTrainingArguments(task_name="RTE").data_dir) == GLUE / "RTE"
    args = recipe.DataTrainingArguments(task_name="qqp")  # not shipped: the Hub
    assert (args.dataset_name, args.data_dir) == ("nyu-mll/glue", None)


@pytest.mark.parametrize("num_labels", [2, 3])
def test_flip_labels_changes_exactly_the_asked_share_to_other_classes(recipe, num_labels):
    from datasets import Dataset

    clean = np.random.default_rng(1).integers(0, num_labels, 1000)
    data = Dataset.from_dict({"label": clean.tolist(), "text": [str(i) for i in range(1000)]})
    noisy = recipe.flip_labels(data, 0.2, num_labels, seed=3)
    labels = np.asarray(noisy["label"])
    assert (labels != clean).sum() == 200 and set(labels) <= set(range(num_labels))
    assert noisy["text"] == data["text"]  # rows keep their order and other columns
    assert noisy["label"] == recipe.flip_labels(data, 0.2, num_labels, seed=3)["label"]
    assert noisy["label"] != recipe.flip_labels(data, 0.2, num_labels, seed=4)["label"]
    if num_labels == 3:  # the new class is drawn among the two others: both occur
        changed = labels != clean
        assert set((labels[changed] - clean[changed]) % 3) == {1, 2}
    with pytest.raises(ValueError, match="rate"):
        recipe.flip_labels(data, 1.5, num_labels)
    with pytest.raises(ValueError, match="classification"):
        recipe.flip_labels(data, 0.2, 1)
