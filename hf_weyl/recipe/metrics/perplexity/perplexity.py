"""Token-level perplexity from per-example mean cross-entropy losses: exp(mean loss).

Every example counts the same (packed blocks all have the same number of tokens).
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity = exp(mean over examples of the mean token cross-entropy, in nats)."
_KWARGS_DESCRIPTION = """
Args:
    losses (list of float): mean token cross-entropy (nats) of each evaluated example.
Returns:
    loss (float): the mean loss; perplexity (float): exp(loss), inf when it overflows.
Example:
    >>> metric.compute(losses=[1.0, 3.0])
    {'loss': 2.0, 'perplexity': 7.38905609893065}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"losses": datasets.Value("float64")}),
        )

    def _compute(self, losses):
        if len(losses) == 0:
            raise ValueError("perplexity of zero examples is undefined")
        loss = math.fsum(losses) / len(losses)
        try:
            perplexity = math.exp(loss)
        except OverflowError:
            perplexity = float("inf")
        return {"loss": loss, "perplexity": perplexity}
