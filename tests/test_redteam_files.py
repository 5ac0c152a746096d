"""Red-team findings on files that are not what they seem, names, and determinism (issue 22,
items 3, 4, 5, 6, 7, 8, 13).

Each test reproduces what the red team did and pins what the tool does now: a killed run's
subgraph scratch is swept; a device node, FIFO or symlink to one is never replaced; without
--force the commit itself refuses an output another run wrote meanwhile; a report that fails
after the model was committed says so; corrupt tensor data is named in one line; odd names
(not UTF-8, a newline, 255 bytes) work or fail in one clear line; a .keras output is
byte-identical run after run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import gconv_rewrite
from gconv_rewrite import formats
from gconv_rewrite.errors import BadInput, OutputError
from samples.models import GraphBuilder, grouped_block
from tests.helpers import error_lines, invoke, run_onnx

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(7).standard_normal((1, 32, 8, 8)).astype(np.float32)


def run_ort(path: Path, x: np.ndarray = X) -> np.ndarray:
    return run_onnx(path, {"x": x})[0]


def save_block(path: Path, seed: int = 1, *, external: bool = False) -> Path:
    """A fusable block (32 channels); with ``external`` its weights go to PATH.data."""
    model = grouped_block("split", groups=4, channels=32, out_channels=32, seed=seed)
    if external:
        onnx.save(model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=512)
    else:
        onnx.save(model, path)
    return path


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def assert_fused_and_equal(source: Path, written: Path) -> None:
    """The written file holds one Conv(group=4), no Split/Concat, and computes what the input does."""
    kinds = op_types(written)
    assert kinds.count("Conv") == 1 and "Split" not in kinds and "Concat" not in kinds, kinds
    (conv,) = [n for n in onnx.load(str(written)).graph.node if n.op_type == "Conv"]
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 4
    np.testing.assert_allclose(run_ort(written), run_ort(source), atol=1e-5)


# -- 3. a killed run's subgraph scratch is swept ---------------------------------------------------


def _branch(seed: int, name: str, out: str) -> onnx.GraphProto:
    b = GraphBuilder(17, seed)
    b._count = 100 * seed
    y = b.grouped_conv("x", 8, 8, 2, form="split", pads=[1, 1, 1, 1])
    b.nodes.append(helper.make_node("Relu", [y], [out], name=f"{name}_relu"))
    return helper.make_graph(b.nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * 4)],
                             initializer=b.initializers)


def if_model() -> onnx.ModelProto:
    """A grouped conv in each branch of an If: each branch is verified as its own model."""
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=_branch(1, "then", "t"),
                            else_branch=_branch(2, "else", "e"))
    graph = helper.make_graph([node], "outer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5]),
                                                helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_sigkill_while_a_branch_is_verified_leaves_nothing_a_later_run_does_not_sweep(tmp_path):
    source = tmp_path / "if.onnx"
    onnx.save(if_model(), source)
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = """
        import os, signal, sys
        import gconv_rewrite.passes.onnx.backend as backend
        import gconv_rewrite

        def killed(*args, scratch, **kwargs):
            (scratch / "branch.onnx").write_bytes(b"half written")  # as the real one writes there
            os.kill(os.getpid(), signal.SIGKILL)

        backend.verify_subgraphs = killed
        gconv_rewrite.fuse(sys.argv[1], output=sys.argv[2])
    """
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(source), str(tmp_path / "out.onnx")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    # (onnxruntime leaves a .ses file of its own in $TMPDIR: only the tool's folders are looked at)
    left = sorted(p.name for p in temp.iterdir() if p.name.startswith("gconv"))
    assert len(left) == 2, left  # the run's scratch and the branch's, both named gconv-<pid>-<random>
    swept = formats.sweep_scratch(temp)  # what the next run does first
    assert sorted(p.name for p in swept) == left
    assert [p.name for p in temp.iterdir() if p.name.startswith("gconv")] == []
    assert not (tmp_path / "out.onnx").exists()


def test_a_run_with_subgraphs_leaves_no_scratch(tmp_path, monkeypatch):
    """The If model's both branches are fused and proven, and $TMPDIR is left as it was."""
    source = tmp_path / "if.onnx"
    onnx.save(if_model(), source)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    result = gconv_rewrite.fuse(source, output=tmp_path / "out.onnx")
    assert [r.exercised for r in result.report.rewrites] == [True, True]
    assert [p.name for p in temp.iterdir() if p.name.startswith("gconv")] == []
    written = onnx.load(str(tmp_path / "out.onnx"))
    groups = [helper.get_attribute_value(a) for n in written.graph.node for a in n.attribute if a.name in
              ("then_branch", "else_branch")]
    assert [sum(n.op_type == "Conv" for n in g.node) for g in groups] == [1, 1]


# -- 4. special files are never replaced -----------------------------------------------------------


def make_char_device(path: Path) -> bool:
    """A node like /dev/null at ``path`` (as root); False where mknod is not permitted."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        return False
    return True


def special_targets(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a symlink to /dev/null (replacing the link would be harmless, but it is refused as
    what it points to), and where permitted a character device of our own."""
    targets = {"fifo": tmp_path / "fifo.onnx", "symlink": tmp_path / "null.onnx"}
    os.mkfifo(targets["fifo"])
    targets["symlink"].symlink_to("/dev/null")
    if make_char_device(tmp_path / "device.onnx"):
        targets["device"] = tmp_path / "device.onnx"
    return targets


def kind(path: Path) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("force", [False, True])
def test_output_naming_a_special_file_is_refused(tmp_path, force):
    source = save_block(tmp_path / "m.onnx")
    for name, target in special_targets(tmp_path).items():
        before = kind(target)
        result = invoke(source, "-o", target, *(["--force"] if force else []))
        assert result.exit_code == 2, (name, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "not a regular file" in result.output and "never replaced" in result.output, result.output
        assert kind(target) == before, name
    assert os.readlink(tmp_path / "null.onnx") == "/dev/null"


def test_report_naming_a_special_file_is_refused(tmp_path):
    source = save_block(tmp_path / "m.onnx")
    for name, target in special_targets(tmp_path).items():
        before = kind(target)
        result = invoke(source, "-o", tmp_path / "out.onnx", "--force", "--report", target)
        assert result.exit_code == 2, (name, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "--report" in result.output and "not a regular file" in result.output
        assert kind(target) == before, name


@contextmanager
def meanwhile(monkeypatch, action):
    """Run ``action`` (another process's doing) just before the commit: inside the commit's lock,
    after every earlier check has passed."""
    real_lock = formats.output_lock

    @contextmanager
    def lock_then_act(output):
        with real_lock(output):
            action(output)
            yield

    monkeypatch.setattr(formats, "output_lock", lock_then_act)
    yield


def test_a_fifo_made_between_the_check_and_the_commit_is_not_replaced(tmp_path, monkeypatch):
    source = save_block(tmp_path / "m.onnx")
    output = tmp_path / "out.onnx"
    with meanwhile(monkeypatch, os.mkfifo), pytest.raises(OutputError, match="FIFO"):
        gconv_rewrite.fuse(source, output=output, force=True)
    assert stat.S_ISFIFO(os.lstat(output).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]


# -- 5. without --force, the commit itself refuses an existing output ------------------------------


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("renameat2", [True, False])
def test_an_output_another_run_committed_meanwhile_is_not_replaced(tmp_path, monkeypatch, external, renameat2):
    """Two runs, two inputs, one -o, no --force: the one that commits second refuses."""
    source = save_block(tmp_path / "m.onnx", external=external)
    output = tmp_path / "out.onnx"
    theirs = save_block(tmp_path / "theirs.onnx", seed=9).read_bytes()
    if not renameat2:  # the hard-link commit used where renameat2(RENAME_NOREPLACE) is missing
        monkeypatch.setattr(formats, "_renameat2", lambda a, b, flags: False)
    with meanwhile(monkeypatch, lambda out: out.write_bytes(theirs)), \
            pytest.raises(OutputError, match="already exists .*another run.*--force"):
        gconv_rewrite.fuse(source, output=output)
    assert output.read_bytes() == theirs
    # Nothing of this run stays: no staging folder, no external data of its own.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.onnx", "out.onnx", "theirs.onnx"] + (["m.onnx.data"] if external else []))


def test_the_cli_says_so_in_one_line(tmp_path, monkeypatch):
    source = save_block(tmp_path / "m.onnx")
    output = tmp_path / "out.onnx"
    with meanwhile(monkeypatch, lambda out: out.write_bytes(b"theirs")):
        result = invoke(source, "-o", output)
    assert result.exit_code == 2, result.output
    assert error_lines(result.output, "gconv-rewrite: error:") == [
        f"gconv-rewrite: error: {output}: already exists (written by another run since this one began; use "
        "--force to overwrite); nothing was written"]
    assert output.read_bytes() == b"theirs"


def test_with_force_the_commit_replaces_it(tmp_path, monkeypatch):
    source = save_block(tmp_path / "m.onnx")
    output = tmp_path / "out.onnx"
    with meanwhile(monkeypatch, lambda out: out.write_bytes(b"theirs")):
        gconv_rewrite.fuse(source, output=output, force=True)
    assert_fused_and_equal(source, output)


# -- 6. a report that fails after the model was committed says so ----------------------------------


def test_report_over_the_file_size_limit_says_the_model_was_written(tmp_path):
    """RLIMIT_FSIZE between the model's size and the report's: the model commits, the report
    cannot; the error must not say "nothing was written"."""
    source = tmp_path / "tiny.onnx"
    onnx.save(grouped_block("split", groups=2, channels=4, out_channels=4), source)
    output, report = tmp_path / "tiny.fused.onnx", tmp_path / "r.json"
    limit = 1500  # the fused model is about 700 bytes, its report about 2 KB

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(source), "-o", str(output), "--report", str(report)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr, "gconv-rewrite: error:")
    assert "nothing was written" not in line
    assert f"{report}: write failed (File too large); the report was not written" in line
    assert line.endswith(f"but the model output {output} was written")
    assert output.stat().st_size < limit and not report.exists()
    kinds = op_types(output)
    assert kinds.count("Conv") == 1 and "Split" not in kinds
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(output, x), run_ort(source, x), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_write_failure_in_a_batch_names_every_written_model(tmp_path, monkeypatch):
    for name in ("a", "b"):
        save_block(tmp_path / f"{name}.onnx")
    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "r.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    result = invoke(tmp_path / "a.onnx", tmp_path / "b.onnx", "--report", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output, "gconv-rewrite: error:")
    assert "the report was not written" in line and "nothing was written" not in line
    assert f"model outputs {tmp_path / 'a.fused.onnx'}, {tmp_path / 'b.fused.onnx'} were written" in line
    for name in ("a", "b"):
        assert_fused_and_equal(tmp_path / f"{name}.onnx", tmp_path / f"{name}.fused.onnx")


# -- 7. corrupt tensors are named ------------------------------------------------------------------


def corrupt(path: Path, how: str) -> str:
    """Save a fusable block at ``path`` with one weight broken ``how``; returns that weight's name."""
    model = grouped_block("split", groups=4, channels=32, out_channels=32, seed=1)
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    if how == "short raw_data":
        weight.raw_data = weight.raw_data[:-8]
    elif how == "short float_data":
        values = onnx.numpy_helper.to_array(weight).ravel()[:-3]
        weight.ClearField("raw_data")
        weight.float_data.extend(values.tolist())
    if how == "truncated external data":  # the file cut short: the tensor stored last loses 16 bytes
        onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=512)
        data = path.parent / "m.data"
        data.write_bytes(data.read_bytes()[:-16])
        return _last_external(onnx.load(str(path), load_external_data=False))
    if how == "short external length":
        onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=512)
        model = onnx.load(str(path), load_external_data=False)
        weight = next(t for t in model.graph.initializer if t.name == weight.name)
        for entry in weight.external_data:
            if entry.key == "length":
                entry.value = str(int(entry.value) - 4)
    onnx.save(model, path)
    return weight.name


def _last_external(model: onnx.ModelProto) -> str:
    """The external tensor stored last in its file (the one a truncated file cuts)."""
    def offset(tensor):
        return int(next(e.value for e in tensor.external_data if e.key == "offset"))
    return max((t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL), key=offset).name


@pytest.mark.parametrize("how, says", [
    ("short raw_data", "needs 2304 bytes, but its raw_data holds 2296"),
    ("short float_data", "but its float_data holds 573 values where 576 are needed"),
    ("truncated external data", "of m.data, but that file holds"),
    ("short external length", "needs 2304 bytes, but its external data length is 2300"),
])
def test_corrupt_tensor_data_is_one_line_naming_the_tensor(tmp_path, how, says):
    source = tmp_path / "m.onnx"
    name = corrupt(source, how)
    result = invoke(source, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "internal error" not in lines[0]
    assert f"tensor {name!r} (float, shape [8, 8, 3, 3])" in lines[0] and says in lines[0], lines[0]
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(BadInput, match="not a valid ONNX model"):
        gconv_rewrite.check(source)


def test_intact_tensors_of_every_layout_still_load(tmp_path):
    """The check reads lengths only: inline, typed and external weights of an intact model pass,
    and fuse with the same numbers."""
    for external in (False, True):
        source = save_block(tmp_path / f"m{int(external)}.onnx", external=external)
        output = tmp_path / f"out{int(external)}.onnx"
        gconv_rewrite.fuse(source, output=output)
        assert_fused_and_equal(source, output)
    model = grouped_block("split", groups=4, channels=32, out_channels=32, seed=1)
    for tensor in model.graph.initializer:  # typed fields instead of raw bytes
        array = onnx.numpy_helper.to_array(tensor)
        tensor.CopyFrom(helper.make_tensor(tensor.name, tensor.data_type, tensor.dims, array.ravel().tolist()))
    onnx.save(model, tmp_path / "typed.onnx")
    gconv_rewrite.fuse(tmp_path / "typed.onnx", output=tmp_path / "typed.out.onnx")
    assert_fused_and_equal(tmp_path / "typed.onnx", tmp_path / "typed.out.onnx")


# -- 8. names: not UTF-8, control characters, 255 bytes --------------------------------------------


def non_utf8(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


def test_a_non_utf8_input_name_is_a_clear_bad_input(tmp_path):
    source = non_utf8(tmp_path, b"bad\xff.onnx")
    try:
        save_block(source)
    except OSError:
        pytest.skip("this file system does not take non-UTF-8 names")
    result = invoke(source)
    assert result.exit_code == 2, result.output  # 1 would say the rewrite was wrong
    (line,) = result.output.strip().splitlines()
    assert "bad\\xff.onnx: path is not valid UTF-8" in line and "rename it" in line
    assert "checker" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_a_non_utf8_output_name_is_a_clear_bad_input(tmp_path):
    source = save_block(tmp_path / "m.onnx")
    output = non_utf8(tmp_path, b"out\xfe.onnx")
    result = invoke(source, "-o", output)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "out\\xfe.onnx: output path is not valid UTF-8" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_newline_in_a_name_cannot_forge_an_error_line(tmp_path):
    source = save_block(tmp_path / "m\ngconv-rewrite: error: forged.onnx")
    result = invoke(source)
    assert result.exit_code == 0, result.output
    assert error_lines(result.output, "gconv-rewrite: error:") == []
    assert "m\\ngconv-rewrite: error: forged.onnx: fuse" in result.output
    assert "wrote " + str(tmp_path / "m\\ngconv-rewrite: error: forged.fused.onnx") in result.output
    assert_fused_and_equal(source, tmp_path / "m\ngconv-rewrite: error: forged.fused.onnx")
    again = invoke(source)  # the output exists now: an error, one line, escaped
    assert again.exit_code == 2
    assert len(again.output.strip().splitlines()) == 1, again.output
    assert again.output.startswith("gconv-rewrite: error: ") and "\\ngconv-rewrite: error: forged" in again.output


def test_escape_sequences_in_names_reach_no_terminal(tmp_path):
    source = save_block(tmp_path / "m\x1b[2J\r.onnx")
    for args in ([], ["--check"], ["-o", tmp_path / "x\x1b]0;title\x07.onnx"], [tmp_path / "m.onnx", "-j", "2"]):
        if args and args[0] == tmp_path / "m.onnx":
            save_block(tmp_path / "m.onnx")
        result = invoke(source, *args)
        assert "\x1b" not in result.output and "\r" not in result.output and "\x07" not in result.output, args
        assert "m\\x1b[2J\\r.onnx" in result.output, args


@pytest.mark.parametrize("external", [False, True])
def test_a_255_byte_output_name_is_written(tmp_path, external):
    source = save_block(tmp_path / "m.onnx", external=external)
    output = tmp_path / ("o" * (255 - len(".onnx")) + ".onnx")
    assert len(os.fsencode(output.name)) == 255
    result = invoke(source, "-o", output)
    assert result.exit_code == 0, result.output
    assert_fused_and_equal(source, output)
    data = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".data") and p.name != "m.onnx.data")
    assert len(data) == int(external)  # the weights, under a name derived from a hash of the output's
    if external:
        assert all(len(os.fsencode(name)) <= 255 for name in data)
        located = {e.value for t in onnx.load(str(output), load_external_data=False).graph.initializer
                   for e in t.external_data if e.key == "location"}
        assert located == set(data)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock, no staging left
    again = invoke(source, "-o", output, "--force")  # replaced as a pair, the old data removed
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".data") and p.name != "m.onnx.data") == data
    assert_fused_and_equal(source, output)


def test_a_killed_runs_staging_for_a_255_byte_name_is_swept(tmp_path):
    output = tmp_path / ("o" * 250 + ".onnx")
    stem = formats.helper_stem(output)
    assert stem != output.name and len(f".{stem}.gconv-4194304-0123abcd.tmp") <= 255
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                         text=True).stdout.strip()
    left = tmp_path / f".{stem}.gconv-{pid}-0123abcd.tmp"
    left.mkdir()
    assert formats.sweep_staging(output) == [left]


def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path):
    source = save_block(tmp_path / "m.onnx")
    result = invoke(source, "-o", tmp_path / ("o" * 300 + ".onnx"))
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "the file name is 305 bytes, longer than the 255" in line and "internal error" not in line


# -- 13. Keras outputs are byte-identical ----------------------------------------------------------


def test_the_same_keras_input_gives_the_same_bytes(tmp_path):
    keras = pytest.importorskip("keras")
    from samples import keras_models

    source = keras_models.getitem_model(tmp_path / "g.keras")
    first, second = tmp_path / "one.keras", tmp_path / "two.keras"
    gconv_rewrite.fuse(source, output=first)
    time.sleep(2.1)  # past the zip format's 2-second and date_saved's 1-second resolution
    gconv_rewrite.fuse(source, output=second)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert json.loads(archive.read("metadata.json"))["date_saved"] == "1980-01-01@00:00:00"
        assert [i.filename for i in archive.infolist()] == ["metadata.json", "config.json", "model.weights.h5"]
    original, fused = keras.saving.load_model(source), keras.saving.load_model(first)
    assert any(getattr(layer, "groups", 1) > 1 for layer in fused.layers)
    assert len(fused.layers) < len(original.layers)
    x = np.random.default_rng(3).standard_normal((2, *original.input_shape[1:])).astype(np.float32)
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(original(x)), atol=1e-5)
