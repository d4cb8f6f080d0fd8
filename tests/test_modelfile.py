"""Packed model files: round trip, memory mapping, and clear errors for bad files (no pickle)."""

import json
import struct

import pytest
import torch

from bittern.configs import get_config
from bittern.model import Transformer
from bittern.modelfile import WEIGHTS_FILE, ModelFileError, load_packed, read_safetensors, save_packed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-2b4t")).eval()
    directory = tmp_path_factory.mktemp("packed")
    save_packed(model, directory, layout="1.6bit", dtype="float32")
    return model, directory


def test_round_trip_gives_identical_logits(saved):
    model, directory = saved
    loaded = load_packed(directory)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        reference = Transformer(model.config)
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(loaded(tokens), reference.eval()(tokens), rtol=1e-4, atol=1e-4)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tied stays tied


def _mapped_files(address: int) -> list[str]:
    with open("/proc/self/maps") as f:
        hits = []
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= address < hi and len(parts) >= 6:
                hits.append(parts[5])
        return hits


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_packed_codes_are_memory_mapped(saved):
    _, directory = saved
    tensors, meta = read_safetensors(directory / WEIGHTS_FILE)
    assert meta.get("format") == "bittern-packed"
    packed = tensors["layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.uint8
    assert str((directory / WEIGHTS_FILE).resolve()) in _mapped_files(packed.data_ptr())
    model = load_packed(directory)
    layer = model.layers[1].mlp.gate_proj
    assert str((directory / WEIGHTS_FILE).resolve()) in _mapped_files(layer.weight_packed.data_ptr())


def _corrupt_copy(directory, tmp_path, mutate):
    target = tmp_path / "bad"
    target.mkdir()
    for f in directory.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    mutate(target)
    return target


def test_truncated_file_names_file_and_tensor(saved, tmp_path):
    _, directory = saved
    bad = _corrupt_copy(directory, tmp_path, lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100]))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: tensor '.*'.*truncated"):
        load_packed(bad)


def test_corrupted_header(saved, tmp_path):
    _, directory = saved

    def mutate(d):
        data = bytearray((d / WEIGHTS_FILE).read_bytes())
        data[10:20] = b"\xff" * 10
        (d / WEIGHTS_FILE).write_bytes(bytes(data))

    with pytest.raises(ModelFileError, match="corrupted header"):
        load_packed(_corrupt_copy(directory, tmp_path, mutate))


def test_absurd_header_length(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ModelFileError, match="header length"):
        read_safetensors(path)
    (tmp_path / "y.safetensors").write_bytes(b"abc")
    with pytest.raises(ModelFileError, match="truncated"):
        read_safetensors(tmp_path / "y.safetensors")


def test_config_that_does_not_match_tensors(saved, tmp_path):
    _, directory = saved

    def mutate(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model"]["intermediate_size"] = 192
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(ModelFileError, match="has shape .* config expects"):
        load_packed(_corrupt_copy(directory, tmp_path, mutate))


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    save_packed(model, tmp_path / "m")
    tensors, _ = read_safetensors(tmp_path / "m" / WEIGHTS_FILE, mmap_file=False)
    dropped = dict(tensors)
    dropped.pop("layers.1.self_attn.k_proj.weight_scale")
    save_file({k: v.clone() for k, v in dropped.items()}, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(ModelFileError, match="k_proj.weight_scale' is missing"):
        load_packed(tmp_path / "m")
    extra = {k: v.clone() for k, v in tensors.items()}
    extra["stray"] = torch.zeros(2)
    save_file(extra, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(ModelFileError, match="unexpected tensors"):
        load_packed(tmp_path / "m")


def test_missing_directory_and_foreign_config(tmp_path):
    with pytest.raises(ModelFileError, match="no such model directory"):
        load_packed(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFileError, match="not a bittern packed model"):
        load_packed(tmp_path)


def test_lookup_layout_of_an_older_revision_is_refused(tmp_path):
    """1.67bit-lut changed its byte order (revision 2): a file without the revision is not misread."""
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-2b4t")).eval()
    save_packed(model, tmp_path, layout="1.67bit-lut", dtype="float32")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layout_revision"] == 2
    load_packed(tmp_path)  # the current revision loads
    del config["layout_revision"]  # what a file from before the change looks like
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="revision 1 of that layout; this bittern reads revision 2"):
        load_packed(tmp_path)


def test_non_finite_weights_refuse_to_pack(tmp_path):
    model = Transformer(get_config("tiny"))
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_packed(model, tmp_path / "nan")
    assert not (tmp_path / "nan" / WEIGHTS_FILE).exists()


def _edit(directory, tmp_path, header_edit=None, data_edit=None, config_edit=None, name="bad"):
    """A copy of ``directory`` with its safetensors header (a dict) and/or bytes edited in place."""
    target = tmp_path / name
    target.mkdir()
    for f in directory.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    raw = bytearray((target / WEIGHTS_FILE).read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    if header_edit is not None:
        header_edit(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        raw[8 : 8 + n] = text + b" " * (n - len(text))
    if data_edit is not None:
        data_edit(header, raw, 8 + n)
    (target / WEIGHTS_FILE).write_bytes(bytes(raw))
    if config_edit is not None:
        cfg = json.loads((target / "config.json").read_text())
        config_edit(cfg)
        (target / "config.json").write_text(json.dumps(cfg))
    return target


def _put_float(name, value):
    def edit(header, raw, start):
        begin = header[name]["data_offsets"][0]
        raw[start + begin : start + begin + 4] = struct.pack("<f", value)
    return edit


def _set(name, key, value):
    def edit(header):
        header[name][key] = value
    return edit


@pytest.mark.parametrize("mmap_weights", [True, False])
def test_engine_refuses_damaged_files_with_one_clear_error(saved, tmp_path, mmap_weights):
    """The engine's loader checks what the reference loader checks: shapes and dtypes against the config,
    finite positive scales, finite norms, no tensors the config lacks."""
    from bittern.engine import EngineModel

    _, directory = saved
    scale, packed, norm = "layers.0.mlp.down_proj.weight_scale", "layers.0.mlp.down_proj.weight_packed", "norm.weight"
    cases = [
        (dict(header_edit=_set(scale, "shape", [])), "has shape \\(\\), the config expects \\(1,\\)"),
        (dict(header_edit=_set(packed, "dtype", "I8")), "has dtype torch.int8, expected torch.uint8"),
        (dict(data_edit=_put_float(scale, float("nan"))), "NaN or Inf"),
        (dict(data_edit=_put_float(scale, -1.0)), "not a positive scale"),
        (dict(data_edit=_put_float(norm, float("inf"))), "NaN or Inf"),
        (dict(config_edit=lambda c: c["model"].update(num_layers=1)), "does num_layers match"),
    ]
    for i, (edits, message) in enumerate(cases):
        bad = _edit(directory, tmp_path, name=f"bad{i}", **edits)
        with pytest.raises(ModelFileError, match=message):
            EngineModel.load(bad, head="f32", mmap_weights=mmap_weights)
