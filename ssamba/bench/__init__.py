"""Benchmarks: one timer (``timing``) and one module per question: the encoder vs SSAST (``encoder``),
the inference speed-up ladder (``ladder``), the training step (``training``), pretraining through the
real data path (``pretraining``), the CPU scan and demo step (``cpu``), the data path (``data``).

``python -m ssamba.bench`` runs them; nothing in the runtime layers imports this package.
"""
