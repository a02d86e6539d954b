"""The offline corpus: determinism, schema, domains, splits, and correct arithmetic."""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import random
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from zeda_lightning.data import corpus as C

MAX_DOCS = 60
FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A seed-0 build in this process, the same build in a fresh interpreter with another hash seed
    (catches any dependence on set / dict-of-str iteration order), and a seed-1 build."""
    a, b, c = (tmp_path_factory.mktemp(n) for n in ("a", "b", "c"))
    stats_a = C.build_corpus(a, seed=0, max_docs_per_domain=MAX_DOCS)
    repo = Path(C.__file__).resolve().parents[2]
    pythonpath = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-m", "zeda_lightning", "corpus", "--out", str(b), "--seed", "0",
         "--max_docs_per_domain", str(MAX_DOCS)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )
    stats_b = json.loads(proc.stdout)
    stats_c = C.build_corpus(c, seed=1, max_docs_per_domain=MAX_DOCS)
    return {"a": (a, stats_a), "b": (b, stats_b), "c": (c, stats_c)}


def _rows(folder: Path, split: str) -> list[dict]:
    return C.read_jsonl(folder / f"{split}.jsonl")


# --------------------------------------------------------------------------------------- independent checker
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}


def _eval(expr: str) -> Fraction:
    """Exact value of an arithmetic expression (numbers, + - * / ^ × ÷, parentheses) with Fractions."""
    expr = expr.replace("×", "*").replace("÷", "/").replace("^", "**")

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported: {ast.dump(node)}")

    return ev(ast.parse(expr.strip(), mode="eval"))


_RUN = re.compile(r"[-(\d][-\d.()/ +*×÷^=]*[\d)]")


def _equalities(text: str) -> list[str]:
    """Every stand-alone numeric equality ``e1 = e2 [= e3]`` in a text (not parts of algebra like ``3x + 5 = 20``)."""
    out = []
    for m in _RUN.finditer(text):
        run = m.group(0)
        if "=" not in run or run.count("(") != run.count(")"):
            continue
        before = text[: m.start()].rstrip(" ")
        if before and (before[-1].isalnum() or before[-1] in "+-*/×÷^=(."):
            continue
        out.append(run)
    return out


def check_math_text(text: str, counts: dict[str, int]) -> None:
    """Assert every checkable statement of a math document; count what was checked per kind."""

    def ok(kind: str, cond: bool, what: str) -> None:
        assert cond, f"wrong {kind}: {what!r}\nin: {text}"
        counts[kind] = counts.get(kind, 0) + 1

    for eq in _equalities(text):
        sides = [_eval(s) for s in eq.split("=")]
        ok("equality", all(v == sides[0] for v in sides), eq)
    for m in re.finditer(r"Solve for ([a-z]): ([^=]+) = (-?\d+)\..*?So \1 = (-?\d+)\.", text):
        var, lhs, rhs, sol = m.groups()
        lhs = re.sub(r"(\d)([a-z(])", r"\1*\2", lhs).replace(var, f"({sol})")
        ok("equation", _eval(lhs) == int(rhs), m.group(0))
    for m in re.finditer(r"The (sum|product|quotient) of (\d+) and (\d+) is (-?\d+)", text):
        kind, a, b, c = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        val = a + b if kind == "sum" else a * b if kind == "product" else Fraction(a, b)
        ok("words", val == c, m.group(0))
    for m in re.finditer(r"The difference (\d+) - (\d+) is (-?\d+)", text):
        ok("words", int(m.group(1)) - int(m.group(2)) == int(m.group(3)), m.group(0))
    for m in re.finditer(r"(\d+) (plus|minus|times|divided by) (\d+) (?:equals|is) (-?\d+)(?!\d| with)", text):
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        val = a + b if op == "plus" else a - b if op == "minus" else a * b if op == "times" else Fraction(a, b)
        ok("words", val == c, m.group(0))
    for m in re.finditer(r"Q: (.+?) = \?\nA: (-?\d+)", text):
        ok("qa", _eval(m.group(1)) == int(m.group(2)), m.group(0))
    for m in re.finditer(r"Compute (.+?)\. The answer is (-?\d+)\.", text):
        ok("qa", _eval(m.group(1)) == int(m.group(2)), m.group(0))
    for m in re.finditer(r"(\d+) divided by (\d+) is (\d+) with remainder (\d+)", text):
        a, b, q, r = map(int, m.groups())
        ok("remainder", divmod(a, b) == (q, r), m.group(0))
    for m in re.finditer(r"(\d+)% of (\d+) is (\d+)", text):
        p, n, v = map(int, m.groups())
        ok("percent", Fraction(p * n, 100) == v, m.group(0))
    for m in re.finditer(r"(\d+)/(\d+) of (\d+) is (\d+)", text):
        a, b, n, v = map(int, m.groups())
        ok("fraction_of", Fraction(a * n, b) == v, m.group(0))
    for m in re.finditer(r"greatest common divisor of (\d+) and (\d+) is (\d+)", text):
        a, b, g = map(int, m.groups())
        ok("gcd", math.gcd(a, b) == g, m.group(0))
    for m in re.finditer(r"least common multiple of (\d+) and (\d+) is (\d+)", text):
        a, b, lcm = map(int, m.groups())
        ok("lcm", a * b // math.gcd(a, b) == lcm, m.group(0))
    for m in re.finditer(r"prime factorization of (\d+) is ([\d × ]+\d)", text):
        fs = [int(f) for f in m.group(2).split(" × ")]
        ok("factorization", math.prod(fs) == int(m.group(1)) and all(_is_prime(f) for f in fs), m.group(0))
    for m in re.finditer(r"(\d+) is a prime number", text):
        ok("prime", _is_prime(int(m.group(1))), m.group(0))
    for m in re.finditer(r"(\d+) (squared|cubed) is (\d+)", text):
        n, e, v = int(m.group(1)), 2 if m.group(2) == "squared" else 3, int(m.group(3))
        ok("power", n**e == v, m.group(0))
    for m in re.finditer(r"square root of (\d+) is (\d+)", text):
        ok("power", int(m.group(2)) ** 2 == int(m.group(1)), m.group(0))
    for m in re.finditer(r"The next number in ((?:-?\d+, )+-?\d+) is (-?\d+)", text):
        seq = [int(x) for x in m.group(1).split(", ")] + [int(m.group(2))]
        diffs = {b - a for a, b in zip(seq, seq[1:])}
        ratios = {Fraction(b, a) for a, b in zip(seq, seq[1:]) if a}
        ok("sequence", len(diffs) == 1 or len(ratios) == 1, m.group(0))
    for m in re.finditer(r"The mean of ((?:\d+, )+\d+) is (\d+)", text):
        vals = [int(x) for x in m.group(1).split(", ")]
        ok("mean", Fraction(sum(vals), len(vals)) == int(m.group(2)), m.group(0))
    for m in re.finditer(r"(\d+) times (\d+) is (\d+)\.", text):
        ok("table", int(m.group(1)) * int(m.group(2)) == int(m.group(3)), m.group(0))
    story = r"has (\d+) \w+ of (\d+) ([\w ]+?)\. (?:He|She) gives away (\d+)\. (?:He|She) has (\d+) \3 left"
    for m in re.finditer(story, text):
        n, per, _, give, left = m.groups()
        ok("story", int(n) * int(per) - int(give) == int(left), m.group(0))
    for m in re.finditer(r"Which is larger, (\d+/\d+) or (\d+/\d+)\?.*?so (\d+/\d+) is larger", text):
        a, b, big = (Fraction(x) for x in m.groups())
        ok("compare", big == max(a, b), m.group(0))
    for m in re.finditer(r"Simplify (\d+)/(\d+)\. .*?= (\d+)/(\d+)\.", text):
        a, b, c, d = map(int, m.groups())
        ok("simplify", Fraction(a, b) == Fraction(c, d) and math.gcd(c, d) == 1, m.group(0))


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % k for k in range(2, math.isqrt(n) + 1))


# ------------------------------------------------------------------------------------------------------ tests
def test_same_seed_gives_byte_identical_files(built):
    (a, sa), (b, sb), (c, _) = built["a"], built["b"], built["c"]
    for name in FILES + ("stats.json",):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert sa == sb
    # a different seed is a different corpus (selection, math and order all follow the seed)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    # no temp files are left behind by the atomic writes
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES + ("stats.json",))


def test_rows_schema_domains_and_stats(built):
    folder, stats = built["a"]
    totals = {d: 0 for d in C.DOMAINS}
    for split in C.SPLITS:
        raw = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in raw]
        assert rows, split
        for row in rows:
            assert list(row) == ["text", "domain"]
            assert row["domain"] in C.DOMAINS
            assert isinstance(row["text"], str) and row["text"].strip()
        domains = {r["domain"] for r in rows}
        assert domains == set(C.DOMAINS), f"{split} lacks a domain: {domains}"
        for d in C.DOMAINS:
            texts = [r["text"] for r in rows if r["domain"] == d]
            assert stats["splits"][split][d]["docs"] == len(texts)
            assert stats["splits"][split][d]["chars"] == sum(map(len, texts))
            totals[d] += len(texts)
        assert stats["files"][f"{split}.jsonl"]["bytes"] == (folder / f"{split}.jsonl").stat().st_size
    assert totals == {d: MAX_DOCS for d in C.DOMAINS}  # the cap is met exactly, pools are far larger
    assert json.loads((folder / "stats.json").read_text()) == stats
    # held-out splits get roughly their 5 % share
    for d in C.DOMAINS:
        assert 1 <= stats["splits"]["val"][d]["docs"] <= 0.2 * MAX_DOCS
        assert 1 <= stats["splits"]["test"][d]["docs"] <= 0.2 * MAX_DOCS


def test_no_document_is_in_two_splits(built):
    folder, _ = built["a"]
    texts = {s: [r["text"] for r in _rows(folder, s)] for s in C.SPLITS}
    for s in C.SPLITS:
        assert len(texts[s]) == len(set(texts[s])), f"duplicate docs inside {s}"
    train = set(texts["train"])
    assert not train & set(texts["val"])
    assert not train & set(texts["test"])
    assert not set(texts["val"]) & set(texts["test"])


def test_group_split_keeps_sources_together():
    docs = [C.Doc(f"doc {g} {i}", "code", f"code:file{g}.py") for g in range(40) for i in range(1 + g % 4)]
    parts = C._split(docs, random.Random(0), 0.05, 0.05)
    assert sum(len(v) for v in parts.values()) == len(docs)
    where = {}
    for split, ds in parts.items():
        for d in ds:
            assert where.setdefault(d.group, split) == split, f"{d.group} is in two splits"
    assert parts["val"] and parts["test"]


def test_code_docs_are_stdlib_source_chunks(built):
    folder, _ = built["a"]
    code = [r["text"] for s in C.SPLITS for r in _rows(folder, s) if r["domain"] == "code"]
    sources = "\n".join(
        "\n".join(ln.rstrip() for ln in (C._read_source(p) or "").split("\n")) for _, p in C.stdlib_files()
    )
    for text in code:
        assert C.CODE_MIN_CHARS <= len(text) <= C.CODE_MAX_CHARS
        assert text.rstrip("\n") in sources, text[:200]
    # chunks start on statement boundaries: the first line is never a continuation of a wrapped expression
    assert sum(bool(re.match(r"\s*(def |class |@|async def |import |from |#|\"\"\"|[A-Za-z_])", t)) for t in code) \
        >= 0.9 * len(code)
    files = [rel for rel, _ in C.stdlib_files()]
    assert files == sorted(files)
    assert not any(part in C.SKIP_DIRS for rel in files for part in rel.split("/")[:-1])
    assert not any(rel.split("/")[-1].startswith("test_") for rel in files)


def test_prose_docs_are_clean_prose(built):
    folder, _ = built["a"]
    prose = [r["text"] for s in C.SPLITS for r in _rows(folder, s) if r["domain"] == "prose"]
    for text in prose:
        assert C.PROSE_MIN_CHARS <= len(text) <= C.PROSE_MAX_CHARS + 1
        for bad in ("``", ":func:`", ":class:`", ">>>", "::=", "\n    ", "****", "===="):
            assert bad not in text, (bad, text[:300])
        letters = sum(ch.isalpha() or ch.isspace() for ch in text)
        assert letters >= 0.85 * len(text)
    # the docs topics contribute (where this Python ships pydoc_data), and so do the docstrings
    try:
        import pydoc_data.topics  # noqa: F401
    except ImportError:
        pass
    else:
        assert C.topics_prose(), "pydoc_data.topics gave no prose"
    assert C.docstring_prose(C.stdlib_files()[:40]), "stdlib docstrings gave no prose"


def test_clean_paragraph_markup_and_filters():
    clean = C._clean_paragraph
    got = clean([
        "Return the :func:`os.path.join` of the ``head`` and the *tail*, see",
        ":class:`~collections.OrderedDict` for the details of this method.",
    ])
    assert got == ("Return the os.path.join of the head and the tail, see OrderedDict for the details of this "
                   "method.")
    assert clean(["* a bullet item that is written in plain English and is long", "  enough to be kept."]) == \
        "- a bullet item that is written in plain English and is long enough to be kept."
    assert clean(["   def f(x):", "       return x + 1"]) is None  # code block
    assert clean([">>> print('the value of the thing is in the list')"]) is None  # doctest
    assert clean(["   assignment_stmt ::= (target_list \"=\")+ (starred_expression | yield_expression)"]) is None
    assert clean(["Assignment statements", "*********************"]) is None  # heading
    assert clean([":param x: the value that is used to compute the result of the call"]) is None  # field list
    assert clean(["x = 1; y = 2; z = x + y; print(z); return z if z else None"]) is None


def test_math_rows_are_correct(built):
    counts: dict[str, int] = {}
    folder, _ = built["a"]
    math_rows = [r["text"] for s in C.SPLITS for r in _rows(folder, s) if r["domain"] == "math"]
    assert len(math_rows) == MAX_DOCS
    for text in math_rows:
        check_math_text(text, counts)
    assert counts.get("equality", 0) > 100
    # a wider sample of the generator covers every template and every check
    extra = C.math_docs(random.Random(12345), 500, None)
    for doc in extra:
        assert C.MATH_MIN_CHARS // 2 <= len(doc.text) <= C.MATH_MAX_CHARS
        check_math_text(doc.text, counts)
    for kind in ("equality", "equation", "words", "qa", "remainder", "percent", "fraction_of", "gcd", "lcm",
                 "factorization", "prime", "power", "sequence", "mean", "table", "story", "compare", "simplify"):
        assert counts.get(kind, 0) >= 5, (kind, counts)
    assert counts["equality"] > 3000


def test_checker_rejects_wrong_arithmetic():
    counts: dict[str, int] = {}
    check_math_text("12 + 35 = 47", counts)
    for bad in ("12 + 35 = 48", "Solve for x: 3x + 5 = 20. So x = 4.", "The product of 6 and 7 is 43.",
                "1/2 + 1/3 = 2/5", "2^10 = 1000", "17 divided by 5 is 3 with remainder 1"):
        with pytest.raises(AssertionError):
            check_math_text(bad, counts)


def test_math_generator_is_seeded():
    a = [d.text for d in C.math_docs(random.Random(7), 20, None)]
    b = [d.text for d in C.math_docs(random.Random(7), 20, None)]
    c = [d.text for d in C.math_docs(random.Random(8), 20, None)]
    assert a == b and a != c
    assert len(set(a)) == len(a)


def test_domains_are_balanced_by_chars(tmp_path):
    stats = C.build_corpus(tmp_path, seed=3, max_docs_per_domain=None, chars_per_domain=60_000)
    chars = {d: stats["domains"][d]["chars"] for d in C.DOMAINS}
    for d in C.DOMAINS:
        assert 60_000 <= chars[d] <= 60_000 + C.CODE_MAX_CHARS + C.PROSE_MAX_CHARS, chars


def test_cli_prints_stats(tmp_path, capsys):
    from zeda_lightning.cli import main

    main(["corpus", "--out", str(tmp_path), "--seed", "0", "--max_docs_per_domain", "12"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["domains"]["math"]["docs"] == 12
    assert stats["total_bytes"] == sum((tmp_path / f).stat().st_size for f in FILES)


def test_bad_fractions_raise(tmp_path):
    with pytest.raises(ValueError):
        C.build_corpus(tmp_path, val_fraction=0.6, test_fraction=0.5)
