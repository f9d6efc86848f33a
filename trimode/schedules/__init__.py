"""Per-GPU schedule databases (JSON) and their lookup."""
