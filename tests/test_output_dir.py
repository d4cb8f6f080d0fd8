"""Outputs appear whole or not at all: convert and pack never mix a new model with an old one's files,
never leave a partial directory after a failure, and never write into a run's checkpoints."""

from __future__ import annotations

import pytest
import torch

from bittern.cli import main
from bittern.configs import get_config
from bittern.errors import UsageError
from bittern.interop import convert
from bittern.model import Transformer
from bittern.modelfile import save_packed
from bittern.output_dir import fresh_output_dir


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("src") / "model"
    save_packed(Transformer(get_config("tiny")).freeze(), d)
    return d


def test_fresh_output_dir_replaces_whole_or_leaves_things_as_they_were(tmp_path) -> None:
    dest = tmp_path / "out"
    with fresh_output_dir(dest) as out:
        (out / "a.txt").write_text("new")
        assert not dest.exists()  # nothing under the real name until the writer is done
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    with pytest.raises(UsageError, match="not empty: choose a new output or pass --overwrite"):
        with fresh_output_dir(dest):
            pass
    with pytest.raises(RuntimeError):
        with fresh_output_dir(dest, overwrite=True) as out:
            (out / "b.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"] and (dest / "a.txt").read_text() == "new"
    with fresh_output_dir(dest, overwrite=True) as out:
        (out / "b.txt").write_text("newer")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # no file of the old output stays
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind
    with pytest.raises(UsageError, match="inside"):
        with fresh_output_dir(tmp_path / "run" / "checkpoints" / "step_1", overwrite=True, protect=[tmp_path / "run" / "checkpoints"]):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        with fresh_output_dir(tmp_path / "file", overwrite=True):
            pass


def test_convert_refuses_an_existing_output_and_replaces_it_whole_when_asked(packed, tmp_path, capsys) -> None:
    dest = tmp_path / "dst"
    dest.mkdir()
    (dest / "model.safetensors.index.json").write_text("{}")  # a stale file of another model
    with pytest.raises(UsageError, match="not empty"):
        convert(packed, dest, to="bittern", layout="1.6bit")
    convert(packed, dest, to="bittern", layout="1.6bit", overwrite=True)
    assert not (dest / "model.safetensors.index.json").exists() and (dest / "model.safetensors").is_file()
    gguf = tmp_path / "m.gguf"
    f16 = ["--weight-type", "F16"]  # this model's rows are too short for TQ2_0 blocks
    assert main(["convert", str(packed), str(gguf), *f16]) == 0
    assert main(["convert", str(packed), str(gguf), *f16]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(packed), str(gguf), "--overwrite", *f16]) == 0
    assert main(["convert", str(packed), str(tmp_path), "--to", "gguf", *f16]) == 2  # a directory where a file goes
    # a conversion that fails leaves nothing under the output's name
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"format": "bittern-packed", "format_version": 999}')
    assert main(["convert", str(bad), str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_an_output_that_holds_the_input_is_refused_even_with_overwrite(packed, tmp_path) -> None:
    import shutil

    parent = tmp_path / "p"
    shutil.copytree(packed, parent / "m")
    (parent / "other.txt").write_text("keep me")
    with pytest.raises(UsageError, match="holds the input"):
        convert(parent / "m", parent, overwrite=True)
    assert (parent / "m" / "model.safetensors").is_file() and (parent / "other.txt").read_text() == "keep me"
    out = convert(packed, tmp_path / "x.gguf", weight_type="F16")  # the format follows the name, as in the CLI
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
