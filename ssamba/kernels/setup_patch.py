"""Rewriting a package's ``setup.py`` so that only the local GPU architecture is compiled."""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ssamba.base.errors import KernelBuildError
from ssamba.kernels.packages import Arch

GENCODE_FLAGS = ("-gencode", "--generate-code")
_ARCH_SPEC = r"(?:sm|compute|lto)_\d+[af]?"
_GENCODE_VALUE = re.compile(rf"^arch=compute_(\d+[af]?),code=\[?({_ARCH_SPEC}(?:,{_ARCH_SPEC})*)\]?$")
_GENCODE_JOINED = re.compile(r"^(?:-gencode|--generate-code)[= ](arch=.*)$")
_SUSPICIOUS = re.compile(r"arch=compute_|code=sm_|-gencode|--generate-code|--gpu-architecture|^-arch[= ]")
_MARK = "# ssamba.kernels:"


@dataclass
class GencodeRewrite:
    text: str  # the new setup.py
    found: list[str]  # the sm values the original listed, in source order ("75", "80", ...)
    kept: list[str]  # what the new one builds ("90")
    target: str  # the list variable ("cc_flag")
    removed_lines: list[int]  # 1-based lines of the removed statements in the original
    inserted_after: int  # 1-based line of the `target = []` the new statement follows
    diff: str


def _classify(value: str) -> tuple[str, Optional[str]]:
    """A string constant -> ("flag", None) | ("value", sm) | ("both", sm) | ("other", None)."""
    if value in GENCODE_FLAGS:
        return "flag", None
    m = _GENCODE_VALUE.match(value)
    if m:
        return "value", m.group(1)
    m = _GENCODE_JOINED.match(value)
    if m:
        m2 = _GENCODE_VALUE.match(m.group(1))
        if m2:
            return "both", m2.group(1)
    return "other", None


def _str_elements(node: ast.AST) -> Optional[list[str]]:
    """The strings of a list/tuple literal (or a lone string), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]
    return None


def _gencode_statement(stmt: ast.stmt) -> Optional[tuple[str, list[str]]]:
    """``T.append("-gencode")``, ``T.append("arch=...")``, ``T.extend([...])``, ``T += [...]`` made only of
    -gencode strings -> (T, strings); any other statement -> None."""
    target = strings = None
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        call = stmt.value
        if (
            isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name)
            and len(call.args) == 1
            and not call.keywords
        ):
            if call.func.attr == "append" and isinstance(call.args[0], ast.Constant):
                target, strings = call.func.value.id, _str_elements(call.args[0])
            elif call.func.attr == "extend" and isinstance(call.args[0], (ast.List, ast.Tuple)):
                target, strings = call.func.value.id, _str_elements(call.args[0])
    elif (
        isinstance(stmt, ast.AugAssign)
        and isinstance(stmt.op, ast.Add)
        and isinstance(stmt.target, ast.Name)
        and isinstance(stmt.value, (ast.List, ast.Tuple))
    ):
        target, strings = stmt.target.id, _str_elements(stmt.value)
    if target is None or not strings:
        return None
    if all(_classify(s)[0] != "other" for s in strings):
        return target, strings
    return None


def _scan_gencode(tree: ast.AST, filename: str):
    """(gencode statements in source order, their target, the sm values) -- or KernelBuildError."""
    stmts: list[ast.stmt] = []
    claimed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            hit = _gencode_statement(node)
            if hit:
                stmts.append(node)
                claimed.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in claimed
            and _SUSPICIOUS.search(node.value)
        ):
            raise KernelBuildError(
                f"{filename}:{node.lineno}: GPU architecture flag {node.value!r} is used in a form this rewrite "
                "does not recognise (it handles T.append/T.extend/T += of '-gencode' and 'arch=compute_XY,code=sm_XY' "
                "strings only). Refusing to build every architecture silently; adapt ssamba/kernels/build.py to this "
                "setup.py."
            )
    if not stmts:
        raise KernelBuildError(
            f"{filename}: no '-gencode' / 'arch=compute_XY,code=sm_XY' flags found, so the architecture list cannot be "
            "restricted (this setup.py is not shaped like mamba-ssm 2.3 / causal-conv1d 1.7). Refusing to build "
            "every architecture silently; adapt ssamba/kernels/build.py to this setup.py."
        )
    stmts.sort(key=lambda s: (s.lineno, s.col_offset))
    targets = {_gencode_statement(s)[0] for s in stmts}
    if len(targets) != 1:
        raise KernelBuildError(
            f"{filename}: -gencode flags go into several lists ({', '.join(sorted(targets))}); "
            "not a recognised setup.py shape"
        )
    target = targets.pop()
    found: list[str] = []
    pending_flag: Optional[int] = None
    for s in stmts:
        for value in _gencode_statement(s)[1]:
            kind, sm = _classify(value)
            if kind == "flag":
                if pending_flag is not None:
                    raise KernelBuildError(f"{filename}:{pending_flag}: '-gencode' not followed by an arch=... value")
                pending_flag = s.lineno
            elif kind == "value":
                if pending_flag is None:
                    raise KernelBuildError(f"{filename}:{s.lineno}: {value!r} without a preceding '-gencode'")
                pending_flag = None
                found.append(sm)
            else:  # both
                if pending_flag is not None:
                    raise KernelBuildError(f"{filename}:{pending_flag}: '-gencode' not followed by an arch=... value")
                found.append(sm)
    if pending_flag is not None:
        raise KernelBuildError(f"{filename}:{pending_flag}: '-gencode' not followed by an arch=... value")
    return stmts, target, found


def _parents(tree: ast.AST) -> dict[int, ast.AST]:
    out = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            out[id(child)] = node
    return out


def _find_anchor(tree: ast.AST, target: str, first: ast.stmt, filename: str) -> ast.stmt:
    """The last ``target = []`` before ``first`` whose block encloses ``first``."""
    parents = _parents(tree)
    ancestors = set()
    node: Optional[ast.AST] = first
    while node is not None:
        ancestors.add(id(node))
        node = parents.get(id(node))
    candidates = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == target
        ):
            if node.lineno > first.lineno:
                raise KernelBuildError(
                    f"{filename}:{node.lineno}: {target} is reassigned after its -gencode flags; "
                    "not a recognised setup.py shape"
                )
            empty = (isinstance(node.value, ast.List) and not node.value.elts) or (
                isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "list"
                and not node.value.args
            )
            if empty and id(parents.get(id(node))) in ancestors:
                candidates.append(node)
    if not candidates:
        raise KernelBuildError(
            f"{filename}: no '{target} = []' found before the first -gencode flag (line "
            f"{first.lineno}); cannot place the local architecture. Not a recognised setup.py shape"
        )
    return max(candidates, key=lambda n: n.lineno)


def restrict_gencode(source: str, archs: Sequence[Arch], filename: str = "setup.py") -> GencodeRewrite:
    """Rewrite a ``setup.py`` so its nvcc ``-gencode`` list is exactly ``archs``.

    Every statement that appends ``-gencode`` / ``arch=compute_XY,code=sm_XY`` strings to the flag list
    becomes ``pass`` (so ``if`` blocks stay valid), and one statement adding the local architectures goes
    right after the list's ``T = []``, at its indentation (unconditional, like the list itself). Raises
    :class:`KernelBuildError` when no such flags exist or they are used in a form not recognised here.
    """
    if not archs:
        raise KernelBuildError("no GPU architecture to build for")
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise KernelBuildError(f"{filename} does not parse: {e}") from e
    stmts, target, found = _scan_gencode(tree, filename)
    anchor = _find_anchor(tree, target, stmts[0], filename)

    lines = [ln.encode("utf-8") for ln in source.splitlines(keepends=True)]
    anchor_line = lines[anchor.lineno - 1]
    indent = anchor_line[: anchor.col_offset]
    if indent.strip():
        raise KernelBuildError(
            f"{filename}:{anchor.lineno}: '{target} = []' shares its line with another "
            "statement; not a recognised setup.py shape"
        )
    flags = ", ".join(f'"-gencode", "{a.gencode}"' for a in archs)
    insertion = (
        f"{indent.decode()}{target} += [{flags}]  {_MARK} only {', '.join(str(a) for a in archs)} (the local GPU)"
    ).encode("utf-8")
    end_line = lines[anchor.end_lineno - 1]
    body_end = len(end_line.rstrip(b"\r\n"))
    newline = end_line[body_end:] or b"\n"

    # (line, col, end_line, end_col, replacement); all positions 1-based lines, utf-8 byte columns
    edits = [(s.lineno, s.col_offset, s.end_lineno, s.end_col_offset, b"pass") for s in stmts]
    edits.append((anchor.end_lineno, body_end, anchor.end_lineno, body_end, newline + insertion))
    for line, col, eline, ecol, repl in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        head = lines[line - 1][:col]
        tail = lines[eline - 1][ecol:]
        lines[line - 1 : eline] = [head + repl + tail]
    text = b"".join(lines).decode("utf-8")
    if anchor.end_lineno == len(source.splitlines()) and not source.endswith("\n"):
        text += "\n"

    # verify: parses, and now builds exactly `archs`
    try:
        new_tree = ast.parse(text, filename=filename)
    except SyntaxError as e:  # pragma: no cover - would be a bug in the edit above
        raise KernelBuildError(f"rewriting {filename} produced invalid Python ({e}); please report") from e
    _, new_target, kept = _scan_gencode(new_tree, filename)
    want = [a.sm for a in archs]
    if new_target != target or kept != want:  # pragma: no cover - would be a bug in the edit above
        raise KernelBuildError(f"rewriting {filename} kept {kept}, expected {want}; please report")
    diff = "".join(
        difflib.unified_diff(
            source.splitlines(keepends=True),
            text.splitlines(keepends=True),
            f"{filename} (original)",
            f"{filename} (local GPU only)",
        )
    )
    return GencodeRewrite(text, found, kept, target, sorted({s.lineno for s in stmts}), anchor.lineno, diff)


def count_sources(source: str) -> Optional[int]:
    """How many files the setup.py's ``sources=[...]`` lists compile (ninja runs at most that many jobs)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "sources" and isinstance(node.value, (ast.List, ast.Tuple)):
            n += sum(1 for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return n or None


def setup_imports(source: str) -> list[str]:
    """Top-level modules a setup.py imports (to check the build environment before compiling)."""
    mods: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for n in names:
            top = n.split(".")[0]
            if top not in mods:
                mods.append(top)
    return mods


def split_jobs(total: int, caps: Sequence[Optional[int]]) -> list[int]:
    """Share ``total`` parallel jobs between builds running at once; build i never gets more than
    ``caps[i]`` (its number of source files; None = no cap) and each gets at least one."""
    k = len(caps)
    if k == 0:
        return []
    shares = [1] * k
    left = total - k
    while left > 0:
        grew = False
        for i in range(k):
            if left > 0 and (caps[i] is None or shares[i] < caps[i]):
                shares[i] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return shares
