"""The official GLUE metrics as a local `evaluate` module, for machines that cannot fetch the Hub's `glue` metric.

    metric = evaluate.load("recipes/glue_metrics", "mrpc")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])  # {'accuracy': 0.667, 'f1': 0.8}

Same configurations, keys and numbers as `evaluate.load("glue", task)`: CoLA Matthews correlation; STS-B Pearson
and Spearman correlation; MRPC and QQP accuracy and F1 of the positive class; every other task accuracy.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

CONFIGS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli",
           "hans")

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (STS-B: predicted similarity scores).
    references: gold class ids (STS-B: gold scores).
Returns, by configuration:
    cola: matthews_correlation in [-1, 1]; stsb: pearson and spearmanr in [-1, 1];
    mrpc, qqp: accuracy and f1 in [0, 1]; all others: accuracy in [0, 1].
"""


class GlueMetrics(evaluate.Metric):
    """GLUE's metric for the task named by the configuration (`evaluate.load(path, task)`)."""

    def _info(self):
        if self.config_name not in CONFIGS:
            raise KeyError(f"unknown GLUE task {self.config_name!r}: give one of {list(CONFIGS)}")
        value = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description="GLUE benchmark metrics (offline copy of the Hub's `glue` metric).",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        results = {"accuracy": float(np.mean(predictions == references))}
        if self.config_name in ("mrpc", "qqp"):
            results["f1"] = float(f1_score(references, predictions))
        return results
