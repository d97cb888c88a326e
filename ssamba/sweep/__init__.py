"""Sweeps: the ablation factors, the typed plan, the Ray Tune driver, one trial, its Ray Train worker,
and the MLflow store they record into.
"""
