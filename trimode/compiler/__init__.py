"""Compile time: lowers the model to TVM (imports the full TVM compiler; never imported at run time)."""
