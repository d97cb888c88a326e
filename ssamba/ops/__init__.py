"""Compute kernels under the model: the reference selective scan, the choice of scan backend, the CUDA
chunked and training scans (sources in ``csrc/``), the Triton kernels and CUDA-graph capture.

Imports only ``ssamba.base`` and ``ssamba.config``; the model layer above picks from here.
"""
