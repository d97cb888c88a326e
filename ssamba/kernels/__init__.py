"""Build and check the optional CUDA kernels (mamba-ssm, causal-conv1d) for the local GPU.

::

    python -m ssamba.kernels build [--sdist-dir DIR] [--packages mamba-ssm,causal-conv1d]
                                   [--arch auto|9.0[,8.0]] [--jobs N] [--wheel-dir DIR] [--log-dir DIR]
                                   [--no-install] [--parallel] [--force]
    python -m ssamba.kernels check [--packages mamba-ssm,causal-conv1d]

Both packages ship only as source distributions, and their ``setup.py`` hard-codes about nine GPU
architectures (``cc_flag.append("-gencode")`` / ``cc_flag.append("arch=compute_XY,code=sm_XY")`` pairs,
some behind ``if bare_metal_version >= Version(...)``) and ignores ``TORCH_CUDA_ARCH_LIST``. ``build``
extracts each sdist into a temporary folder, rewrites that copy of ``setup.py`` so that only the local
GPU's architecture is compiled (:func:`restrict_gencode`: every recognised ``-gencode`` statement becomes
``pass`` and one ``cc_flag += ["-gencode", "arch=compute_XY,code=sm_XY"]`` goes right after
``cc_flag = []``; anything it does not recognise is an error, never a silent all-architecture build),
runs ``pip wheel --no-deps --no-build-isolation --no-index`` with ``<PREFIX>_FORCE_BUILD=TRUE`` and
``MAX_JOBS``, installs the wheels with ``pip install --no-deps --no-index`` and runs ``check``.

Wheels land in ``--wheel-dir`` next to a ``<wheel>.build.json`` that records the architecture, torch and
Python they were built for; a later ``build`` reuses such a wheel instead of compiling (``--force``
rebuilds), so wheels carried to a fresh machine install in seconds.

``check`` imports both extensions, runs a tiny ``selective_scan_fn`` / ``causal_conv1d_fn`` call on the GPU
against the pure-PyTorch reference (forward and gradients), and says whether
``ssamba.ops.backends.resolve_backend('auto')`` picks ``cuda``.
"""
