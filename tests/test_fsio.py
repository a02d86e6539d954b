"""All-or-nothing writes (zeda_lightning.fsio): a file or a directory is replaced whole or not at all, nothing is
left beside it, and what is written gets the umask's modes."""

import os
import stat

import pytest

from zeda_lightning.fsio import atomic_dir, atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, umask_022):
    path = tmp_path / "sub" / "results.json"
    with atomic_write(path) as f:
        f.write("first")
    assert path.read_text() == "first" and stat.S_IMODE(path.stat().st_mode) == 0o644
    with pytest.raises(RuntimeError):
        with atomic_write(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_text() == "first" and os.listdir(path.parent) == ["results.json"]
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_write(path, "a"):
            pass


def test_atomic_dir_swaps_in_a_finished_directory_and_keeps_the_old_one_on_failure(tmp_path, umask_022):
    out = tmp_path / "tok"
    with atomic_dir(out) as tmp:
        assert os.path.basename(tmp).startswith(".tok.tmp-")
        os.makedirs(os.path.join(tmp, "nested"))
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            f.write("v1")
    assert (out / "vocab.json").read_text() == "v1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "nested").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "vocab.json").stat().st_mode) == 0o644
    with atomic_dir(out) as tmp:  # a non-empty directory is replaced, the old one moved aside then removed
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            f.write("v2")
    assert (out / "vocab.json").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["tok"]
    for failing in ("body", "check"):
        def refuse():
            raise ValueError("target changed meanwhile")

        with pytest.raises(ValueError):
            with atomic_dir(out, before_swap=refuse if failing == "check" else None) as tmp:
                with open(os.path.join(tmp, "vocab.json"), "w") as f:
                    f.write("v3")
                if failing == "body":
                    raise ValueError("save failed")
        assert (out / "vocab.json").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["tok"], failing
