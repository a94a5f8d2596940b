"""Shared by the test folders: this file puts tests/ on sys.path, so `processes` (test helpers) imports."""
