"""Rendering: figures and pages drawn from evaluation results (matplotlib plots, the retrieval sheet's HTML and PNG)."""
