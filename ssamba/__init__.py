"""SSAMBA: self-supervised audio Mamba, with a Ray + Optuna + MLflow sweep and ablation platform."""

__version__ = "0.1.0"
