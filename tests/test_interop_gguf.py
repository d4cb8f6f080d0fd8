"""GGUF interop: TQ2_0 / TQ1_0 / F16 export and import, checked with gguf-py's own reader and quantisers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bittern.cli import main  # noqa: E402
from bittern.configs import get_config  # noqa: E402
from bittern.interop import convert, from_pretrained  # noqa: E402
from bittern.interop.gguf_io import GGUFFile, _permute_rope, _unpermute_rope, load_gguf, save_gguf  # noqa: E402
from bittern.model import Transformer  # noqa: E402
from bittern.modelfile import ModelFileError, save_packed  # noqa: E402
from bittern.tokenizer import train_bpe  # noqa: E402

# widths that are multiples of 256, as TQ types need
CFG_BITNET = get_config("tiny-2b4t", hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, vocab_size=300,
                        max_seq_len=64)
CFG_LLAMA = get_config("tiny", hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, vocab_size=300,
                       max_seq_len=64)

pytestmark = pytest.mark.usefixtures("reference_kernels")



def make_model(cfg, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.freeze()


def _same_model(a: Transformer, b: Transformer, exact_scale: bool = True) -> None:
    """Same config and codes; scales equal (or ``b``'s equal to fp16(a's)); then identical logits to
    the model with those scales."""
    import copy
    assert a.config.to_dict() == b.config.to_dict()
    expected = copy.deepcopy(a)
    for name, m in a.packed_linears().items():
        m2 = b.get_submodule(name)
        assert torch.equal(m.ternary.codes(), m2.ternary.codes()), name
        g, g2 = float(m.weight_scale), float(m2.weight_scale)
        if exact_scale:
            assert g == g2, name
        else:
            assert g2 == float(np.float16(g)), name
            expected.get_submodule(name).weight_scale = torch.tensor(g2, dtype=torch.float32)
    ids = torch.arange(10).view(1, -1) * 7 % a.config.vocab_size
    with torch.no_grad():
        la, lb = expected(ids), b(ids)
    assert la.abs().max() > 0.1
    assert (la - lb).abs().max().item() < 1e-5


@pytest.mark.parametrize("cfg,arch", [(CFG_BITNET, "bitnet"), (CFG_LLAMA, "llama")])
@pytest.mark.parametrize("wtype", ["TQ2_0", "TQ1_0", "F16"])
def test_gguf_round_trip(tmp_path, cfg, arch, wtype):
    model = make_model(cfg)
    path = save_gguf(model, tmp_path / "m.gguf", weight_type=wtype, float_type="F32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == arch
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == wtype and types["blk.1.ffn_down.weight"] == wtype
    assert types["blk.0.attn_norm.weight"] == "F32"
    if arch == "bitnet":
        assert "blk.0.attn_sub_norm.weight" in types and "output.weight" not in types
    else:
        assert "output.weight" in types
    _same_model(model, load_gguf(path), exact_scale=True)


def test_tq_bytes_decode_with_gguf_reference(tmp_path):
    """Decoding the written TQ blocks with gguf-py's dequantiser gives codes * fp16(gamma) per row block."""
    model = make_model(CFG_BITNET, seed=3)
    for wtype in ("TQ2_0", "TQ1_0"):
        path = save_gguf(model, tmp_path / f"{wtype}.gguf", weight_type=wtype)
        r = gguf.GGUFReader(str(path))
        t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(512, 256)
        m = model.get_submodule("layers.0.mlp.up_proj")
        expect = m.ternary.codes().numpy().astype(np.float32) * np.float32(np.float16(float(m.weight_scale)))
        assert np.array_equal(w, expect)
        assert t.data.nbytes == 512 * 256 // 256 * (66 if wtype == "TQ2_0" else 54)


def test_foreign_gguf_uses_fp16_block_scales(tmp_path):
    """Without bittern's exact-scale keys (a file from elsewhere), gamma is the fp16 block scale."""
    model = make_model(CFG_BITNET, seed=4)
    path = save_gguf(model, tmp_path / "m.gguf", float_type="F32")
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "foreign.gguf"), "bitnet")
    for key, field in r.fields.items():
        if key.startswith(("bittern.scale.", "GGUF.", "general.architecture")):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same_model(model, load_gguf(tmp_path / "foreign.gguf"), exact_scale=False)


def test_mixed_block_scales_requantised_with_warning(tmp_path):
    rng = np.random.default_rng(0)
    model = make_model(CFG_LLAMA, seed=5)
    path = save_gguf(model, tmp_path / "m.gguf", weight_type="F16")
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.0.ffn_up.weight":
            data = rng.standard_normal(data.shape).astype(np.float16)  # not ternary
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="re-quantised"):
        back = load_gguf(tmp_path / "mixed.gguf")
    assert set(back.get_submodule("layers.0.mlp.up_proj").ternary.codes().unique().tolist()) == {-1, 0, 1}


def test_rope_permutation_inverse():
    w = np.arange(64 * 3).reshape(64, 3)
    p = _permute_rope(w, 4)
    assert not np.array_equal(p, w)
    assert np.array_equal(_unpermute_rope(p, 4), w)


def test_tokenizer_in_gguf(tmp_path):
    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 3] * 30, vocab_size=290)
    tok.save(tmp_path / "tok")
    model = make_model(CFG_LLAMA)
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tmp_path / "tok")
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == CFG_LLAMA.vocab_size and tokens[-1].startswith("[PAD")
    m, tok2, fmt = from_pretrained(path)
    assert fmt == "gguf" and tok2 is not None
    text = "the lazy fox, quickly!"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.eos_id == tok.eos_id and tok2.decode(tok.encode(text)) == text


def test_convert_cli_bittern_gguf_bittern(tmp_path):
    model = make_model(CFG_BITNET, seed=8)
    save_packed(model, tmp_path / "packed", dtype="float32")
    assert main(["convert", str(tmp_path / "packed"), str(tmp_path / "m.gguf"), "--weight-type", "TQ1_0",
                 "--dtype", "float32"]) == 0
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "--dtype", "float32"]) == 0
    back, _, fmt = from_pretrained(tmp_path / "back")
    assert fmt == "bittern"
    _same_model(model, back, exact_scale=True)


# ----------------------------------------------------------------------------- bad files


def test_tq_needs_rows_multiple_of_256(tmp_path):
    model = make_model(get_config("tiny"))  # hidden 64
    with pytest.raises(ValueError, match="multiple of 256"):
        save_gguf(model, tmp_path / "m.gguf", weight_type="TQ2_0")
    assert not list(tmp_path.iterdir())  # no partial or temp file left behind
    save_gguf(model, tmp_path / "m.gguf", weight_type="F16")  # F16 has no such limit
    assert (tmp_path / "m.gguf").is_file()


def test_unexportable_models(tmp_path):
    with pytest.raises(ValueError, match="bitlinear_norm"):
        save_gguf(make_model(get_config("tiny-faq")), tmp_path / "a.gguf", weight_type="F16")
    with pytest.warns(UserWarning, match="SiLU"):
        save_gguf(make_model(get_config("tiny-2b4t")), tmp_path / "b.gguf", weight_type="F16")


def _good_file(tmp_path: Path) -> bytes:
    path = save_gguf(make_model(CFG_LLAMA), tmp_path / "good.gguf", weight_type="TQ2_0")
    return path.read_bytes()


def test_bad_magic_version_and_truncation(tmp_path):
    data = _good_file(tmp_path)
    cases = {"magic": b"GGUX" + data[4:], "version": data[:4] + (7).to_bytes(4, "little") + data[8:],
             "truncated": data[: len(data) - 1000], "tiny": data[:6]}
    messages = {"magic": "bad magic", "version": "version 7", "truncated": "truncated|corrupted", "tiny": "bad magic"}
    for name, blob in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        with pytest.raises(ModelFileError, match=messages[name]):
            load_gguf(p)
        assert main(["convert", str(p), str(tmp_path / f"out-{name}")]) == 2
        assert not (tmp_path / f"out-{name}").exists() or not any((tmp_path / f"out-{name}").iterdir())


def test_wrong_tensor_size(tmp_path):
    """A tensor whose declared shape does not match the config is refused with its name."""
    model = make_model(CFG_LLAMA)
    path = save_gguf(model, tmp_path / "m.gguf", weight_type="F16")
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "general.architecture", "bittern.model_config")):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.1.ffn_gate.weight":
            data = data[:256]
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="blk.1.ffn_gate.weight"):
        load_gguf(tmp_path / "bad.gguf")


def test_gguf_file_validation_reports_offsets(tmp_path):
    data = _good_file(tmp_path)
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(ModelFileError, match="truncated|corrupted"):
        GGUFFile(p)


def test_convert_refuses_same_path(tmp_path):
    path = save_gguf(make_model(CFG_LLAMA), tmp_path / "m.gguf", weight_type="F16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="same path"):
            convert(path, path, to="gguf")


def test_nan_block_scale_is_a_clear_error(tmp_path):
    """Found by the fuzzer: a TQ block scale overwritten with NaN must name the tensor, not crash the quantiser."""
    model = make_model(CFG_LLAMA)
    path = save_gguf(model, tmp_path / "m.gguf", weight_type="TQ2_0")
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight")
    data = bytearray(path.read_bytes())
    at = int(t.data_offset) + 64  # the fp16 scale of the first 66-byte block
    data[at:at + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="blk.0.attn_v.weight.*NaN"):
        load_gguf(bad)

