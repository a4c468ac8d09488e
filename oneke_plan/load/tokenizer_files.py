"""A model folder's tokenizer files, checked before transformers reads them (and before any weight).

Transformers builds a tokenizer from whatever it finds: in OneKE's release layout (SentencePiece's tokenizer.model
alone, no tokenizer.json), 5.x turns an empty, missing or unreadable tokenizer.model into a tokenizer of 3 tokens
(every prompt one token, every answer empty), a truncated one into a tokenizer of the pieces before the cut, and
random bytes into a request for tiktoken; 4.x fails with a TypeError, and a FIFO blocks either for ever. So:

- every tokenizer file there is must be a regular file (a hub-cache snapshot's links are followed into its blobs),
  asked of the file system before anything opens it (`check_tokenizer_files`);
- a tokenizer.model that transformers will build the tokenizer from must be a complete SentencePiece model whose
  pieces fill the model's embedding (`check_sentencepiece_model`);
- and the tokenizer transformers built must cover most of the embedding (`check_tokenizer_size`), whatever files it
  came from.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.io.files import read_regular, regular_file
from oneke_plan.io.limits import MAX_JSON_BYTES, MAX_SENTENCEPIECE_BYTES

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    SENTENCEPIECE_FILE,
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
"""The files AutoTokenizer opens in a model folder (those of the tokenizer classes our models use)."""

PADDING_ROWS = 128
"""Embedding rows a checkpoint may have past its tokenizer's last id: vocabularies padded up to a multiple of 64 or
128 for faster matrix products (never produced by the tokenizer, so harmless). More is another model's tokenizer."""

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")  # a token in base64, its rank
_DAMAGED = "copy the tokenizer files again from the model's release"


def check_tokenizer_files(directory: Path) -> None:
    """Each tokenizer file in `directory` that exists, and generation_config.json (which transformers reads after
    the weights), is a regular file of a size such a file can have: BadInput naming it otherwise (a FIFO, device,
    folder or dangling link), nothing opened."""
    built_from_json = (directory / "tokenizer.json").exists()
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        limit = MAX_JSON_BYTES
        if name == SENTENCEPIECE_FILE:
            # Bounded where it is what the tokenizer is built from. Beside a tokenizer.json it is not read, and it
            # can be anything: transformers 4.x saves a GGUF-loaded tokenizer with the whole GGUF as tokenizer.model.
            limit = sys.maxsize if built_from_json else MAX_SENTENCEPIECE_BYTES
        regular_file(directory / name, limit, _DAMAGED)


def check_sentencepiece_model(
    directory: Path, config: dict[str, Any], tokenizer_config: dict[str, Any], added_tokens: Any
) -> None:
    """When the tokenizer is built from `directory`'s tokenizer.model (there is no tokenizer.json), the file is a
    complete SentencePiece model whose pieces (with the added tokens of tokenizer_config.json and added_tokens.json)
    are the rows of the model's embedding, up to PADDING_ROWS of padding: one BadInput line naming the file and what
    is wrong otherwise. Reads at most MAX_SENTENCEPIECE_BYTES; sentencepiece, when installed, must load it too."""
    if (directory / "tokenizer.json").exists():
        return
    path = directory / SENTENCEPIECE_FILE
    remedy = f"the tokenizer is built from this file (there is no tokenizer.json): {_DAMAGED}"
    data = read_regular(path, MAX_SENTENCEPIECE_BYTES, remedy)
    if data is None:
        return  # check_tokenizer_size refuses the tokenizer transformers builds without it
    if not data:
        raise BadInput(f"{path}: is empty; {remedy}")
    if _TIKTOKEN_LINE.match(data):
        return  # tiktoken's ranks (Llama-3's original layout), which transformers 5 converts with tiktoken
    try:
        pieces, fields = read_model_proto(data)
    except ValueError as exc:
        raise BadInput(f"{path}: is not a SentencePiece model (not its protobuf form: {exc}); {remedy}") from None
    if pieces == 0:
        raise BadInput(f"{path}: is not a SentencePiece model (it holds no pieces); {remedy}")
    if not {_TRAINER_SPEC, _NORMALIZER_SPEC} <= fields:
        raise BadInput(
            f"{path}: is cut short: it ends after {pieces:,} pieces, without the trainer and normalizer settings "
            f"every SentencePiece model carries after its pieces (the file is truncated); {remedy}"
        )
    vocab = config_vocab_size(config)
    highest = max([pieces - 1, *_added_ids(tokenizer_config, added_tokens)])
    if vocab is not None and not highest < vocab <= highest + PADDING_ROWS:
        added = f" and added tokens up to id {highest:,}" if highest >= pieces else ""
        raise BadInput(
            f"{path}: has {pieces:,} pieces{added}, but config.json's vocab_size is {vocab:,}: the file is truncated "
            f"or belongs to another model; copy tokenizer.model again from this model's release"
        )
    _load_with_sentencepiece(path, data, remedy)


def _load_with_sentencepiece(path: Path, data: bytes, remedy: str) -> None:
    """sentencepiece's own check of the model (its pieces' types, byte pieces, the normalizer), where it is
    installed (where it is not, the loader says so next)."""
    try:
        import sentencepiece
    except ImportError:
        return
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception as exc:  # sentencepiece raises RuntimeError, and its bindings others, for a model it refuses
        if "ParseFromArray" in str(exc):
            raise BadInput(f"{path}: is not a SentencePiece model (sentencepiece cannot parse it); {remedy}") from None
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BadInput(f"{path}: sentencepiece cannot load it ({first[:200]}); {remedy}") from None
    for piece in range(processor.get_piece_size()):  # text, as transformers reads each (5.x fails on one that is not)
        try:
            processor.id_to_piece(piece)
        except UnicodeDecodeError:
            raise BadInput(f"{path}: piece {piece:,} is not UTF-8 text (the file is damaged); {remedy}") from None


def check_tokenizer_size(directory: Path, config: dict[str, Any], tokenizer: Any) -> None:
    """The tokenizer transformers built covers at least half of the model's embedding rows: fewer is a tokenizer
    built without its vocabulary (5.x's 3 tokens for a missing tokenizer.model), whose every prompt is a token or two.
    Real checkpoints pad their embedding by a few percent at most (Qwen2.5: 0.2%, DeepSeek-V2: 2.3%)."""
    vocab = config_vocab_size(config)
    size = len(tokenizer)
    if vocab is None or size * 2 >= vocab:
        return
    built = f"has {size:,} tokens, and config.json's vocab_size is {vocab:,}"
    if not any((directory / name).exists() for name in ("tokenizer.json", SENTENCEPIECE_FILE)):
        raise BadInput(
            f"{directory}: holds neither tokenizer.json nor tokenizer.model: the tokenizer transformers builds "
            f"without them {built}; {_DAMAGED}"
        )
    raise BadInput(
        f"{directory}: the tokenizer transformers builds from these files {built}: its vocabulary is damaged; "
        f"{_DAMAGED}"
    )


def config_vocab_size(config: dict[str, Any]) -> int | None:
    """The model's embedding rows as its config.json says (a composite config's text_config), None if not said."""
    for where in (config, config.get("text_config")):
        value = where.get("vocab_size") if isinstance(where, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _added_ids(tokenizer_config: dict[str, Any], added_tokens: Any) -> list[int]:
    """The ids tokenizer_config.json's added_tokens_decoder and added_tokens.json give added tokens."""
    decoder = tokenizer_config.get("added_tokens_decoder")
    ids = [int(key) for key in decoder if re.fullmatch(r"[0-9]{1,10}", key)] if isinstance(decoder, dict) else []
    if isinstance(added_tokens, dict):
        ids += [value for value in added_tokens.values() if isinstance(value, int) and not isinstance(value, bool)]
    return [i for i in ids if 0 <= i < 1 << 31]


# -- SentencePiece's ModelProto, read at its top level -------------------------------------------------------------
# sentencepiece_model.proto: `repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2; NormalizerSpec
# normalizer_spec = 3; SelfTestData self_test_data = 4; NormalizerSpec denormalizer_spec = 5;` (and extensions).
# Every writer puts the fields in number order, so a file cut anywhere loses the settings after the pieces.
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC, _LAST_FIELD, _FIRST_EXTENSION = 1, 2, 3, 5, 200
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MAX_OTHER_FIELDS = 64  # fields besides the pieces: real models have 2 to 4 (and no extensions)


def read_model_proto(data: bytes) -> tuple[int, set[int]]:
    """The number of pieces in a serialized SentencePiece ModelProto and the numbers of its top-level fields, read
    with protobuf's wire format (no protobuf needed); ValueError saying where `data` is not that form."""
    pieces, others, fields, at = 0, 0, set(), 0
    while at < len(data):
        start = at
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if number == 0 or wire not in (_VARINT, _FIXED64, _LENGTH, _FIXED32):
            raise ValueError(f"byte {start:,} is no field")
        if wire == _VARINT:
            _, at = _varint(data, at)
        elif wire == _LENGTH:
            length, at = _varint(data, at)
            at += length
        else:
            at += 8 if wire == _FIXED64 else 4
        if at > len(data):
            raise ValueError(f"the field at byte {start:,} runs past the end of the file, {len(data):,} bytes")
        if number <= _LAST_FIELD and wire != _LENGTH:
            raise ValueError(f"field {number} at byte {start:,} is not a message")
        if _LAST_FIELD < number < _FIRST_EXTENSION:
            raise ValueError(f"byte {start:,} starts field {number}, which SentencePiece models do not have")
        pieces += number == _PIECES
        others += number != _PIECES
        if others > _MAX_OTHER_FIELDS:
            raise ValueError(f"more than {_MAX_OTHER_FIELDS} fields besides its pieces")
        fields.add(number)
    return pieces, fields


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(data):
            raise ValueError(f"a number runs past the end of the file, {len(data):,} bytes")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
    raise ValueError(f"a number at byte {at - 10:,} is longer than 10 bytes")
