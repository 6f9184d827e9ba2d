"""nnglass.viz: figures and notebook views of saved values (needs `pip install nnglass[viz]`).

Plots take what `.save()` gives (saved values, locally or once a remote job delivered,
or plain tensors) and return a `matplotlib.figure.Figure`, built without pyplot so they
work headless; Jupyter shows a Figure inline, `fig.savefig("x.png")` / `"x.svg"` writes
it. `module_tree` and `value_summary` return HTML for notebooks; they are also what a
model's, an envoy's and a saved value's `_repr_html_` show. `import nnglass` does not
import this package (nor matplotlib).
"""

from ._attention import attention_pattern as attention_pattern
from ._attribution import attribution as attribution
from ._attribution import attribution_scores as attribution_scores
from ._html import Html as Html
from ._lens import logit_lens as logit_lens
from ._lens import top_tokens as top_tokens
from ._patching import patching_heatmap as patching_heatmap
from ._summary import value_summary as value_summary
from ._tree import module_tree as module_tree

__all__ = [
    "Html",
    "attention_pattern",
    "attribution",
    "attribution_scores",
    "logit_lens",
    "module_tree",
    "patching_heatmap",
    "top_tokens",
    "value_summary",
]
