"""Data: LM corpora and their splits (`corpora`), task datasets (`task_data`), the tasks and
their metrics (`tasks`), and the encoding of (source, target) pairs (`pairs`). Importing this
package registers every dataset and task."""

from eexit.data import corpora, pairs, task_data, tasks  # noqa: F401  (registration)
