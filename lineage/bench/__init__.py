"""``lineage bench``: the similarity kernels measured against the machine's own limits.

:func:`run_bench` measures the copy bandwidth and matmul rate of the device, then
every kernel of :mod:`lineage_kernels` in each storage format at the sizes of one
layer of 1B to 70B models (:mod:`lineage.bench.cases`), as a fraction of the
roofline; :mod:`lineage.bench.report` renders text, JSON and an HTML roofline.
"""

from lineage.bench.cases import KERNELS, MODELS
from lineage.bench.report import SCHEMA, render_html, render_text, to_dict
from lineage.bench.run import BenchConfig, BenchError, BenchReport, CaseResult, run_bench

__all__ = ["KERNELS", "MODELS", "SCHEMA", "BenchConfig", "BenchError", "BenchReport", "CaseResult",
           "render_html", "render_text", "run_bench", "to_dict"]
