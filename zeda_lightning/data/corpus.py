"""Deterministic, offline three-domain corpus: Python code, English prose, arithmetic / maths text.

Sources (all present in every CPython install, nothing is downloaded):

* ``code``  -- ``.py`` files of the standard library (``sysconfig.get_paths()["stdlib"]``), minus tests, GUI
  code, codecs and generated tables, cut into documents of ``CODE_MIN_CHARS``..``CODE_MAX_CHARS`` characters
  at top-level statement boundaries (``def`` / ``class`` with their decorators and leading comments) where
  possible, then at nested statement boundaries (methods, body statements), never inside a string literal
  or an expression (cuts come from :mod:`ast` line numbers); data tables and comment blocks are dropped.
* ``prose`` -- ``pydoc_data.topics.topics`` (the language reference as plain text) and module / class /
  function docstrings of the same stdlib files, read with :mod:`ast` (nothing is imported), with reST markup,
  code blocks, doctests, grammar productions and field lists removed, then packed into paragraphs-documents.
* ``math``  -- generated with a seeded :class:`random.Random`: facts, precedence, times tables, word problems,
  fractions, decimals, linear equations, percentages, powers, gcd / lcm, factorisations, sequences, means.
  Every stated result is computed, never typed in.

The same ``seed`` on the same Python version gives byte-identical files (the code and prose domains follow
the stdlib of the interpreter that builds them; nothing depends on hash seeds, time or thread counts). Sources
are read in a seeded order until the code / prose pools hold ``POOL_MARGIN`` times the budget, then each
domain's documents are a seeded sample of its pool, so small builds (tests) only parse a few dozen files. Splits are made per domain by *source group* (a stdlib
file, a docs topic, a generated document), so no document -- nor any chunk of the same source file -- is in
both train and val/test; exact duplicate texts are removed inside each domain before splitting.

Run ``python -m zeda_lightning corpus --out DIR [--seed 0]`` to build it and print the stats as JSON.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from zeda_lightning.fsio import atomic_write

try:
    from pydoc_data.topics import topics as _PYDOC_TOPICS
except ImportError:  # stripped-down Python builds: no topics prose
    _PYDOC_TOPICS = {}

DOMAINS: tuple[str, ...] = ("code", "prose", "math")
SPLITS: tuple[str, ...] = ("train", "val", "test")

CODE_MIN_CHARS = 400
CODE_MAX_CHARS = 1500
PROSE_MIN_CHARS = 200
PROSE_MAX_CHARS = 1500
MATH_MIN_CHARS = 500
MATH_MAX_CHARS = 1500
# Default text budget per domain: ~1 MB each keeps the corpus a few MB and CPU training short.
DEFAULT_CHARS_PER_DOMAIN = 1_000_000

# Stdlib folders (any path component) and files never used as sources.
SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "encodings", "lib2to3", "ensurepip",
    "site-packages", "dist-packages", "__pycache__", "pydoc_data", "lib-dynload", "__phello__", "msilib",
})
SKIP_DIR_PREFIXES = ("config-",)
SKIP_FILES = frozenset({
    "this.py", "antigravity.py", "turtle.py", "stringprep.py", "keyword.py", "token.py",
    "html/entities.py", "__hello__.py",
})
SKIP_FILE_PREFIXES = ("_sysconfigdata", "test_")


@dataclass(frozen=True)
class Doc:
    text: str
    domain: str
    group: str  # source group: documents of one group always land in the same split


# ----------------------------------------------------------------------------------------------- stdlib files
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """Sorted ``(relative posix path, path)`` of the usable stdlib ``.py`` files."""
    root = Path(root) if root is not None else stdlib_dir()
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith(SKIP_DIR_PREFIXES) and not d.startswith(".")
        )
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith(SKIP_FILE_PREFIXES) or name.endswith("_test.py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel in SKIP_FILES or name in SKIP_FILES or path.is_symlink():
                continue
            out.append((rel, path))
    out.sort(key=lambda x: x[0])
    return out


def _read_source(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) > 400_000:  # generated tables, not code worth learning from
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- code domain
_DATA_LINE_RE = re.compile(r"""^\s*(['"(\[{\d-]|0x).*[,:\]})]\s*(#.*)?$""")
_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _statement_cuts(tree: ast.Module, lines: list[str]) -> dict[int, int]:
    """``{line index: depth}`` of every statement start (decorators and the comments right above included).

    Cutting a file only at these lines never splits a string, an expression or a decorator list; depth 0 is a
    top-level statement, 1 a class member / function body statement, and so on (the shallowest depth wins).
    """
    cuts: dict[int, int] = {}

    def visit(stmts: list[ast.AST], depth: int, nested: bool) -> None:
        for k, node in enumerate(stmts):
            if isinstance(node, (ast.ExceptHandler, ast.match_case)):
                visit(node.body, depth, True)  # the handler / case line itself belongs to its parent block
                continue
            if not isinstance(node, ast.stmt):
                continue
            for field in _BODY_FIELDS:
                visit(getattr(node, field, None) or [], depth + 1, True)
            if nested and k == 0:
                continue  # a block's first statement stays with its header line (``class X:``, ``else:``)
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
            indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())] if first < len(lines) else ""
            while first > 0 and lines[first - 1].startswith(indent + "#"):
                first -= 1
            cuts[first] = min(depth, cuts.get(first, depth))

    visit(tree.body, 0, False)
    return cuts


def _code_pieces(lines: list[str], cuts: dict[int, int], lo: int, hi: int, depth: int, max_chars: int) -> Iterator[str]:
    """Lines ``lo..hi`` cut at statement starts of ``depth``; pieces still too long are cut one level deeper
    (and, past the deepest statement level, line by line)."""
    inner = sorted(i for i, d in cuts.items() if lo < i < hi and d <= depth)
    bounds = [lo] + inner + [hi]
    deepest = max(cuts.values(), default=0)
    for a, b in zip(bounds, bounds[1:]):
        text = "".join(lines[a:b])
        if len(text) <= max_chars:
            yield text
        elif depth < deepest:
            yield from _code_pieces(lines, cuts, a, b, depth + 1, max_chars)
        else:
            yield from lines[a:b]


def _pack(pieces: Iterable[str], min_chars: int, max_chars: int) -> Iterator[str]:
    """Greedy packing of consecutive pieces into chunks of at most ``max_chars``; short leftovers are dropped."""
    cur = ""
    for piece in pieces:
        if len(cur) + len(piece) <= max_chars:
            cur += piece
            continue
        if len(cur.strip()) >= min_chars:
            yield cur
        cur = piece if len(piece) <= max_chars else ""
    if len(cur.strip()) >= min_chars:
        yield cur


def _clean_code_chunk(chunk: str) -> str | None:
    lines = chunk.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    text = "\n".join(ln.rstrip() for ln in lines).rstrip() + "\n"
    nonblank = [ln for ln in text.splitlines() if ln.strip()]
    if len(nonblank) < 5 or max(len(ln) for ln in nonblank) > 160:
        return None
    data_like = sum(1 for ln in nonblank if _DATA_LINE_RE.match(ln))
    if data_like > 0.5 * len(nonblank):  # tables / dict literals, not code
        return None
    comment_like = sum(1 for ln in nonblank if ln.lstrip().startswith("#"))
    if comment_like > 0.6 * len(nonblank):  # licence headers, commented-out blocks
        return None
    return text


def _code_chunks(source: str, tree: ast.Module) -> list[str]:
    lines = source.splitlines(keepends=True)
    cuts = _statement_cuts(tree, lines)
    cuts[0] = 0  # the module header (docstring, comments) starts the first piece
    pieces = _code_pieces(lines, cuts, 0, len(lines), 0, CODE_MAX_CHARS)
    chunks = []
    for chunk in _pack(pieces, CODE_MIN_CHARS, CODE_MAX_CHARS):
        text = _clean_code_chunk(chunk)
        if text is not None and CODE_MIN_CHARS <= len(text) <= CODE_MAX_CHARS:
            chunks.append(text)
    return chunks


def code_docs(files: list[tuple[str, Path]] | None = None) -> list[Doc]:
    """Code documents of the stdlib files, in file order then source order."""
    docs: list[Doc] = []
    for rel, path in files if files is not None else stdlib_files():
        for text in _file_material(path)[0]:
            docs.append(Doc(text, "code", f"code:{rel}"))
    return docs


# ------------------------------------------------------------------------------------------------ prose domain
_STOPWORDS = frozenset(
    "the a an of to and is in that it for are be this as with by or on not if from which can when at its was "
    "will an has have these may must used than".split()
)
_ROLE_RE = re.compile(r":[\w:.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL_RE = re.compile(r"``([^`]+)``")
_LINK_RE = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{1,2}")
_BACKTICK_RE = re.compile(r"`([^`]+)`")
_EMPH_RE = re.compile(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])")
_UNDERLINE_RE = re.compile(r"^\s*([=\-~^*#+\"'`:.])\1{2,}\s*$")
_FIELD_RE = re.compile(r"^:[\w ]+:(\s|$)")  # ":param x: ..." (a role ":func:`x`" is followed by a backtick)
_SECTION_RE = re.compile(
    r"^(args|arguments|parameters|params|returns?|yields?|raises?|attributes|examples?|notes?|see also|"
    r"keyword arguments|other parameters|warnings?|methods|usage|options)\s*:?\s*$",
    re.I,
)


def _strip_markup(text: str) -> str:
    text = _ROLE_RE.sub(lambda m: m.group(1).split(".")[-1] if m.group(0).find("~") >= 0 else m.group(1), text)
    text = _LITERAL_RE.sub(r"\1", text)
    text = _LINK_RE.sub(r"\1", text)
    text = _BACKTICK_RE.sub(r"\1", text)
    text = _EMPH_RE.sub(r"\1", text)
    return text


_ALPHA_WORD_RE = re.compile(r"[A-Za-z][a-z'\-]*[,.;:!?)]?")
_NON_LETTER_RE = re.compile(r"[^\w\s]|[\d_]")
_CODE_TOKENS = (">>>", "::=", "{{", "}}", "\\n", "->", " = ")


def _is_prose(par: str) -> bool:
    """Mostly English words: letters and spaces, few symbols, real words, some stopwords, a sentence end."""
    if par.rstrip()[-1:] not in ".!?:)\"”" or any(tok in par for tok in _CODE_TOKENS):
        return False
    if len(_NON_LETTER_RE.findall(par)) > 0.15 * len(par):
        return False
    words = par.split()
    if len(words) < 8:
        return False
    alpha_words = sum(1 for w in words if _ALPHA_WORD_RE.fullmatch(w.strip("(\"“”'")))
    if alpha_words < 0.65 * len(words):
        return False
    return sum(1 for w in words if w.lower().strip(",.;:()") in _STOPWORDS) >= 2


def _paragraphs(text: str) -> Iterator[list[str]]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


_MARKER_RE = re.compile(r"^(\*|-|\d{1,2}\.|\(\d{1,2}\)|\[\d{1,2}\])\s+")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _clean_paragraph(block: list[str]) -> str | None:
    """One blank-line separated block -> one unwrapped prose line, or None when it is not prose.

    Code blocks, grammar productions, doctests, tables, headings, field lists and section titles are dropped;
    list items keep a ``- `` marker; a definition-list term is dropped and its body kept.
    """
    if any(_UNDERLINE_RE.match(ln) for ln in block) or any(ln.lstrip().startswith("+--") for ln in block):
        return None  # heading with its underline, or a grid table
    if any(ln.lstrip().startswith((">>>", "...", ".. ", "$ ", "%", "|")) for ln in block):
        return None
    if any(_FIELD_RE.match(ln.lstrip()) for ln in block) or (len(block) == 1 and _SECTION_RE.match(block[0].strip())):
        return None
    lines = list(block)
    # definition list ("term" then a deeper indented body): keep the body
    if len(lines) > 1 and _indent(lines[1]) > _indent(lines[0]) and not lines[0].rstrip().endswith((".", ",")):
        if len({_indent(ln) for ln in lines[1:]}) == 1 and not _MARKER_RE.match(lines[0].lstrip()):
            lines = lines[1:]
    first = lines[0].lstrip()
    marker = _MARKER_RE.match(first)
    hang = _indent(lines[0]) + (marker.end() if marker else 0)
    # continuation lines must line up with the text of the first line (hanging indent for list items);
    # anything else (deeper or ragged indentation) is code, a grammar, or a nested structure
    if any(_indent(ln) != hang for ln in lines[1:]):
        return None
    par = " ".join(ln.strip() for ln in lines)
    if marker:
        par = par[marker.end():]
    par = _strip_markup(par)
    par = re.sub(r"\s+", " ", par).strip()
    if par.endswith("::"):
        par = par[:-1]
    if not _is_prose(par):
        return None
    return "- " + par if marker else par


def _pack_paragraphs(pars: list[str], min_chars: int, max_chars: int) -> Iterator[str]:
    cur: list[str] = []
    size = 0
    for par in pars:
        if len(par) > max_chars:
            # a very long paragraph: cut at sentence ends
            sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", par)
            yield from _pack_paragraphs(sentences, min_chars, max_chars) if len(sentences) > 1 else iter(())
            continue
        if cur and size + len(par) + 2 > max_chars:
            if size >= min_chars:
                yield "\n\n".join(cur)
            cur, size = [], 0
        cur.append(par)
        size += len(par) + (2 if len(cur) > 1 else 0)
    if cur and size >= min_chars:
        yield "\n\n".join(cur)


def topics_prose() -> list[tuple[str, list[str]]]:
    """``(group, paragraphs)`` for each ``pydoc_data.topics`` entry, sorted by topic name."""
    out = []
    for name in sorted(_PYDOC_TOPICS):
        pars = [p for block in _paragraphs(_PYDOC_TOPICS[name]) if (p := _clean_paragraph(block))]
        if pars:
            out.append((f"topic:{name}", pars))
    return out


def _docstring_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    yield tree
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
            stack.extend(reversed(node.body))


def _docstring_paragraphs(tree: ast.Module) -> list[str]:
    pars: list[str] = []
    for node in _docstring_nodes(tree):
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if not doc or len(doc) < 80:
            continue
        pars.extend(p for block in _paragraphs(doc) if (p := _clean_paragraph(block)))
    return pars


# Parsing the stdlib dominates the build time; what is extracted from a file is small, so keep it per process.
_MATERIAL_CACHE: dict[tuple[str, int, int], tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _file_material(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(code chunks, docstring prose paragraphs)`` of one source file (both empty when it does not parse)."""
    try:
        st = path.stat()
    except OSError:
        return (), ()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _MATERIAL_CACHE:
        source = _read_source(path)
        tree = _parse(source) if source is not None else None
        if tree is None or source is None:
            _MATERIAL_CACHE[key] = ((), ())
        else:
            _MATERIAL_CACHE[key] = (tuple(_code_chunks(source, tree)), tuple(_docstring_paragraphs(tree)))
    return _MATERIAL_CACHE[key]


def docstring_prose(files: list[tuple[str, Path]] | None = None) -> list[tuple[str, list[str]]]:
    """``(group, paragraphs)`` per stdlib file: the prose paragraphs of its docstrings, in source order."""
    out = []
    for rel, path in files if files is not None else stdlib_files():
        pars = list(_file_material(path)[1])
        if pars:
            out.append((f"doc:{rel}", pars))
    return out


def _prose_group_docs(group: str, pars: Iterable[str], seen: set[str]) -> list[Doc]:
    unique = []
    for par in pars:  # the stdlib repeats many docstrings (overloads, aliases, copies)
        if par not in seen:
            seen.add(par)
            unique.append(par)
    return [Doc(text + "\n", "prose", group) for text in _pack_paragraphs(unique, PROSE_MIN_CHARS, PROSE_MAX_CHARS)]


def prose_docs(files: list[tuple[str, Path]] | None = None) -> list[Doc]:
    """All prose documents: docs topics, then stdlib docstrings in file order."""
    docs: list[Doc] = []
    seen: set[str] = set()
    for group, pars in topics_prose() + docstring_prose(files):
        docs.extend(_prose_group_docs(group, pars, seen))
    return docs


# A pool this many times larger than the budget is read before selecting from it.
POOL_MARGIN = 3


def source_pools(
    rng: random.Random,
    max_docs: int | None,
    max_chars: int | None,
    files: list[tuple[str, Path]] | None = None,
) -> dict[str, list[Doc]]:
    """Code and prose pools, read from sources (docs topics and stdlib files) in a seeded order.

    Reading stops once both pools hold ``POOL_MARGIN`` times what the budget needs (``max_docs`` documents or
    ``max_chars`` characters), so a small corpus parses a few dozen files instead of the whole stdlib; with
    no budget everything is read. The choice of sources depends on the seed only, never on timing.
    """
    files = stdlib_files() if files is None else files
    sources: list[tuple[str, Any]] = [(g, pars) for g, pars in topics_prose()]
    sources += [(f"file:{rel}", (rel, path)) for rel, path in files]
    sources.sort(key=lambda x: x[0])
    rng.shuffle(sources)

    def enough(docs: list[Doc]) -> bool:
        if max_docs is not None and len(docs) >= POOL_MARGIN * max_docs:
            return True
        return max_chars is not None and sum(len(d.text) for d in docs) >= POOL_MARGIN * max_chars

    pools: dict[str, list[Doc]] = {"code": [], "prose": []}
    seen_pars: set[str] = set()
    done = {"code": False, "prose": False}
    for name, payload in sources:
        if done["code"] and done["prose"]:
            break
        if name.startswith("topic:"):
            if not done["prose"]:
                pools["prose"].extend(_prose_group_docs(name, payload, seen_pars))
        else:
            rel, path = payload
            chunks, pars = _file_material(path)
            if not done["code"]:
                pools["code"].extend(Doc(text, "code", f"code:{rel}") for text in chunks)
            if not done["prose"]:
                pools["prose"].extend(_prose_group_docs(f"doc:{rel}", pars, seen_pars))
        done = {d: enough(pools[d]) for d in pools}
    return {d: _dedup(pools[d]) for d in pools}


# ------------------------------------------------------------------------------------------------- math domain
_NAMES = (
    "Tom", "Ana", "Sam", "Lena", "Omar", "Mia", "Ravi", "Zoe", "Ben", "Ines", "Kofi", "Yuki", "Leo", "Nora",
    "Max", "Sara", "Ivan", "Ella", "Noah", "Aisha", "Hugo", "Lily", "Jon", "Emma",
)
_SHE = frozenset({"Ana", "Lena", "Mia", "Zoe", "Ines", "Yuki", "Nora", "Sara", "Ella", "Aisha", "Lily", "Emma"})
_ITEMS = (
    ("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("book", "books"), ("cookie", "cookies"),
    ("sticker", "stickers"), ("egg", "eggs"), ("card", "cards"), ("shell", "shells"), ("coin", "coins"),
    ("orange", "oranges"), ("stamp", "stamps"), ("flower", "flowers"), ("toy car", "toy cars"),
)
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("crate", "crates"), ("jar", "jars"))


def _pron(name: str) -> tuple[str, str]:
    return ("She", "her") if name in _SHE else ("He", "his")


def _num(x: Fraction | int | Decimal) -> str:
    """Integers as ``12``, exact fractions as ``3/4``, decimals without trailing zeros."""
    if isinstance(x, Decimal):
        s = format(x.normalize(), "f")
        return s
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _signed(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def m_fact(r: random.Random) -> str:
    op = r.choice("+-*/")
    hi = r.choice((10, 20, 100, 1000, 10000))
    if op == "/":
        b = r.randint(2, 12 if hi <= 100 else 99)
        q = r.randint(1, max(2, hi // b))
        a = b * q
        c = q
    else:
        a, b = r.randint(0, hi), r.randint(0, hi)
        if op == "*":
            a, b = r.randint(0, min(hi, 99)), r.randint(0, 12 if r.random() < 0.5 else min(hi, 999))
        c = a + b if op == "+" else a - b if op == "-" else a * b
    sym = {"+": "+", "-": "-", "*": r.choice(("*", "×")), "/": r.choice(("/", "÷"))}[op]
    style = r.randrange(6)
    if style == 0:
        return f"{a} {sym} {b} = {c}"
    if style == 1:
        return f"What is {a} {sym} {b}? {a} {sym} {b} = {c}."
    if style == 2:
        word = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}[op]
        return f"{a} {word} {b} equals {c}."
    if style == 3:
        noun = {"+": "sum", "-": "difference", "*": "product", "/": "quotient"}[op]
        if op == "-":
            return f"The difference {a} - {b} is {c}."
        return f"The {noun} of {a} and {b} is {c}."
    if style == 4:
        return f"Q: {a} {sym} {b} = ?\nA: {c}"
    return f"Compute {a} {sym} {b}. The answer is {c}."


def _expr(r: random.Random, depth: int) -> tuple[str, Fraction, int]:
    """Random integer expression: ``(text, value, precedence)``; divisions are always exact."""
    if depth == 0 or r.random() < 0.3:
        v = r.randint(1, 20)
        return str(v), Fraction(v), 3
    op = r.choice("+-*/" if depth > 1 else "+-*")
    left, lv, lp = _expr(r, depth - 1)
    if op == "/":
        divs = [d for d in range(2, 13) if lv.denominator == 1 and lv.numerator % d == 0]
        if not divs or lv == 0:
            op = "*"
        else:
            d = r.choice(divs)
            right, rv, rp = str(d), Fraction(d), 3
    if op != "/":
        right, rv, rp = _expr(r, depth - 1)
    prec = 1 if op in "+-" else 2
    if lp < prec:
        left = f"({left})"
    if rp < prec or (rp == prec and op in "-/"):
        right = f"({right})"
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv if op == "*" else lv / rv
    return f"{left} {op} {right}", value, prec


def m_precedence(r: random.Random) -> str:
    for _ in range(20):
        text, value, _p = _expr(r, r.randint(2, 3))
        if value.denominator == 1 and abs(value) < 100000 and any(o in text for o in "+-*/"):
            break
    if r.random() < 0.5:
        return f"{text} = {_num(value)}"
    return f"Evaluate {text}. Following the order of operations, {text} = {_num(value)}."


def m_times_table(r: random.Random) -> str:
    n = r.randint(2, 19)
    top = r.choice((10, 12))
    sym = r.choice(("×", "*", "x"))
    if sym == "x":
        rows = [f"{n} times {k} is {n * k}." for k in range(1, top + 1)]
    else:
        rows = [f"{n} {sym} {k} = {n * k}" for k in range(1, top + 1)]
    return f"Multiplication table of {n}:\n" + "\n".join(rows)


def m_column_add(r: random.Random) -> str:
    a, b = r.randint(11, 99), r.randint(11, 99)
    ta, oa, tb, ob = a // 10 * 10, a % 10, b // 10 * 10, b % 10
    if r.random() < 0.5:
        return (
            f"To add {a} + {b}, add the tens: {ta} + {tb} = {ta + tb}. Then add the ones: {oa} + {ob} = {oa + ob}. "
            f"Finally {ta + tb} + {oa + ob} = {a + b}. So {a} + {b} = {a + b}."
        )
    a, b = max(a, b) + r.randint(0, 50), min(a, b)
    tb, ob = b // 10 * 10, b % 10
    return (
        f"To subtract {b} from {a}, first subtract the tens: {a} - {tb} = {a - tb}. Then subtract the ones: "
        f"{a - tb} - {ob} = {a - b}. So {a} - {b} = {a - b}."
    )


def m_negative(r: random.Random) -> str:
    a, b = r.randint(-50, 50), r.randint(-50, 50)
    op = r.choice("+-*")
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{_signed(a) if r.random() < 0.5 else a} {op} {_signed(b)} = {c}"


def m_word(r: random.Random) -> str:
    name = r.choice(_NAMES)
    he, his = _pron(name)
    item, items = r.choice(_ITEMS)
    kind = r.randrange(8)
    if kind == 0:
        cont, conts = r.choice(_CONTAINERS)
        n, per = r.randint(2, 9), r.randint(3, 15)
        give = r.randint(1, n * per - 1)
        return (
            f"{name} has {n} {conts} of {per} {items}. {he} gives away {give}. "
            f"{he} has {n * per - give} {items} left, because {n} * {per} = {n * per} and {n * per} - {give} = "
            f"{n * per - give}."
        )
    if kind == 1:
        k, price = r.randint(2, 9), r.randint(1, 12)
        cost = k * price
        paid = r.choice([p for p in (5, 10, 20, 50, 100) if p >= cost] or [cost + 10])
        if paid < cost:
            paid = cost
        return (
            f"{name} buys {k} {items} at {price} dollars each and pays with {paid} dollars. "
            f"The {items} cost {k} * {price} = {cost} dollars, so {he.lower()} gets {paid - cost} dollars in change."
        )
    if kind == 2:
        speed, hours = r.choice((4, 5, 12, 15, 30, 40, 45, 50, 60, 80, 90, 100)), r.randint(2, 9)
        vehicle = r.choice(("A train", "A car", "A cyclist", "A bus", "A boat"))
        return (
            f"{vehicle} travels at {speed} km per hour for {hours} hours. "
            f"It covers {speed} × {hours} = {speed * hours} km."
        )
    if kind == 3:
        kids, each = r.randint(2, 12), r.randint(2, 12)
        total = kids * each
        return (
            f"{total} {items} are shared equally among {kids} children. Each child gets {total} / {kids} = {each} "
            f"{items if each != 1 else item}."
        )
    if kind == 4:
        age, diff, later = r.randint(3, 40), r.randint(1, 15), r.randint(1, 20)
        sib = r.choice(("sister", "brother", "cousin"))
        return (
            f"{name} is {age} years old. {his.capitalize()} {sib} is {diff} years older. "
            f"In {later} years the {sib} will be {age} + {diff} + {later} = {age + diff + later} years old."
        )
    if kind == 5:
        pages, per, days = r.randint(100, 500), r.randint(10, 40), r.randint(2, 7)
        read = per * days
        if read >= pages:
            pages = read + r.randint(10, 100)
        return (
            f"A book has {pages} pages. {name} reads {per} pages a day for {days} days. {he} has read "
            f"{per} * {days} = {read} pages, so {pages} - {read} = {pages - read} pages are left."
        )
    if kind == 6:
        a, b, c = r.randint(5, 60), r.randint(5, 60), r.randint(1, 30)
        return (
            f"{name} collects {a} {items} on Monday and {b} on Tuesday, then loses {min(c, a + b)}. "
            f"{he} now has {a} + {b} - {min(c, a + b)} = {a + b - min(c, a + b)} {items}."
        )
    rows, cols = r.randint(2, 15), r.randint(2, 15)
    plants = r.choice(("plants", "trees", "flowers"))
    return (
        f"A garden has {rows} rows with {cols} {plants} in each row. "
        f"There are {rows} × {cols} = {rows * cols} {plants} in total."
    )


def _frac(r: random.Random, maxden: int = 12) -> Fraction:
    """A proper or improper fraction in lowest terms that is not a whole number."""
    while True:
        den = r.randint(2, maxden)
        f = Fraction(r.randint(1, den * 2 - 1), den)
        if f.denominator != 1:
            return f


def m_fraction(r: random.Random) -> str:
    kind = r.randrange(5)
    a, b = _frac(r), _frac(r)
    fa = f"{a.numerator}/{a.denominator}"
    fb = f"{b.numerator}/{b.denominator}"
    if kind == 0:
        return f"{fa} + {fb} = {_num(a + b)}"
    if kind == 1:
        return f"{fa} - {fb} = {_num(a - b)}"
    if kind == 2:
        return f"{fa} * {fb} = {_num(a * b)}"
    if kind == 3:
        k = r.randint(2, 9)
        num, den = r.randint(1, 11), r.randint(2, 12)
        g = math.gcd(num, den)
        return (
            f"Simplify {num * k}/{den * k}. Divide the top and the bottom by {k * g}: "
            f"{num * k}/{den * k} = {_num(Fraction(num, den))}."
        )
    den = r.randint(2, 10)
    num = r.choice([k for k in range(1, den) if math.gcd(k, den) == 1])
    whole = den * r.randint(1, 12)
    return f"{num}/{den} of {whole} is {whole * num // den}, because {whole} / {den} * {num} = {whole * num // den}."


def m_decimal(r: random.Random) -> str:
    a = Decimal(r.randint(1, 9999)) / Decimal(r.choice((10, 100)))
    b = Decimal(r.randint(1, 9999)) / Decimal(r.choice((10, 100)))
    op = r.choice("+-*")
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{_num(a)} {op} {_num(b)} = {_num(c)}"


def m_equation(r: random.Random) -> str:
    var = r.choice("xxxyna")
    x = r.randint(-12, 20)
    a = r.choice([k for k in range(-9, 13) if k not in (-1, 0, 1)])
    b = r.randint(1, 30)
    kind = r.randrange(3)
    if kind == 0:
        c = a * x + b
        return (
            f"Solve for {var}: {a}{var} + {b} = {c}. Subtract {b} from both sides: {a}{var} = {c - b}. "
            f"Divide both sides by {a}: {var} = {x}. So {var} = {x}."
        )
    if kind == 1:
        c = a * x - b
        return (
            f"Solve for {var}: {a}{var} - {b} = {c}. Add {b} to both sides: {a}{var} = {c + b}. "
            f"Divide both sides by {a}: {var} = {x}. So {var} = {x}."
        )
    c = a * (x + b)
    return (
        f"Solve for {var}: {a}({var} + {b}) = {c}. Divide both sides by {a}: {var} + {b} = {x + b}. "
        f"Subtract {b}: {var} = {x}. So {var} = {x}."
    )


def m_percent(r: random.Random) -> str:
    p = r.choice((5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90, 100, 150, 200))
    base = 100 // math.gcd(p, 100)
    n = base * r.randint(1, 40)
    v = p * n // 100
    if r.random() < 0.5:
        return f"{p}% of {n} is {v}, because {n} * {p} / 100 = {v}."
    name = r.choice(_NAMES)
    he, _ = _pron(name)
    if p >= 100:
        p, v = 20, n * 20 // 100
    return (
        f"A jacket costs {n} dollars and is on sale for {p}% off. The discount is {n} * {p} / 100 = {v} dollars, "
        f"so {name} pays {n} - {v} = {n - v} dollars."
    )


def m_power(r: random.Random) -> str:
    kind = r.randrange(4)
    if kind == 0:
        n = r.randint(2, 30)
        return f"{n} squared is {n * n}, and {n}^2 = {n * n}."
    if kind == 1:
        n = r.randint(1, 30)
        return f"The square root of {n * n} is {n}, because {n} * {n} = {n * n}."
    if kind == 2:
        base, e = r.choice(((2, r.randint(0, 16)), (3, r.randint(0, 8)), (10, r.randint(0, 6)), (5, r.randint(0, 5))))
        return f"{base}^{e} = {base ** e}"
    n = r.randint(2, 12)
    return f"{n} cubed is {n ** 3}, and {n}^3 = {n ** 3}."


def _factorize(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def m_number_theory(r: random.Random) -> str:
    kind = r.randrange(4)
    if kind == 0:
        g = r.randint(1, 15)
        a, b = g * r.randint(1, 12), g * r.randint(1, 12)
        return f"The greatest common divisor of {a} and {b} is {math.gcd(a, b)}."
    if kind == 1:
        a, b = r.randint(2, 30), r.randint(2, 30)
        return f"The least common multiple of {a} and {b} is {a * b // math.gcd(a, b)}."
    if kind == 2:
        n = r.randint(4, 999)
        fs = _factorize(n)
        if len(fs) == 1:
            return f"{n} is a prime number: its only divisors are 1 and {n}."
        return f"The prime factorization of {n} is {' × '.join(map(str, fs))}, since {' * '.join(map(str, fs))} = {n}."
    a, b = r.randint(10, 500), r.randint(2, 12)
    q, rem = divmod(a, b)
    return f"{a} divided by {b} is {q} with remainder {rem}, because {b} * {q} + {rem} = {a}."


def m_sequence(r: random.Random) -> str:
    if r.random() < 0.6:
        start, step = r.randint(-20, 50), r.choice([s for s in range(-9, 13) if s != 0])
        seq = [start + step * i for i in range(5)]
        nxt = start + step * 5
        return f"The next number in {', '.join(map(str, seq))} is {nxt}, because each term adds {step}."
    start, ratio = r.randint(1, 5), r.choice((2, 3))
    seq = [start * ratio**i for i in range(5)]
    return (
        f"The next number in {', '.join(map(str, seq))} is {start * ratio**5}, "
        f"because each term is multiplied by {ratio}."
    )


def m_mean(r: random.Random) -> str:
    k = r.randint(3, 6)
    mean = r.randint(2, 60)
    vals = [r.randint(0, 2 * mean) for _ in range(k - 1)]
    last = mean * k - sum(vals)
    if last < 0:
        vals = [mean] * (k - 1)
        last = mean
    vals.append(last)
    return (
        f"The mean of {', '.join(map(str, vals))} is {mean}: their sum is {' + '.join(map(str, vals))} = {sum(vals)}, "
        f"and {sum(vals)} / {k} = {mean}."
    )


def m_units(r: random.Random) -> str:
    kind = r.randrange(5)
    n = r.randint(2, 48)
    if kind == 0:
        return f"{n} hours is {n * 60} minutes, because {n} * 60 = {n * 60}."
    if kind == 1:
        return f"{n} kilometres is {n * 1000} metres, because {n} * 1000 = {n * 1000}."
    if kind == 2:
        return f"{n} minutes is {n * 60} seconds, because {n} * 60 = {n * 60}."
    if kind == 3:
        return f"{n} weeks is {n * 7} days, because {n} * 7 = {n * 7}."
    return f"{n * 100} centimetres is {n} metres, because {n * 100} / 100 = {n}."


def m_compare(r: random.Random) -> str:
    a, b = _frac(r, 9), _frac(r, 9)
    while a == b:
        b = _frac(r, 9)
    d = a.denominator * b.denominator // math.gcd(a.denominator, b.denominator)
    na, nb = a.numerator * d // a.denominator, b.numerator * d // b.denominator
    bigger = _num(a) if a > b else _num(b)
    return (
        f"Which is larger, {_num(a)} or {_num(b)}? Write both over {d}: {_num(a)} = {na}/{d} and "
        f"{_num(b)} = {nb}/{d}, so {bigger} is larger."
    )


MATH_TEMPLATES: dict[str, Callable[[random.Random], str]] = {
    "fact": m_fact, "precedence": m_precedence, "column": m_column_add, "negative": m_negative, "word": m_word,
    "fraction": m_fraction, "decimal": m_decimal, "equation": m_equation, "percent": m_percent, "power": m_power,
    "number_theory": m_number_theory, "sequence": m_sequence, "mean": m_mean, "units": m_units,
    "compare": m_compare,
}
_HEADERS = {
    "fact": ("Arithmetic practice.", "Basic facts:", "Warm-up exercises."),
    "precedence": (
        "Order of operations: multiply and divide before adding and subtracting.", "Evaluate each expression.",
    ),
    "column": ("Adding and subtracting two-digit numbers step by step.",),
    "negative": ("Integers: adding, subtracting and multiplying negative numbers.",),
    "word": ("Word problems.", "Story problems with worked answers."),
    "fraction": ("Fractions.", "Working with fractions: answers are in lowest terms."),
    "decimal": ("Decimal arithmetic.",),
    "equation": ("Linear equations.", "Solve each equation step by step."),
    "percent": ("Percentages.",),
    "power": ("Squares, cubes and powers.",),
    "number_theory": ("Divisibility, primes and factors.",),
    "sequence": ("Number patterns.",),
    "mean": ("Averages.",),
    "units": ("Unit conversions.",),
    "compare": ("Comparing fractions.",),
}

_MIXED_HEADERS = ("Mixed practice.", "Exercises with worked answers.", "Math review.", "Practice problems.")


def math_doc(r: random.Random) -> str:
    """One math document: a header then problems of one to three kinds, at most MATH_MAX_CHARS long."""
    names = sorted(MATH_TEMPLATES)
    if r.random() < 0.08:
        return "\n\n".join(m_times_table(r) for _ in range(r.randint(3, 5))) + "\n"
    kinds = r.sample(names, r.randint(1, 3))
    if r.random() < 0.3:
        lines = []
    elif len(kinds) == 1:
        lines = [r.choice(_HEADERS[kinds[0]])]
    else:
        lines = [r.choice(_MIXED_HEADERS)]
    sep = "\n" if r.random() < 0.6 else "\n\n"
    size = len(sep.join(lines)) + 1
    target = r.randint(MATH_MIN_CHARS, MATH_MAX_CHARS - 100)
    while size < target:
        item = MATH_TEMPLATES[r.choice(kinds)](r)
        grown = size + len(item) + (len(sep) if lines else 0)
        if grown > MATH_MAX_CHARS:
            break
        lines.append(item)
        size = grown
    return sep.join(lines) + "\n"


def math_docs(rng: random.Random, n_docs: int | None, n_chars: int | None) -> list[Doc]:
    docs: list[Doc] = []
    seen: set[str] = set()
    size = 0
    while (n_docs is None or len(docs) < n_docs) and (n_chars is None or size < n_chars):
        text = math_doc(rng)
        if text in seen:
            continue
        seen.add(text)
        docs.append(Doc(text, "math", f"math:{len(docs)}"))
        size += len(text)
    return docs


# -------------------------------------------------------------------------------------------- select and split
def _dedup(docs: list[Doc]) -> list[Doc]:
    seen: set[str] = set()
    out = []
    for d in docs:
        key = re.sub(r"\s+", " ", d.text).strip()
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _select(docs: list[Doc], rng: random.Random, max_docs: int | None, max_chars: int | None) -> list[Doc]:
    """A seeded random subset (in shuffled order) within the doc / char budgets."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    out, size = [], 0
    for i in order:
        if max_docs is not None and len(out) >= max_docs:
            break
        if max_chars is not None and size >= max_chars:
            break
        out.append(docs[i])
        size += len(docs[i].text)
    return out


def _split(docs: list[Doc], rng: random.Random, val_fraction: float, test_fraction: float) -> dict[str, list[Doc]]:
    """Group-wise split: whole groups go to test, then val, until each has its share (at least one doc)."""
    groups: dict[str, list[Doc]] = {}
    for d in docs:
        groups.setdefault(d.group, []).append(d)
    names = sorted(groups)
    rng.shuffle(names)
    n = len(docs)
    want = {
        "test": max(1, round(test_fraction * n)) if test_fraction > 0 else 0,
        "val": max(1, round(val_fraction * n)) if val_fraction > 0 else 0,
    }
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    it = iter(names)
    for split in ("test", "val"):
        while len(out[split]) < want[split]:
            name = next(it, None)
            if name is None:
                break
            # never hand a held-out split a group that is much bigger than what it still needs, unless it is empty
            if out[split] and len(groups[name]) > 2 * (want[split] - len(out[split])) + 2:
                out["train"].extend(groups[name])
                continue
            out[split].extend(groups[name])
    for name in it:
        out["train"].extend(groups[name])
    return out


def _write_jsonl_atomic(path: Path, rows: list[dict[str, str]]) -> tuple[int, str]:
    """Write ``rows`` as JSON lines, all or nothing; returns the file's size and sha256."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return len(data), hashlib.sha256(data).hexdigest()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_corpus(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_docs_per_domain: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    chars_per_domain: int | None = DEFAULT_CHARS_PER_DOMAIN,
) -> dict[str, Any]:
    """Build the corpus into ``out_dir`` (``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``stats.json``).

    Each domain gets at most ``max_docs_per_domain`` documents and about ``chars_per_domain`` characters
    (``None``: no limit; math is generated until it matches the smaller of the code / prose sizes then).
    Returns the stats: docs / chars / bytes per split and domain, file sizes and sha256.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # one independent stream per purpose, so e.g. changing the code filter does not reshuffle math
    def rng(tag: str) -> random.Random:
        return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:8], "big"))

    pools = source_pools(rng("sources"), max_docs_per_domain, chars_per_domain)
    selected = {d: _select(pools[d], rng(f"select:{d}"), max_docs_per_domain, chars_per_domain) for d in pools}
    if chars_per_domain is None:
        math_chars = min(sum(len(x.text) for x in selected[d]) for d in selected)
    else:
        math_chars = chars_per_domain
    selected["math"] = _dedup(math_docs(rng("math"), max_docs_per_domain, math_chars))

    splits: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for domain in DOMAINS:
        parts = _split(selected[domain], rng(f"split:{domain}"), val_fraction, test_fraction)
        for s in SPLITS:
            splits[s].extend(parts[s])

    stats: dict[str, Any] = {
        "seed": seed,
        "python": sys.version.split()[0],
        "max_docs_per_domain": max_docs_per_domain,
        "chars_per_domain": chars_per_domain,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "pool_docs": {d: len(pools[d]) for d in pools},
        "splits": {},
        "files": {},
    }
    for s in SPLITS:
        rows = [{"text": d.text, "domain": d.domain} for d in splits[s]]
        rng(f"order:{s}").shuffle(rows)
        nbytes, digest = _write_jsonl_atomic(out / f"{s}.jsonl", rows)
        per = {}
        for domain in DOMAINS:
            texts = [r["text"] for r in rows if r["domain"] == domain]
            per[domain] = {
                "docs": len(texts),
                "chars": sum(len(t) for t in texts),
                "bytes": sum(len(t.encode("utf-8")) for t in texts),
            }
        per["total"] = {k: sum(per[d][k] for d in DOMAINS) for k in ("docs", "chars", "bytes")}
        stats["splits"][s] = per
        stats["files"][f"{s}.jsonl"] = {"bytes": nbytes, "sha256": digest}
    stats["domains"] = {
        d: {k: sum(stats["splits"][s][d][k] for s in SPLITS) for k in ("docs", "chars", "bytes")} for d in DOMAINS
    }
    stats["total_bytes"] = sum(f["bytes"] for f in stats["files"].values())
    stats["total_mb"] = round(stats["total_bytes"] / 1e6, 3)
    with atomic_write(out / "stats.json", "wb") as fh:
        fh.write((json.dumps(stats, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return stats


def corpus_main(out: str, seed: int = 0, max_docs_per_domain: int | None = None,
                chars_per_domain: int = DEFAULT_CHARS_PER_DOMAIN, val_fraction: float = 0.05,
                test_fraction: float = 0.05) -> dict[str, Any]:
    """Build the tiny multi-domain corpus (code, prose, maths) the embedded teacher is trained on; prints its stats.

    Args:
        out: output folder
        seed: the seed of the shuffle and of the generated maths
        max_docs_per_domain: at most this many documents per domain
        chars_per_domain: characters per domain (0: no limit)
        val_fraction: share of each domain's documents in val.jsonl
        test_fraction: share of each domain's documents in test.jsonl
    """
    return build_corpus(out, seed=seed, max_docs_per_domain=max_docs_per_domain, val_fraction=val_fraction,
                        test_fraction=test_fraction, chars_per_domain=chars_per_domain or None)
