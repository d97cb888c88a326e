"""Training: the one loop, the pretraining and fine-tuning task objects, their data and metrics."""
