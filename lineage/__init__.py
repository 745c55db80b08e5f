"""lineage: weight-lineage verifier."""
