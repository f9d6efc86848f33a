"""Run time: loads compiled modules with the TVM runtime libraries only, decodes and serves."""
