"""Research scripts behind docs/quality.md: the synthetic-lesion validation harness and the probes (see README.md)."""
