"""SentencePiece ``tokenizer.model`` files (Llama-2 / 1bitLLM checkpoints without a ``tokenizer.json``).

transformers' slow->fast conversion (``AutoTokenizer.from_pretrained``) turns the SentencePiece BPE model
into a ``tokenizers`` BPE (vocab, merges ranked by piece score, byte fallback, user-defined and control
pieces as added tokens) and reads the special tokens and chat template from ``tokenizer_config.json``.
The text pipeline transformers attaches depends on the ``tokenizer_class`` named there (a generic class
drops SentencePiece's dummy prefix), so it is rebuilt here from the model's own ``normalizer_spec``:
character map, extra-whitespace removal, dummy prefix, spaces as "▁". The result is checked against
``sentencepiece`` itself on a few probe strings.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

SPM_FILE = "tokenizer.model"
INSTALL_HINT = "pip install 'bittern[sentencepiece]'"
SPACE = "\u2581"
# texts on which the converted tokenizer must agree with sentencepiece (spaces, digits, accents, bytes)
PROBES = ("Hello world! 1234567890", " leading, trailing and  double   spaces  ", "naïve café — Ünïcödé ß",
          "emoji 🦩🦀 and 中文", "line one\nline two\ttab", "x")
_BPE = 2  # TrainerSpec.ModelType.BPE


def _missing_packages() -> list[str]:
    missing = []
    for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"),
                            ("transformers", "transformers")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def _normalizer(spec):
    """A ``tokenizers`` normalizer doing what SentencePiece's ``normalizer_spec`` does before encoding."""
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # SentencePiece collapses and trims runs of " " only (not tabs/newlines)
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _decoder(spec, byte_fallback: bool):
    from tokenizers import decoders

    steps = [decoders.Replace(SPACE, " ")]
    if byte_fallback:
        steps += [decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def sentencepiece_tokenizer(directory: str | os.PathLike) -> "Tokenizer | None":
    """The :class:`~bittern.tokenizer.Tokenizer` of the SentencePiece ``tokenizer.model`` in ``directory``
    (special tokens and chat template from ``tokenizer_config.json``), or None with a warning saying why
    (packages missing, a model type or option that cannot be converted exactly)."""
    directory = Path(directory)
    path = directory / SPM_FILE
    missing = _missing_packages()
    if missing:
        warnings.warn(f"{path}: reading a SentencePiece tokenizer needs {', '.join(missing)} (run: {INSTALL_HINT}); "
                      "converting the model without a tokenizer")
        return None
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer  # noqa: F811 - the runtime import

    data = path.read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError
        warnings.warn(f"{path}: not a SentencePiece model ({e}); converting the model without a tokenizer")
        return None
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != _BPE:
        warnings.warn(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not BPE (only BPE, as in "
                      "Llama-2 / 1bitLLM, is converted); converting the model without a tokenizer")
        return None
    if proto.trainer_spec.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        warnings.warn(f"{path}: treat_whitespace_as_suffix / escape_whitespaces=false are not supported; converting "
                      "the model without a tokenizer")
        return None
    import transformers

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notes on byte fallback / legacy behaviour
            fast = transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - any failure of the conversion must not hide the model
        warnings.warn(f"{path}: transformers could not convert the SentencePiece model ({type(e).__name__}: {e}); "
                      "converting the model without a tokenizer")
        return None
    hf = HFTokenizer.from_str(fast.backend_tokenizer.to_str())  # a copy we may change
    for i, piece in enumerate(proto.pieces):
        if hf.token_to_id(piece.piece) != i and piece.type != 2:  # UNKNOWN may be renamed by the tokenizer class
            warnings.warn(f"{path}: the converted vocabulary puts {piece.piece!r} at {hf.token_to_id(piece.piece)}, "
                          f"not {i}; converting the model without a tokenizer")
            return None
    unk_id = proto.trainer_spec.unk_id
    if getattr(hf.model, "unk_token", None) is None and 0 <= unk_id < len(proto.pieces):
        hf.model.unk_token = hf.id_to_token(unk_id)  # transformers' LlamaTokenizer leaves it unset
    hf.normalizer = _normalizer(spec)
    hf.pre_tokenizer = None
    hf.post_processor = None
    hf.decoder = _decoder(spec, bool(proto.trainer_spec.byte_fallback))
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    for text in PROBES:
        if hf.encode(text, add_special_tokens=False).ids != sp.encode(text):
            warnings.warn(f"{path}: the converted tokenizer encodes {text!r} differently from SentencePiece")
            break
    template = fast.chat_template if isinstance(getattr(fast, "chat_template", None), str) else None

    def known(token: object) -> str | None:
        token = None if token is None else str(token)
        return token if token is not None and hf.token_to_id(token) is not None else None
    return Tokenizer(hf, known(fast.eos_token), known(fast.bos_token), template)
