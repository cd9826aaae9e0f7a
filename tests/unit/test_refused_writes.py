"""A write the file system refuses (read-only, full) is one error line naming the path and the fix, and leaves
nothing that looks complete: prepare's output, the built-in corpus and index caches, convert's output
directory, eval --output. The refusals are simulated (OSError with the errno a read-only or full file
system gives), so the tests need no mount and no root."""

import errno
import json
from pathlib import Path

import pytest

from llmtrain import checkpoint_format as fmt
from llmtrain import fsio
from llmtrain.data import builtin
from llmtrain.data.blend import _single_process_guard
from llmtrain.data.indexed import IndexedWriter
from llmtrain.data.pipeline import PrepareOptions, prepare
from llmtrain.errors import UserError

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


class CheckpointException(BaseException):
    """As torch.distributed.checkpoint's: a BaseException whose text holds the ranks' errors."""


def write_jsonl(path: Path, n: int = 300) -> Path:
    path.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(n)))
    return path


def run_prepare(src, out, **kw):
    opts = PrepareOptions([str(src)], "builtin", str(out), progress=False, workers=-1, **kw)
    return prepare(opts, log=lambda m: None)


# ---- fsio ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError(errno.EROFS, "Read-only file system", "/out/x.lock"), "Read-only file system"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device ("),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded ("),
        # safetensors (Rust) says it in words only
        (
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
            "No space",
        ),
        # a Megatron dist checkpoint: torch.save's short write, wrapped by torch.distributed.checkpoint
        (CheckpointException("RuntimeError: Worker failure: unexpected pos 704 vs 598"), "No space"),
        (CheckpointException("OSError: [Errno 30] Read-only file system: '/out/x'"), "Read-only file system"),
    ],
)
def test_a_refused_write_is_one_line_with_path_reason_and_fix(tmp_path, exc, reason):
    with pytest.raises(fsio.CannotWrite) as e, fsio.writing(tmp_path / "out", "choose another output"):
        raise exc
    message = str(e.value)
    assert (
        message.startswith("cannot write ")
        and reason in message
        and message.endswith("; choose another output")
    )
    assert "\n" not in message


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(KeyboardInterrupt), fsio.writing(tmp_path / "out", "fix"):
        raise KeyboardInterrupt
    with pytest.raises(CheckpointException), fsio.writing(tmp_path / "out", "fix"):
        raise CheckpointException("RuntimeError: shape mismatch")
    with pytest.raises(FileNotFoundError), fsio.writing(tmp_path / "out", "fix"):
        raise FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "in.jsonl"))
    # no permission to read an input elsewhere is not about the output
    with pytest.raises(PermissionError), fsio.writing(tmp_path / "out", "fix"):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/in.jsonl")
    denied = r"cannot write .*out\.lock: Permission denied"
    with pytest.raises(fsio.CannotWrite, match=denied), fsio.writing(tmp_path / "out", "fix"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out.lock"))


# ---- prepare ---------------------------------------------------------------------------------------------
def test_prepare_on_a_full_disk_keeps_its_work_unpublished_and_resumes(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl")
    expected = run_prepare(src, tmp_path / "ref")
    out = tmp_path / "out"
    writes = []

    def write_then_fill_up(self, tokens, lengths):
        writes.append(1)
        if len(writes) > 2:
            self._bin.write(b"\0" * 3)  # a partial write, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        original_write(self, tokens, lengths)

    original_write = IndexedWriter.write
    monkeypatch.setattr(IndexedWriter, "write", write_then_fill_up)
    with pytest.raises(UserError) as e:
        run_prepare(src, out, batch_mb=0.002, commit_mb=0.001)
    message = str(e.value)
    assert message.startswith(f"cannot write {out}: No space left on device (") and "MB free)" in message
    assert "free space and rerun the same command (it resumes from its last commit)" in message
    # nothing looks complete; the committed work is kept for the rerun
    assert not Path(f"{out}.idx").exists() and not Path(f"{out}.bin").exists()
    assert not Path(f"{out}.lock").exists() and Path(f"{out}.partial/state.json").is_file()

    monkeypatch.setattr(IndexedWriter, "write", original_write)
    assert run_prepare(src, out, batch_mb=0.002)["tokens"] == expected["tokens"]
    assert Path(f"{out}.bin").read_bytes() == Path(tmp_path / "ref.bin").read_bytes()
    assert Path(f"{out}.idx").read_bytes() == Path(tmp_path / "ref.idx").read_bytes()


def test_prepare_into_a_read_only_dir_is_one_line(tmp_path, monkeypatch):
    import filelock

    src = write_jsonl(tmp_path / "in.jsonl", 3)

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    unlink = Path.unlink

    def unlink_read_only(self, missing_ok=False):  # removing the lock fails too on a read-only dir
        if self.suffix == ".lock":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink_read_only)
    with pytest.raises(
        UserError, match=r"^cannot write .*out\.lock: Read-only file system; choose a writable output="
    ):
        run_prepare(src, tmp_path / "out")


def test_an_up_to_date_dataset_on_a_read_only_file_system_needs_no_lock(tmp_path, monkeypatch):
    import filelock

    src = write_jsonl(tmp_path / "in.jsonl", 3)
    made = run_prepare(src, tmp_path / "out")

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    logs = []
    opts = PrepareOptions([str(src)], "builtin", str(tmp_path / "out"), progress=False, workers=-1)
    assert prepare(opts, log=logs.append) == made
    assert logs == [f"{tmp_path / 'out'}: up to date (3 documents, {made['tokens']} tokens)"]


def test_the_builtin_corpus_cache_names_data_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(IndexedWriter, "write", lambda *a: (_ for _ in ()).throw(NO_SPACE))
    with pytest.raises(UserError) as e:
        builtin.builtin_prefix("kjv", "builtin", str(tmp_path / "cache"), log=lambda m: None)
    message = str(e.value)
    assert message.startswith(f"cannot write {tmp_path}/cache/datasets/kjv-") and "No space left" in message
    assert message.endswith("; set data.cache_dir=DIR to a writable directory with room for the corpus")
    assert not list((tmp_path / "cache").rglob("*.idx"))


# ---- Megatron's index cache ------------------------------------------------------------------------------
def test_a_full_index_cache_removes_the_files_of_the_failed_build(tmp_path):
    cache = tmp_path / "index"
    cache.mkdir()
    (cache / "old-shuffle_index.npy").write_bytes(b"kept")
    with pytest.raises(UserError) as e, _single_process_guard(str(cache)):
        (cache / "new-description.txt").write_text("d")
        (cache / "new-shuffle_index.npy").write_bytes(b"trunc")  # a truncated file would be a cache hit
        raise OSError(errno.ENOSPC, "No space left on device", str(cache / "new-shuffle_index.npy"))
    assert str(e.value).startswith(f"cannot write {cache}/new-shuffle_index.npy: No space left on device (")
    assert "set data.index_cache_dir=DIR (default: data.cache_dir/index)" in str(e.value)
    assert sorted(p.name for p in cache.iterdir()) == [".build.lock", "old-shuffle_index.npy"]


def test_a_read_only_index_cache_is_one_line(tmp_path, monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with (
        pytest.raises(
            UserError, match=r"^cannot write .*/ro/index: Read-only file system; set data\.index_cache"
        ),
        _single_process_guard(str(tmp_path / "ro" / "index")),
    ):
        pass


# ---- convert's output directory --------------------------------------------------------------------------
def test_a_full_convert_output_leaves_nothing(tmp_path):
    from safetensors import SafetensorError

    dest = tmp_path / "out"
    with pytest.raises(UserError) as e, fmt.atomic_output_dir(dest) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(e.value).startswith(f"cannot write {dest}: No space left on device (")
    assert str(e.value).endswith("; choose an output directory that is writable and has room")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_convert_output_is_one_line(tmp_path, monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    refused = rf"^cannot write {tmp_path}/out: Read-only file system; choose"
    with pytest.raises(UserError, match=refused), fmt.atomic_output_dir(tmp_path / "out"):
        pass


# ---- eval --output -----------------------------------------------------------------------------------------
def test_eval_output_is_checked_before_the_evaluation(tmp_path, capsys):
    from llmtrain import eval as evaluation

    code = evaluation.main(
        [str(tmp_path / "no-checkpoint"), "--output", str(tmp_path / "missing" / "o.json")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: cannot write {tmp_path}/missing/o.json: {tmp_path}/missing is not a directory; "
        "pass --output a file in a writable directory with room"
    )


def test_eval_output_on_a_full_disk_leaves_no_truncated_file(tmp_path, monkeypatch, capsys):
    from llmtrain import eval as evaluation

    out = tmp_path / "o.json"
    out.write_text("previous result\n")
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: {"valid_loss": 1.0})
    write_text = Path.write_text

    def fill_up(self, text, *a, **k):
        write_text(self, text[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fill_up)
    assert evaluation.main([str(tmp_path / "ckpt"), "--output", str(out)]) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == '{"valid_loss": 1.0}\n'  # the result is not lost
    assert stderr.startswith(f"error: cannot write {out}: No space left on device (")
    assert stderr.endswith("(the result is printed above)\n") and stderr.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"] and out.read_text() == "previous result\n"
