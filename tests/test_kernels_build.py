"""CPU tests of ``python -m ssamba.kernels`` (no GPU, no network, nothing is compiled).

The setup.py rewrite is checked by *running* the rewritten files: small fake setup.py texts shaped like
the real ones are executed and the nvcc flags they produce are read back; the real setup.py files of the
carried sdists (``carry/sdists`` or ``$SSAMBA_SDISTS``; skipped when absent) are executed with
``setuptools.setup`` replaced by a recorder and a fake ``nvcc -V``, and the ``-gencode`` flags of the
``CUDAExtension`` they declare are compared (all nine before, only the local one after).
"""

from __future__ import annotations

import io
import json
import os
import runpy
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

import ssamba.kernels.build as K
import ssamba.kernels.check as KC
import ssamba.kernels.toolchain as KT
from ssamba.base.errors import KernelBuildError
from ssamba.kernels.__main__ import main
from ssamba.kernels.packages import PACKAGES, Arch, KernelPackage, parse_arch, parse_packages
from ssamba.kernels.setup_patch import count_sources, restrict_gencode, setup_imports, split_jobs
from ssamba.kernels.sources import extract_sdist, fetch_instructions, find_sdist

REPO = Path(__file__).resolve().parents[1]
H100 = [Arch(9, 0)]


def sdist_dir() -> Path:
    return Path(os.environ.get("SSAMBA_SDISTS") or REPO / "carry" / "sdists")


def gencode_of(flags: list[str]) -> tuple[list[str], list[str]]:
    """nvcc flags -> (the arch=... values after each -gencode, every other flag)."""
    archs, other, i = [], [], 0
    while i < len(flags):
        f = flags[i]
        if f == "-gencode":
            archs.append(flags[i + 1])
            i += 2
            continue
        if f.startswith("-gencode="):
            archs.append(f.split("=", 1)[1])
        else:
            other.append(f)
        i += 1
    return archs, other


def run_fake(text: str, nvcc: str = "13.0") -> list[str]:
    """Execute a fake setup.py text; it leaves its nvcc flags in ``nvcc_flags``."""
    ns = {"__name__": "fake_setup", "NVCC_VERSION": nvcc}
    exec(compile(text, "setup.py", "exec"), ns)
    return ns["nvcc_flags"]


# shaped like causal-conv1d 1.7.0 / mamba-ssm 2.3.2.post1: appends in pairs, newer archs behind version checks,
# the HIP branch appends an unrelated flag, the list is initialised before the branch
FAKE_CURRENT = """
import os
from packaging.version import Version
bare_metal_version = Version(NVCC_VERSION)
HIP_BUILD = False
SKIP_CUDA_BUILD = False
if not SKIP_CUDA_BUILD:
    TORCH_MAJOR = 2

    cc_flag = []

    if HIP_BUILD:
        cc_flag.append("-DBUILD_PYTHON_PACKAGE")
    else:
        if bare_metal_version < Version("11.6"):
            raise RuntimeError("too old")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_75,code=sm_75")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_87,code=sm_87")
        if bare_metal_version >= Version("11.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_90,code=sm_90")
        if bare_metal_version >= Version("12.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_100,code=sm_100")
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_120,code=sm_120")
        if bare_metal_version >= Version("13.0"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_103,code=sm_103")
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_110,code=sm_110")
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_121,code=sm_121")

    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"] + cc_flag + ["--threads", "4"]
"""

# older layout: the first block is conditional (dropped archs), flags added with extend / += / joined strings
FAKE_OLD = """
from packaging.version import Version
bare_metal_version = Version(NVCC_VERSION)


def flags():
    cc_flag = list()
    cc_flag.append("-DBUILD_PYTHON_PACKAGE")
    if bare_metal_version <= Version("12.9"):
        cc_flag.extend(["-gencode", "arch=compute_53,code=sm_53",
                        "-gencode", "arch=compute_62,code=sm_62"])
    cc_flag += ["-gencode=arch=compute_70,code=sm_70"]
    cc_flag += ("-gencode", "arch=compute_80,code=[sm_80,compute_80]")
    if bare_metal_version >= Version("11.8"): cc_flag.append("-gencode"); cc_flag.append("arch=compute_90,code=sm_90")
    label = "caf\u00e9"; cc_flag.append("--generate-code"); cc_flag.append("arch=compute_89,code=sm_89")
    return cc_flag


nvcc_flags = ["-O3"] + flags()
"""


# --------------------------------------------------------------------------------------------------
# setup.py rewrite on fake texts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nvcc", ["11.8", "12.4", "13.0"])
def test_rewrite_current_layout_keeps_exactly_the_local_arch(nvcc):
    before, other_before = gencode_of(run_fake(FAKE_CURRENT, nvcc))
    assert len(before) >= 4 and "arch=compute_75,code=sm_75" in before  # the control: many archs
    rw = restrict_gencode(FAKE_CURRENT, H100)
    after, other_after = gencode_of(run_fake(rw.text, nvcc))
    assert after == ["arch=compute_90,code=sm_90"]
    assert other_after == other_before  # nothing else touched
    assert rw.found == ["75", "80", "87", "90", "100", "120", "103", "110", "121"]
    assert rw.kept == ["90"] and rw.target == "cc_flag"
    assert rw.inserted_after == FAKE_CURRENT.splitlines().index("    cc_flag = []") + 1
    assert len(rw.removed_lines) == 18


def test_rewrite_other_arches_and_several():
    for archs, want in (
        ([Arch(8, 0)], ["arch=compute_80,code=sm_80"]),
        ([Arch(8, 9)], ["arch=compute_89,code=sm_89"]),  # not in the original list: still built
        ([Arch(9, 0, "a")], ["arch=compute_90a,code=sm_90a"]),
        ([Arch(8, 0), Arch(9, 0)], ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90"]),
    ):
        assert gencode_of(run_fake(restrict_gencode(FAKE_CURRENT, archs).text))[0] == want


def test_rewrite_old_layout_extend_augassign_joined_inline_nonascii():
    before, other_before = gencode_of(run_fake(FAKE_OLD, "13.0"))
    assert before == [
        "arch=compute_70,code=sm_70",
        "arch=compute_80,code=[sm_80,compute_80]",
        "arch=compute_90,code=sm_90",
    ]
    assert "--generate-code" in other_before  # gencode_of only knows -gencode: the helper is the control here
    rw = restrict_gencode(FAKE_OLD, H100)
    assert rw.found == ["53", "62", "70", "80", "90", "89"]
    for nvcc in ("12.4", "13.0"):  # the insertion is unconditional, not inside the `<= 12.9` block
        flags = run_fake(rw.text, nvcc)
        assert gencode_of(flags)[0] == ["arch=compute_90,code=sm_90"]
        assert flags[:2] == ["-O3", "-gencode"] or "-DBUILD_PYTHON_PACKAGE" in flags
        assert "-DBUILD_PYTHON_PACKAGE" in flags and "--generate-code" not in flags
    assert 'label = "caf\u00e9"; pass' in rw.text  # byte offsets handled on a non-ASCII line
    assert "    cc_flag = list()\n    cc_flag += [" in rw.text


def test_rewrite_result_is_stable_and_has_a_diff():
    rw = restrict_gencode(FAKE_CURRENT, H100)
    assert '+    cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]' in rw.diff
    assert '-        cc_flag.append("arch=compute_75,code=sm_75")' in rw.diff
    again = restrict_gencode(rw.text, [Arch(8, 0)])  # the rewritten file is itself recognised
    assert gencode_of(run_fake(again.text))[0] == ["arch=compute_80,code=sm_80"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("cc_flag = []\ncc_flag.append('-O3')\nnvcc_flags = cc_flag\n", "no '-gencode'"),
        ("cc_flag = ['-O3', '-gencode', 'arch=compute_80,code=sm_80']\nnvcc_flags = cc_flag\n", "does not recognise"),
        (
            "cc_flag = []\ncc_flag += ['-O3', '-gencode', 'arch=compute_80,code=sm_80']\nnvcc_flags = cc_flag\n",
            "does not recognise",
        ),
        (
            "cc_flag = []\nv = 80\ncc_flag.append('-gencode')\ncc_flag.append(f'arch=compute_{v},code=sm_{v}')\n",
            "does not recognise",
        ),
        ("cc_flag = []\ncc_flag.append('-gencode')\nnvcc_flags = cc_flag\n", "not followed by"),
        ("cc_flag = []\ncc_flag.append('arch=compute_80,code=sm_80')\n", "without a preceding"),
        (
            "a = []\nb = []\na.append('-gencode')\na.append('arch=compute_80,code=sm_80')\n"
            "b.append('-gencode')\nb.append('arch=compute_90,code=sm_90')\n",
            "several lists",
        ),
        (
            "def f(cc_flag):\n    cc_flag.append('-gencode')\n    cc_flag.append('arch=compute_80,code=sm_80')\n",
            "no 'cc_flag = []'",
        ),
        (
            "cc_flag = []\ncc_flag.append('-gencode')\ncc_flag.append('arch=compute_80,code=sm_80')\ncc_flag = ['-O3']\n",
            "reassigned",
        ),
        (
            "x = 1; cc_flag = []\ncc_flag.append('-gencode')\ncc_flag.append('arch=compute_80,code=sm_80')\n",
            "shares its line",
        ),
        ("cc_flag = [\n", "does not parse"),
    ],
)
def test_rewrite_fails_loudly_on_unrecognised_shapes(text, words):
    with pytest.raises(KernelBuildError, match=words.replace("(", r"\(").replace("[", r"\[")):
        restrict_gencode(text, H100)


def test_count_sources():
    text = "CUDAExtension(name='x', sources=['a.cpp', 'b.cu', 'c.cu'])\n"
    assert count_sources(text) == 3
    assert count_sources("x = 1\n") is None


# --------------------------------------------------------------------------------------------------
# the real setup.py files of the carried sdists
# --------------------------------------------------------------------------------------------------


def _real_setup(pkg_name: str, tmp_path: Path) -> Path:
    pkg = PACKAGES[pkg_name]
    sdist = find_sdist(sdist_dir(), pkg)
    if sdist is None:
        pytest.skip(f"no {pkg.name} sdist in {sdist_dir()}")
    return extract_sdist(sdist, tmp_path / pkg.name)


def _declared_nvcc_flags(src: Path, setup_text: str, pkg, monkeypatch) -> list[str]:
    """Run a setup.py text in ``src`` with setup() recorded and nvcc faked; the extension's nvcc flags."""
    import setuptools
    import torch.utils.cpp_extension as cpp

    (src / "setup.py").write_text(setup_text, encoding="utf-8")
    recorded: dict = {}
    real_check_output = subprocess.check_output

    def fake_check_output(cmd, *a, **kw):
        if str(cmd[0]).endswith("nvcc"):
            return "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
        return real_check_output(cmd, *a, **kw)

    monkeypatch.chdir(src)
    monkeypatch.setattr(setuptools, "setup", lambda **kw: recorded.update(kw))
    monkeypatch.setattr(subprocess, "check_output", fake_check_output)
    monkeypatch.setattr(cpp, "CUDA_HOME", "/fake/cuda")
    monkeypatch.setenv(f"{pkg.env_prefix}_FORCE_BUILD", "TRUE")
    monkeypatch.delenv(f"{pkg.env_prefix}_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # restored afterwards even if setup.py changes it
    runpy.run_path(str(src / "setup.py"), run_name="__main__")
    (ext,) = recorded["ext_modules"]
    assert ext.name == pkg.extension
    return list(ext.extra_compile_args["nvcc"])


@pytest.mark.parametrize("pkg_name", list(PACKAGES))
def test_real_setup_py_builds_only_the_local_arch(pkg_name, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wheel")
    src = _real_setup(pkg_name, tmp_path)
    pkg = PACKAGES[pkg_name]
    original = (src / "setup.py").read_text(encoding="utf-8")
    rw = restrict_gencode(original, H100)
    assert rw.kept == ["90"] and rw.target == "cc_flag"
    assert len(rw.found) >= 5 and "90" in rw.found and "80" in rw.found
    # only -gencode lines changed (to `pass`) plus the one inserted line right after `cc_flag = []`
    import difflib

    old, new = original.splitlines(), rw.text.splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag == "insert":
            assert new[j1:j2] == [new[j1]] and old[i1 - 1].strip() == "cc_flag = []"
            assert new[j1].strip().startswith('cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]')
            continue
        assert tag == "replace" and i2 - i1 == j2 - j1
        assert all(('"-gencode"' in o or "arch=compute_" in o) for o in old[i1:i2])
        assert all(n.strip() == "pass" for n in new[j1:j2])

    flags_before = _declared_nvcc_flags(src, original, pkg, monkeypatch)
    before, other_before = gencode_of(flags_before)
    assert len(before) == len(rw.found) >= 5
    flags_after = _declared_nvcc_flags(src, rw.text, pkg, monkeypatch)
    after, other_after = gencode_of(flags_after)
    assert after == ["arch=compute_90,code=sm_90"]
    assert other_after == other_before  # -O3, --use_fast_math, --threads 4 ... untouched
    capsys.readouterr()


def test_real_setup_py_counts_and_imports():
    for name, n_min in (("mamba-ssm", 8), ("causal-conv1d", 3)):
        sdist = find_sdist(sdist_dir(), PACKAGES[name])
        if sdist is None:
            pytest.skip(f"no {name} sdist in {sdist_dir()}")
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/setup.py"))
            text = tf.extractfile(member).read().decode()
        assert count_sources(text) >= n_min
        assert {"torch", "setuptools"} <= set(setup_imports(text))


# --------------------------------------------------------------------------------------------------
# sdists, fetch instructions, argument parsing
# --------------------------------------------------------------------------------------------------


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def test_find_sdist(tmp_path):
    mamba, conv = PACKAGES["mamba-ssm"], PACKAGES["causal-conv1d"]
    assert find_sdist(tmp_path / "absent", mamba) is None
    _touch(
        tmp_path,
        "mamba_ssm-2.2.4.tar.gz",
        "mamba_ssm-2.3.2.post1.tar.gz",
        "mamba_ssm-2.10.0.tar.gz",
        "notes.txt",
        "mamba_ssm_extra-9.0.tar.gz",
        "causal-conv1d-1.6.0.tar.gz",
        "causal-conv1d-1.5.0.zip",
    )
    assert find_sdist(tmp_path, mamba).name == "mamba_ssm-2.3.2.post1.tar.gz"  # the pinned one
    assert find_sdist(tmp_path, conv).name == "causal-conv1d-1.6.0.tar.gz"  # no pin: the newest
    (tmp_path / "mamba_ssm-2.3.2.post1.tar.gz").unlink()
    assert find_sdist(tmp_path, mamba).name == "mamba_ssm-2.10.0.tar.gz"  # by version, not by string


def test_fetch_instructions_name_the_command():
    text = fetch_instructions([PACKAGES["mamba-ssm"]], Path("/some/where"))
    assert "mamba-ssm 2.3.2.post1" in text and "/some/where" in text
    for part in (
        "pip download --no-deps --no-binary :all: --no-build-isolation",
        "MAMBA_SKIP_CUDA_BUILD=TRUE",
        "CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE",
        "mamba-ssm==2.3.2.post1",
        "causal-conv1d==1.7.0",
        "--sdist-dir",
        "SSAMBA_SDISTS",
    ):
        assert part in text


def test_missing_sdist_fails_with_fetch_instructions(tmp_path, capsys):
    _touch(tmp_path / "sd", "causal_conv1d-1.7.0.tar.gz")
    rc = main(
        [
            "build",
            "--sdist-dir",
            str(tmp_path / "sd"),
            "--arch",
            "9.0",
            "--wheel-dir",
            str(tmp_path / "w"),
            "--no-install",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "no source distribution in" in err and str((tmp_path / "sd").resolve()) in err
    assert "mamba-ssm 2.3.2.post1" in err and "causal-conv1d 1.7.0 (" not in err  # only the missing one
    assert "pip download --no-deps --no-binary :all: --no-build-isolation" in err
    assert "MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE" in err
    assert not (tmp_path / "w").exists()


def test_missing_sdist_dir_uses_env_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSAMBA_SDISTS", str(tmp_path / "nowhere"))
    rc = main(["build", "--arch", "9.0", "--wheel-dir", str(tmp_path / "w"), "--packages", "causal-conv1d"])
    assert rc == 1 and str(tmp_path / "nowhere") in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, want",
    [
        ("9.0", [Arch(9, 0)]),
        ("90", [Arch(9, 0)]),
        ("sm_90", [Arch(9, 0)]),
        ("compute_80", [Arch(8, 0)]),
        ("8.6", [Arch(8, 6)]),
        ("100", [Arch(10, 0)]),
        ("12.0", [Arch(12, 0)]),
        ("9.0a", [Arch(9, 0, "a")]),
        ("sm_90a", [Arch(9, 0, "a")]),
        (" 9.0 , 8.0 ", [Arch(8, 0), Arch(9, 0)]),
        ("9.0,90", [Arch(9, 0)]),
    ],
)
def test_parse_arch(text, want):
    assert parse_arch(text) == want


def test_arch_spellings():
    a = Arch(9, 0)
    assert (a.sm, a.gencode, a.torch_name, str(a)) == ("90", "arch=compute_90,code=sm_90", "9.0", "sm_90")
    assert Arch(9, 0, "a").gencode == "arch=compute_90a,code=sm_90a"


@pytest.mark.parametrize("text", ["9", "abc", "9.10", "", "9.0,", "auto,9.0", "sm90", "1.0", "9.0b", "-9.0"])
def test_parse_arch_rejects(text):
    with pytest.raises(ValueError):
        parse_arch(text)


def test_parse_arch_auto_uses_detection():
    assert parse_arch("auto", detect=lambda: [Arch(9, 0)]) == [Arch(9, 0)]
    assert parse_arch("AUTO", detect=lambda: [Arch(8, 0), Arch(9, 0)]) == [Arch(8, 0), Arch(9, 0)]


def test_auto_arch_without_gpu_fails_clearly(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["build", "--sdist-dir", str(tmp_path), "--wheel-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 1 and "no CUDA GPU is visible" in err and "--arch 9.0" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], "required"),
        (["compile"], "invalid choice"),
        (["build", "--arch", "9"], "cannot read GPU architecture"),
        (["build", "--arch", "auto,9.0"], "cannot be combined"),
        (["build", "--packages", "flash-attn"], "unknown package 'flash-attn'"),
        (["build", "--packages", "mamba-ssm,mamba_ssm"], "named twice"),
        (["build", "--packages", ","], "no package named"),
        (["build", "--jobs", "0"], "at least 1"),
        (["build", "--jobs", "many"], "whole number"),
        (["check", "--packages", "mamba"], "unknown package"),
        (["build", "--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_argument_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_parse_packages_order_and_spellings():
    assert [p.name for p in parse_packages("causal_conv1d,MAMBA-SSM")] == ["mamba-ssm", "causal-conv1d"]
    assert [p.name for p in parse_packages("causal-conv1d")] == ["causal-conv1d"]


@pytest.mark.parametrize(
    "total, caps, want",
    [
        (16, [10, 4], [10, 4]),
        (16, [None, 4], [12, 4]),
        (16, [None, None], [8, 8]),
        (7, [None, None], [4, 3]),
        (2, [10, 4], [1, 1]),
        (1, [10, 4], [1, 1]),
        (6, [3, 2], [3, 2]),
        (8, [10], [8]),
        (3, [], []),
    ],
)
def test_split_jobs(total, caps, want):
    assert split_jobs(total, caps) == want


def test_extract_sdist_refuses_paths_outside(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        data = b"print('x')\n"
        info = tarfile.TarInfo("../escape/setup.py")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(KernelBuildError, match="outside"):
        extract_sdist(bad, tmp_path / "x")
    assert not (tmp_path / "escape").exists()


# --------------------------------------------------------------------------------------------------
# the build orchestration, with pip replaced by a script that pretends to compile
# --------------------------------------------------------------------------------------------------

FAKE_PIP = textwrap.dedent("""
    import json, os, sys, time, zipfile
    out_dir, src, dist, version, ext, fail = sys.argv[1:7]
    setup = open(os.path.join(src, "setup.py")).read()
    report = {k: os.environ.get(k) for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "MAMBA_FORCE_BUILD",
              "CAUSAL_CONV1D_FORCE_BUILD", "MAMBA_SKIP_CUDA_BUILD", "CAUSAL_CONV1D_SKIP_CUDA_BUILD")}
    report["cwd"] = os.getcwd()
    report["gencode"] = [l.strip() for l in setup.splitlines() if "arch=compute_" in l]
    json.dump(report, open(os.path.join(os.path.dirname(out_dir), "report.json"), "w"))
    print("Building wheel for " + dist, flush=True)
    print("  [1/2] /usr/local/cuda/bin/nvcc -c -c " + src + "/csrc/kernel_fwd.cu -o kernel_fwd.o", flush=True)
    time.sleep(0.3)
    if fail == "1":
        print("csrc/kernel_bwd.cu(12): error: identifier \\"oops\\" is undefined", flush=True)
        print("ERROR: Failed building wheel for " + dist, flush=True)
        sys.exit(1)
    print("  [2/2] c++ -MMD -c -c " + src + "/csrc/binding.cpp -o binding.o", flush=True)
    whl = os.path.join(out_dir, f"{dist}-{version}-cp311-cp311-linux_x86_64.whl")
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(f"{ext}.cpython-311-x86_64-linux-gnu.so", b"ELF")
        zf.writestr(f"{dist}/__init__.py", "")
    print("Successfully built " + dist, flush=True)
""")

FAKE_TOOLCHAIN = {
    "python": "3.11.7",
    "python_tag": "cp311",
    "torch": "2.11.0+cu130",
    "torch_cuda": "13.0",
    "cuda_home": "/fake/cuda",
    "ninja": True,
    "nvcc": "/fake/cuda/bin/nvcc",
    "nvcc_version": "13.0",
    "nvcc_codes": ["sm_80", "sm_90", "sm_100"],
}


def _fake_sdist(folder: Path, pkg, n_sources: int) -> Path:
    files = ", ".join(repr(f"csrc/f{i}.cu") for i in range(n_sources))
    setup = FAKE_CURRENT + f"\next = dict(name={pkg.extension!r}, sources=[{files}])\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pkg.dist}-{pkg.version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (
            (f"{pkg.dist}-{pkg.version}/setup.py", setup.encode()),
            (f"{pkg.dist}-{pkg.version}/README.md", b"fake\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """sdists of both packages (3 and 2 sources), a fake toolchain and a fake `pip wheel`."""
    sd = tmp_path / "sdists"
    _fake_sdist(sd, PACKAGES["mamba-ssm"], 3)
    _fake_sdist(sd, PACKAGES["causal-conv1d"], 2)
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    failing: set[str] = set()

    def fake_cmd(src: Path, out_dir: Path) -> list[str]:
        pkg = next(p for p in PACKAGES.values() if src.name.startswith(p.dist))
        return [
            sys.executable,
            str(script),
            str(out_dir),
            str(src),
            pkg.dist,
            pkg.version,
            pkg.extension,
            "1" if pkg.name in failing else "0",
        ]

    monkeypatch.setattr(K, "pip_wheel_command", fake_cmd)
    monkeypatch.setattr(K, "toolchain", lambda: dict(FAKE_TOOLCHAIN))
    monkeypatch.setenv("MAMBA_SKIP_CUDA_BUILD", "TRUE")  # left over from `pip download`: must not reach the build
    return sd, tmp_path / "wheels", failing


def test_build_orchestration_parallel(fake_build, capsys, monkeypatch):
    sd, wheels, _ = fake_build
    seen: dict[str, dict] = {}
    real_finish = K._finish

    def spy(b):
        seen[b.pkg.name] = json.loads((b.work / "report.json").read_text())
        real_finish(b)

    monkeypatch.setattr(K, "_finish", spy)
    rc = main(
        [
            "build",
            "--sdist-dir",
            str(sd),
            "--arch",
            "9.0",
            "--wheel-dir",
            str(wheels),
            "--no-install",
            "--parallel",
            "--jobs",
            "6",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    # jobs shared by source count (3 and 2 files), env as required, the rewritten setup.py in place
    assert seen["mamba-ssm"]["MAX_JOBS"] == "3" and seen["causal-conv1d"]["MAX_JOBS"] == "2"
    assert seen["mamba-ssm"]["MAMBA_FORCE_BUILD"] == "TRUE"
    assert seen["causal-conv1d"]["CAUSAL_CONV1D_FORCE_BUILD"] == "TRUE"
    assert seen["mamba-ssm"]["MAMBA_SKIP_CUDA_BUILD"] is None
    for rep in seen.values():
        assert rep["TORCH_CUDA_ARCH_LIST"] == "9.0"
        assert rep["gencode"] == [
            'cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]  # ssamba.kernels: only sm_90 (the local GPU)'
        ]
    # progress, per-package completion lines and the summary
    assert "setup.py lists 9 architectures" in out and "building only sm_90" in out
    assert "mamba-ssm [1/2] kernel_fwd.cu" in out and "causal-conv1d [2/2] binding.cpp" in out
    assert "mamba-ssm: built in" in out and "causal-conv1d: built in" in out
    assert "total wall time" in out and "at once" in out
    for pkg in PACKAGES.values():
        (whl,) = wheels.glob(f"{pkg.dist}-{pkg.version}-*.whl")
        meta = json.loads(K.wheel_info_path(whl).read_text())
        assert meta["archs"] == ["9.0"] and meta["torch"] == "2.11.0+cu130" and meta["python_tag"] == "cp311"
        log = (wheels / "logs" / f"{pkg.dist}-{pkg.version}-build.log").read_text()
        assert "Successfully built" in log and '+    cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]' in log
    assert not Path(seen["mamba-ssm"]["cwd"]).exists()  # scratch folder removed after success

    # a second build reuses the wheels without touching the sdists
    for p in sd.iterdir():
        p.unlink()
    rc = main(["build", "--sdist-dir", str(sd), "--arch", "9.0", "--wheel-dir", str(wheels), "--no-install"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count(": reusing ") == 2 and "reused" in out
    # ... but not for another architecture (and then the missing sdists are reported)
    rc = main(["build", "--sdist-dir", str(sd), "--arch", "8.0", "--wheel-dir", str(wheels), "--no-install"])
    assert rc == 1 and "no source distribution" in capsys.readouterr().err


def test_build_failure_shows_log_and_keeps_the_other(fake_build, capsys):
    sd, wheels, failing = fake_build
    failing.add("causal-conv1d")
    rc = main(
        ["build", "--sdist-dir", str(sd), "--arch", "9.0", "--wheel-dir", str(wheels), "--no-install", "--jobs", "2"]
    )
    out = capsys.readouterr().out
    assert rc == 1
    log = wheels / "logs" / "causal_conv1d-1.7.0-build.log"
    assert "causal-conv1d: FAILED after" in out and f"full log: {log}" in out
    assert 'identifier "oops" is undefined' in out  # the error line is shown, not only pip's last words
    assert "mamba-ssm: built in" in out and "one after another" in out
    assert "scratch folder kept for inspection" in out
    assert list(wheels.glob("mamba_ssm-*.whl")) and not list(wheels.glob("causal_conv1d-*.whl"))
    assert "Failed building wheel" in log.read_text()


def test_build_rejects_wheel_without_extension(fake_build, capsys, monkeypatch):
    sd, wheels, _ = fake_build
    monkeypatch.setattr(K, "wheel_has_extension", lambda whl, pkg: False)
    rc = main(
        [
            "build",
            "--sdist-dir",
            str(sd),
            "--arch",
            "9.0",
            "--wheel-dir",
            str(wheels),
            "--no-install",
            "--packages",
            "mamba-ssm",
        ]
    )
    assert rc == 1 and "holds no compiled selective_scan_cuda" in capsys.readouterr().out


def test_preflight_stops_before_compiling(fake_build, capsys, monkeypatch):
    sd, wheels, _ = fake_build
    bad = dict(FAKE_TOOLCHAIN, nvcc_version="12.4")
    monkeypatch.setattr(K, "toolchain", lambda: bad)
    rc = main(["build", "--sdist-dir", str(sd), "--arch", "9.0", "--wheel-dir", str(wheels), "--no-install"])
    assert rc == 1 and "CUDA 12.4 but torch was built with CUDA 13.0" in capsys.readouterr().err
    monkeypatch.setattr(K, "toolchain", lambda: dict(FAKE_TOOLCHAIN, nvcc_codes=["sm_80"]))
    rc = main(["build", "--sdist-dir", str(sd), "--arch", "9.0", "--wheel-dir", str(wheels), "--no-install"])
    assert rc == 1 and "cannot generate code for sm_90" in capsys.readouterr().err
    monkeypatch.setattr(K, "toolchain", lambda: dict(FAKE_TOOLCHAIN, nvcc=None))
    rc = main(["build", "--sdist-dir", str(sd), "--arch", "9.0", "--wheel-dir", str(wheels), "--no-install"])
    assert rc == 1 and "nvcc not found" in capsys.readouterr().err
    assert not wheels.exists() or not list(wheels.glob("*.whl"))


def test_check_without_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["check"]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().out


def test_preflight_cuda_headers_and_scratch_cleanup(fake_build, capsys, monkeypatch, tmp_path):
    import tempfile

    sd, wheels, _ = fake_build
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(
        K,
        "toolchain",
        lambda: dict(
            FAKE_TOOLCHAIN, cuda_home="/usr/local", cuda_include=False, cuda_candidates=["/usr/local/cuda-13.0"]
        ),
    )
    rc = main(["build", "--sdist-dir", str(sd), "--arch", "9.0", "--wheel-dir", str(wheels), "--no-install"])
    err = capsys.readouterr().err
    assert rc == 1 and "has no include/cuda_runtime_api.h" in err and "CUDA_HOME=/usr/local/cuda-13.0" in err
    assert list(scratch.iterdir()) == []  # the extracted sources are not left behind


def test_setup_py_imports_are_checked(fake_build, capsys, monkeypatch):
    sd, wheels, _ = fake_build
    real = KT.setup_imports
    monkeypatch.setattr(KT, "setup_imports", lambda src: real(src) + ["no_such_module_for_ssamba"])
    rc = main(["build", "--sdist-dir", str(sd), "--arch", "9.0", "--wheel-dir", str(wheels), "--no-install"])
    assert rc == 1 and "imports no_such_module_for_ssamba, not installed here" in capsys.readouterr().err


def test_import_without_package_init(tmp_path, monkeypatch):
    """mamba_ssm/__init__.py imports transformers & co; check can still reach the scan module."""
    pkg = tmp_path / "fake_kernelpkg"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import no_such_dependency_xyz\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "iface.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError) as exc:
            __import__("fake_kernelpkg.ops.iface")
        hint = KC._import_hint(exc.value, KernelPackage("x", "fake_kernelpkg", "1", "X", "x_cuda"))
        assert "needs the module 'no_such_dependency_xyz'" in hint
        mod = KC._import_without_package_init("fake_kernelpkg", "fake_kernelpkg.ops.iface")
        assert mod.VALUE == 42
    finally:
        for name in [m for m in sys.modules if m.startswith("fake_kernelpkg")]:
            del sys.modules[name]
