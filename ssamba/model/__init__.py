"""Models: the SSAMBA (Mamba) and SSAST (ViT) encoders, MSPM heads, checkpoints. Imports only torch."""
