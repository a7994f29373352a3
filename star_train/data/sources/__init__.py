"""Source datasets -> STAR records, and the released data-mix tools.

The released preparation (github.com/Qwen-Applications/STAR, ``data_process/`` and
``scripts/prepare_rl_data.sh``) as functions over rows already read from local files:

* ``converters``: xLAM (``Salesforce/xlam-function-calling-60k``), ToolACE
  (``tryumanshow/ToolACE-Qwen-cleaned``), ToolMind (``Nanbeige/ToolMind``,
  ``graph_syn_datasets/graphsyn.jsonl``) and Hammer rows to ``{"id", "messages",
  "tools"}`` records, as ``format_data.py`` converts them.
* ``proportion``: the labels of ``labeling_messages.py`` and the stratified sampling of
  ``data_proportion.py``.

The ``filter_on_simrl`` step needs the reward, a layer above: it is in
``star_train.stages.prepare_data`` with the command that runs the whole preparation.
"""

from .converters import CONVERTERS, convert, read_jsonl, sample_rows
from .proportion import categories, label_record, proportion_sample

__all__ = ["CONVERTERS", "categories", "convert", "label_record", "proportion_sample",
           "read_jsonl", "sample_rows"]
