"""Emulated networks on one Linux machine: network namespaces as separate machines (root only)."""
