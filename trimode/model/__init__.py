"""Model files, configuration, tokenizer, chat template and the float64 reference (no TVM)."""
