"""Every renderer of a result, one module per output: terminal text (:mod:`.text`), the HTML report
(:mod:`.html`), the family-tree drawing (:mod:`.tree`), the anatomy's one-line summary (:mod:`.anatomy`),
the SVG charts and page shell (:mod:`.plots`) and the one way a p-value is written (:mod:`.pvalue`).

Nothing is imported here: :mod:`.pvalue` sits below the report schema (``Report.to_dict`` writes
``p_text`` with it), the other modules above it.
"""
