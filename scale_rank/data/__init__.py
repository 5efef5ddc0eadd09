"""Datasets: the generated demo task, GLUE, and instruction data."""
