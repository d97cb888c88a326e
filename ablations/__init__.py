"""Ablation tables and plots from MLflow runs (`python -m ablations.summarize`)."""
