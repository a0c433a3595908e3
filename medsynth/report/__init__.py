"""Reports built from tracked runs: the per-pipeline report and the whitepaper (``medsynth report``)."""
