"""deepvis in Jupyter: a one-line look, layer tables, the live toolbox in a cell, the report inline.

A thin layer over the library, like the CLI and the server (the top row of docs/architecture.md): the
results of the library show themselves already (``_repr_png_``/``_repr_html_``, drawn by
:mod:`deepvis.display`); this package adds what only a notebook needs:

>>> import deepvis
>>> deepvis.show(model, "sample:coffee", layer="blocks.3", unit=7)   # the activation view, in the cell
>>> deepvis.layers(model)                                            # the layer table, as a table
>>> tb = deepvis.toolbox(model)                                      # the live toolbox, in an iframe
>>> tb.stop()

``model`` is a :class:`~deepvis.models.Model`, a bare ``torch.nn.Module`` or a model spec string (see
:func:`as_model`). Nothing here needs IPython except :func:`toolbox`'s updating display (IPython is
imported there only when it is already loaded, i.e. in a kernel).
"""

from .live import NotebookToolbox, notebook_origins, toolbox
from .look import Look, as_model, show
from .report import ReportFrame, show_report
from .tables import LayerTable, layers

__all__ = [
    "show",
    "Look",
    "as_model",
    "layers",
    "LayerTable",
    "toolbox",
    "NotebookToolbox",
    "notebook_origins",
    "show_report",
    "ReportFrame",
]
