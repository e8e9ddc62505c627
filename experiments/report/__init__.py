"""The study's report: markdown tables, PNG plots and every raw number as JSONL.

Scores are each task's main metric (`heads.HEAD_KINDS`: accuracy, MAE or NME). The
*normalised score* of a merged model on a task compares it with that task's single adapter,
so that 1.0 means "no loss from merging" whatever the metric:
`merged / single` for higher-is-better metrics (accuracy), `single / merged` for errors (MAE,
NME). Every number is a mean over seeds, shown as `mean ± std` (sample std over seeds; a
single seed shows the mean alone).
"""

from experiments.report.files import write
from experiments.report.scores import Scores, method_params, normalised

__all__ = ["Scores", "method_params", "normalised", "write"]
