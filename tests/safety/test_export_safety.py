"""Export safety from the user's side: overwrite only replaces our own exports, never protected paths or the working
directory; kills leave a recoverable state; leftovers are cleaned without touching anything unmarked; permissions
follow the umask; read-only targets and truncated weights are refused up front with a clear ValueError."""

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from zeda_lightning import ZeroExperts, inject
from zeda_lightning.export import (
    check_export_target,
    check_model_dir,
    export_model,
    from_pretrained,
    is_zeda_export,
    recover_export,
)
from zeda_lightning.tiny import tiny_model
from tests.helpers import single_thread  # noqa: F401  (autouse: one intra-op thread)

REPO = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))


def _model(seed=0):
    torch.manual_seed(seed)
    return inject(tiny_model("qwen3_moe"), ZeroExperts(seed=seed))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` (hidden ones too) with its bytes (files) or None (directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _killed_in_child(fn) -> int:
    """Run ``fn`` in a forked child that ``fn`` ends with ``os._exit`` (a kill: no cleanup handler runs)."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            fn()
            code = 0
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_overwrite_refuses_a_directory_that_is_not_a_zeda_export(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    with pytest.raises(ValueError, match=r"not an export written by zeda_lightning \(no zeda_export.json\).*"
                                         r"choose another export_dir or remove it by hand"):
        export_model(_model(), str(out), overwrite=True)
    assert (out / "thesis.tex").read_text() == "three years of work"
    assert sorted(os.listdir(tmp_path)) == ["results"]  # nothing written next to it either


def test_protected_paths_and_the_working_directory_are_never_replaced(tmp_path, monkeypatch):
    model = _model()
    zoo = tmp_path / "zoo"
    teacher = export_model(model, str(zoo / "teacher"))  # a marked export: the marker alone must not suffice
    shutil.copy(zoo / "teacher" / "zeda_export.json", zoo / "zeda_export.json")  # the parent looks marked too
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"{teacher} is or contains {teacher}.*choose another export_dir"):
        export_model(model, teacher, overwrite=True, protected=[teacher])
    with pytest.raises(ValueError, match=f"{zoo} is or contains {teacher}"):
        export_model(model, str(zoo), overwrite=True, protected=[None, teacher])
    assert _snapshot(tmp_path) == before
    with pytest.raises(ValueError, match="is or contains"):  # compared by real path, through a symlink
        os.symlink(zoo, tmp_path / "link")
        check_export_target(str(zoo), True, protected=[str(tmp_path / "link" / "teacher")])
    os.remove(tmp_path / "link")
    # the working directory, or a parent of it
    (zoo / "teacher" / "sub").mkdir()
    before = _snapshot(tmp_path)
    monkeypatch.chdir(zoo / "teacher")
    with pytest.raises(ValueError, match="is the current working directory .* or a parent of it"):
        export_model(model, ".", overwrite=True)
    monkeypatch.chdir(zoo / "teacher" / "sub")
    with pytest.raises(ValueError, match="is the current working directory .* or a parent of it"):
        export_model(model, teacher, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_replacing_a_marked_export_works_and_the_new_one_loads(tmp_path):
    out = tmp_path / "m"
    export_model(_model(0), str(out))
    assert is_zeda_export(out)
    marker = json.loads((out / "zeda_export.json").read_text())
    assert marker["format"] == "zeda_lightning export" and marker["version"] == 1 and marker["pid"] == os.getpid()
    new = _model(1)
    export_model(new, str(out), overwrite=True)
    assert torch.equal(_logits(from_pretrained(str(out))), _logits(new))
    assert is_zeda_export(out) and not (out / ".zeda_export_incomplete").exists()
    assert os.listdir(tmp_path) == ["m"]  # no .tmp-/.old- siblings left
    # the shipped teacher is a marked export, so configs/teacher/pretrain.yaml (export_overwrite) may replace it
    assert is_zeda_export(REPO / "assets" / "tiny_teacher")
    check_export_target(str(REPO / "assets" / "tiny_teacher"), True)


def test_interrupted_export_leftovers_are_cleaned_and_unmarked_lookalikes_kept(tmp_path):
    model = _model()
    out = tmp_path / "m"
    # a hidden directory of the user's with the same prefixes: never ours, never deleted
    for name in (".m.tmp-mine", ".m.old-mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")

    def killed_while_saving():
        def save_then_die(path, **kwargs):
            Path(path, "config.json").write_text("{}")
            os._exit(9)
        model.save_pretrained = save_then_die
        export_model(model, str(out))

    assert _killed_in_child(killed_while_saving) == 9
    leftovers = sorted(set(os.listdir(tmp_path)) - {".m.tmp-mine", ".m.old-mine"})
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.tmp-")  # what a kill leaves
    export_model(model, str(out))
    assert sorted(os.listdir(tmp_path)) == [".m.old-mine", ".m.tmp-mine", "m"]
    assert (tmp_path / ".m.tmp-mine" / "keep.txt").read_text() == "mine"
    assert recover_export(str(out)) == []


def test_kill_between_the_renames_of_an_overwrite_keeps_the_old_export(tmp_path):
    first, second = _model(0), _model(1)
    out = tmp_path / "m"
    export_model(first, str(out))
    ref = _logits(first)
    (tmp_path / ".m.old-mine").mkdir()  # unmarked lookalike

    def killed_between_renames():
        real, calls = os.replace, []

        def replace(src, dst, *a, **k):
            calls.append(src)
            if os.path.basename(os.fspath(src)).startswith(".m.tmp-"):  # the new export moving in
                os._exit(9)
            return real(src, dst, *a, **k)
        os.replace = replace
        os.rename = replace
        export_model(second, str(out), overwrite=True)

    assert _killed_in_child(killed_between_renames) == 9
    assert not out.exists()  # the state the kill left: the old export hidden aside
    names = set(os.listdir(tmp_path))
    assert any(n.startswith(".m.old-") and n != ".m.old-mine" for n in names)
    assert any(n.startswith(".m.tmp-") for n in names)
    with pytest.raises(ValueError, match="interrupted overwrite left its previous export.*pass overwrite=True"):
        check_export_target(str(out), False)  # the old export counts as there: refused up front, not after training
    loaded = from_pretrained(str(out))  # recovers the old export
    assert torch.equal(_logits(loaded), ref)
    assert sorted(os.listdir(tmp_path)) == [".m.old-mine", "m"]


def test_export_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = export_model(_model(), str(tmp_path / "m"))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(out).iterdir()}
    assert "model.safetensors" in modes and "zeda_export.json" in modes
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def _can_create_in(directory) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _unwritable_dir(tmp_path) -> str:
    """A directory this process cannot create files in: chmod 0555, or as root (who ignores modes, and for whom
    os.access says yes) /sys, which refuses new files even to root."""
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if not _can_create_in(ro):
        return str(ro)
    if os.path.isdir("/sys") and not _can_create_in("/sys"):
        return "/sys"
    pytest.skip("no directory here that this user cannot write to")


def test_read_only_target_is_refused_before_anything_is_written(tmp_path):
    ro = _unwritable_dir(tmp_path)
    try:
        for out in (os.path.join(ro, "m"), os.path.join(ro, "deeper", "m")):
            with pytest.raises(ValueError, match=f"directory {ro} is not writable"):
                check_export_target(out, False)
            with pytest.raises(ValueError, match=f"directory {ro} is not writable"):
                export_model(_model(), out)
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert os.listdir(tmp_path / "ro") == []


def test_truncated_or_corrupt_safetensors_is_refused_before_loading(tmp_path, monkeypatch):
    out = Path(export_model(_model(), str(tmp_path / "m")))
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    import transformers

    def no_load(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    for broken in (data[: len(data) // 2], data[:5], b"\xff" * 8 + data[8:], data[:8] + b"not json" + data[16:]):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=f"{weights} is truncated or corrupt.*re-download or re-export it"):
            check_model_dir(str(out))
        with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt"):
            from_pretrained(str(out))
