"""Kernel factories: each returns a PrimFunc for static sizes, dtype and target."""
