"""Checking the installed kernels against the reference on the GPU."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
import types
from typing import Optional, TextIO

from ssamba.kernels.packages import KernelPackage


def _dist_version(pkg: KernelPackage) -> str:
    from importlib import metadata

    for name in (pkg.dist, pkg.name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _import_without_package_init(package: str, module: str):
    """Import ``package.<...>.module`` without running ``package/__init__.py`` (mamba_ssm's pulls in
    transformers and more). Registers a bare package module; used only to diagnose."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    stub = types.ModuleType(package)
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__file__ = spec.origin
    saved = {k: v for k, v in sys.modules.items() if k == package or k.startswith(package + ".")}
    for k in saved:
        del sys.modules[k]
    sys.modules[package] = stub
    try:
        return importlib.import_module(module)
    except BaseException:
        for k in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)
        raise


def _import_hint(exc: BaseException, pkg: KernelPackage) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] not in (pkg.dist, pkg.extension):
        return f"{msg} -- {pkg.dist} needs the module {exc.name!r} (pip install {exc.name.split('.')[0]})"
    if "undefined symbol" in str(exc):
        return (
            f"{msg} -- the extension was built against another torch; rebuild: python -m ssamba.kernels build --force"
        )
    if isinstance(exc, ModuleNotFoundError):
        return f"{msg} -- build it: python -m ssamba.kernels build"
    return msg


def _rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check_scan(fn, device) -> tuple[bool, str]:
    import torch

    from ssamba.ops.scan import selective_scan_ref

    g = torch.Generator(device=device).manual_seed(0)
    b, d, L, N = 2, 16, 96, 8

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    inputs = dict(
        u=r(b, d, L),
        delta=r(b, d, L, scale=0.5),
        A=-torch.exp(r(d, N, scale=0.5)),
        B=r(b, N, L),
        C=r(b, N, L),
        D=r(d),
        z=r(b, d, L),
        delta_bias=r(d, scale=0.3),
    )
    gout = r(b, d, L)
    res = {}
    for name, f in (("cuda", fn), ("ref", selective_scan_ref)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out = f(**leaves, delta_softplus=True)
        out.backward(gout)
        torch.cuda.synchronize()
        res[name] = (out, {k: v.grad for k, v in leaves.items()})
    errs = {"out": _rel_err(res["cuda"][0], res["ref"][0])}
    errs.update({f"d{k}": _rel_err(res["cuda"][1][k], res["ref"][1][k]) for k in inputs})
    worst = max(errs, key=errs.get)
    ok = errs[worst] < 1e-3
    return ok, (
        f"selective_scan_fn fp32 (b={b} d={d} L={L} N={N}, z, D, delta_bias, softplus) vs reference: "
        f"largest relative difference {errs[worst]:.1e} ({worst}) -> {'ok' if ok else 'MISMATCH'}"
    )


def _check_conv(fn, device) -> tuple[bool, str]:
    import torch

    from ssamba.ops.scan import causal_conv1d_ref

    g = torch.Generator(device=device).manual_seed(0)
    b, d, L, W = 2, 64, 80, 4
    inputs = dict(
        x=torch.randn(b, d, L, generator=g, device=device),
        weight=torch.randn(d, W, generator=g, device=device) * 0.5,
        bias=torch.randn(d, generator=g, device=device),
    )
    gout = torch.randn(b, d, L, generator=g, device=device)
    res = {}
    for name, f in (("cuda", fn), ("ref", causal_conv1d_ref)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out = f(leaves["x"], leaves["weight"], leaves["bias"], activation="silu")
        out.backward(gout)
        torch.cuda.synchronize()
        res[name] = (out, {k: v.grad for k, v in leaves.items()})
    errs = {"out": _rel_err(res["cuda"][0], res["ref"][0])}
    errs.update({f"d{k}": _rel_err(res["cuda"][1][k], res["ref"][1][k]) for k in inputs})
    worst = max(errs, key=errs.get)
    ok = errs[worst] < 1e-3
    return ok, (
        f"causal_conv1d_fn fp32 (b={b} d={d} L={L} width={W}, bias, silu) vs reference: "
        f"largest relative difference {errs[worst]:.1e} ({worst}) -> {'ok' if ok else 'MISMATCH'}"
    )


_CHECKS = {
    "mamba-ssm": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn", _check_scan),
    "causal-conv1d": ("causal_conv1d", "causal_conv1d_fn", _check_conv),
}


def cmd_check(args, out: Optional[TextIO] = None) -> int:
    """``check``: import the kernels, compare a tiny GPU call with the reference; 0 when all is well."""
    out = out or sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    import warnings

    import torch

    packages = args.packages
    say(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    # what the model will pick, asked first, before anything below touches sys.modules
    from ssamba.ops.backends import resolve_backend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = resolve_backend("auto")
    if not torch.cuda.is_available():
        say("no CUDA device is visible: the kernels cannot run here (resolve_backend('auto') -> 'reference')")
        return 1
    dev = torch.device("cuda", torch.cuda.current_device())
    cap = torch.cuda.get_device_capability(dev)
    say(f"GPU: {torch.cuda.get_device_name(dev)} (sm_{cap[0]}{cap[1]})")
    ok = True
    for pkg in packages:
        module, attr, run = _CHECKS[pkg.name]
        version = _dist_version(pkg)
        fn, how = None, ""
        try:
            fn = getattr(importlib.import_module(module), attr)
        except Exception as e:  # ImportError, OSError, undefined symbol ...
            hint = _import_hint(e, pkg)
            if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith((pkg.dist, pkg.extension)):
                try:
                    fn = getattr(_import_without_package_init(pkg.dist, module), attr)
                    how = (
                        f" [imported by bypassing {pkg.dist}/__init__.py, which fails: {hint}; the plain "
                        f"`from {module} import {attr}` fails the same way]"
                    )
                except Exception as e2:
                    hint = f"{hint}; without its __init__: {_import_hint(e2, pkg)}"
            if fn is None:
                ok = False
                say(f"{pkg.name} {version}: cannot import {module}.{attr}: {hint}")
                continue
        try:
            ext = importlib.import_module(pkg.extension)
            where = getattr(ext, "__file__", "?")
        except Exception:
            where = "?"
        say(f"{pkg.name} {version}: extension {where}{how}")
        try:
            good, line = run(fn, dev)
        except Exception as e:
            good = False
            text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            if "no kernel image" in text:
                text += (
                    f" -- built for another GPU architecture than sm_{cap[0]}{cap[1]}: "
                    "python -m ssamba.kernels build --force"
                )
            line = f"running it on the GPU failed: {text}"
            traceback.print_exc(file=out)
        ok = ok and good
        say(f"  {line}")
    why = "; ".join(str(w.message) for w in caught)
    say(
        f"ssamba.ops.backends.resolve_backend('auto') -> {backend!r}"
        + (f" ({why})" if why and backend != "cuda" else "")
    )
    if any(p.name == "mamba-ssm" for p in packages) and backend != "cuda":
        ok = False
        say("  the model would NOT use the CUDA scan")
    say("check passed" if ok else "check FAILED")
    return 0 if ok else 1
