"""The tasks: what each task learns, by name: dataset, splits, target, head kind, loss, metrics.

Not to be confused with `datasets` (the builders that prepare a task's raw files) nor with
`input_pipeline` (which turns a task's prepared dataset into batches).

A task is data, not code: the head kind (`heads.HEAD_KINDS`) supplies the loss and metrics,
`jaxmerge.input_pipeline` the preprocessing (unless the task brings its own). Config strings
(`config.task`) are the keys here. Task sets live beside this file, one module each:
`paper` (the paper's six tasks, on the user's downloads) and `offline` (data that ships with
scikit-learn, scikit-image and Debian). A new task is a TFDS builder in `jaxmerge/datasets/`
plus one `register(Task(...))`.
"""

from jaxmerge.tasks.registry import TASKS, Task, get, register

# Importing a task set registers its tasks, in this order.
# isort: off
from jaxmerge.tasks import paper
from jaxmerge.tasks import offline
from jaxmerge.tasks import clip_suite
# isort: on

__all__ = ["TASKS", "Task", "get", "register", "paper", "offline", "clip_suite"]
