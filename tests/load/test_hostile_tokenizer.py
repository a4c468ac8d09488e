"""Damaged tokenizer files, and a hub cache's refs/main, in every form a disk can hold them: each is one line, exit 2,
before any weight is read, at a bounded cost in memory.

OneKE ships its tokenizer as SentencePiece's tokenizer.model alone. Transformers 5 builds a 3-token tokenizer from an
empty, missing or unreadable one, and one of the pieces before the cut from a truncated one: the run would end with
exit 0 and every answer empty. The truth for what a complete model is: sentencepiece and protobuf themselves.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DEEPKE_DIR, put_in_hub_cache
from hostile import replaced
from tiny_checkpoint import build_tiny_llama, sentencepiece_vocab_size, train_sentencepiece

from oneke_plan.core.errors import BadInput
from oneke_plan.io.limits import MAX_SENTENCEPIECE_BYTES
from oneke_plan.load.loader import load_tokenizer
from oneke_plan.load.tokenizer_files import read_model_proto
from oneke_plan.plan.model_source import resolve_model

BIN = Path(sys.executable).parent
REPO = "zjunlp/OneKE"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA in OneKE's release layout: tokenizer.model alone, config.json's vocab_size its piece count."""
    return build_tiny_llama(tmp_path_factory.mktemp("sp"), tokenizer="sentencepiece", dtype=torch.float32)


@pytest.fixture()
def model(sp_model: Path, tmp_path: Path) -> Path:
    """A fresh copy of sp_model, to damage."""
    return Path(shutil.copytree(sp_model, tmp_path / "model"))


def refusal(model_dir: Path | str) -> str:
    """load_tokenizer's one-line BadInput for `model_dir`."""
    with pytest.raises(BadInput) as caught:
        load_tokenizer(resolve_model(str(model_dir)))
    message = str(caught.value)
    assert "\n" not in message and "tiktoken" not in message, message
    return message


def set_vocab_size(model_dir: Path, vocab: int) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))


def pieces(model_dir: Path) -> int:
    return sentencepiece_vocab_size((model_dir / "tokenizer.model").read_bytes())


# -- the file itself ------------------------------------------------------------------------------------------------
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (lambda p: p.write_bytes(b""), "tokenizer.model: is empty;"),
    "fifo": (replaced(lambda p: os.mkfifo(p)), "tokenizer.model: is a FIFO (named pipe), not a regular file"),
    "dev-zero": (
        replaced(lambda p: p.symlink_to("/dev/zero")),
        "tokenizer.model: is a symbolic link to /dev/zero, a character device, not a regular file",
    ),
    "folder": (replaced(lambda p: p.mkdir()), "tokenizer.model: is a folder, not a regular file"),
    "dangling-link": (
        replaced(lambda p: p.symlink_to("gone.model")),
        "tokenizer.model: is a symbolic link to gone.model, which does not exist",
    ),
    "huge-sparse": (  # sparse: no disk taken
        lambda p: os.truncate(p, 4 * 2**30),
        f"tokenizer.model: larger than {MAX_SENTENCEPIECE_BYTES // 2**20}.00 MiB (it is 4.00 GiB)",
    ),
    "random-bytes": (
        lambda p: p.write_bytes(random.Random(0).randbytes(p.stat().st_size)),
        "tokenizer.model: is not a SentencePiece model (not its protobuf form",
    ),
    "text": (lambda p: p.write_text("<html>404</html>\n"), "tokenizer.model: is not a SentencePiece model"),
    "half": (
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "tokenizer.model: is",  # cut inside a piece (not protobuf) or between two (cut short): either says so
    ),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_tokenizer_model_is_one_line_naming_it(model: Path, kind: str, no_hang: None) -> None:
    damage, expected = DAMAGE[kind]
    damage(model / "tokenizer.model")
    message = refusal(model)
    assert message.startswith(f"{model}/") and expected in message, message
    assert "copy the tokenizer files again" in message


def test_a_missing_tokenizer_model_never_gives_a_tokenizer_smaller_than_the_vocabulary(model: Path) -> None:
    """5.x builds a 3-token tokenizer without it, 4.x fails inside LlamaTokenizer: both are one line."""
    (model / "tokenizer.model").unlink()
    message = refusal(model)
    assert message.startswith(f"{model}:") and "tokenizer" in message


def test_each_cut_that_protobuf_reads_is_refused_as_cut_short(sp_model: Path) -> None:
    """A file cut between two pieces is a valid protobuf message of fewer pieces: what transformers 5 loads as a
    smaller tokenizer. protobuf's own parse (the schema transformers and sentencepiece use) finds every such cut."""
    sentencepiece_model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    from google.protobuf.message import DecodeError

    data = (sp_model / "tokenizer.model").read_bytes()
    whole = sentencepiece_model_pb2.ModelProto.FromString(data)
    assert read_model_proto(data) == (len(whole.pieces), {1, 2, 3}) and len(whole.pieces) == pieces(sp_model)
    readable = 0
    # every cut near the ends (the header fields, the two settings blocks), a fixed sample between: each check parses
    # the whole prefix twice, so all ~30,000 cuts would cost 40 s for no other kind of cut
    ends = {*range(1, 256), *range(len(data) - 256, len(data))}
    for cut in sorted(ends | set(random.Random(0).sample(range(1, len(data)), 600))):
        try:
            part = sentencepiece_model_pb2.ModelProto.FromString(data[:cut])
        except DecodeError:
            with pytest.raises(ValueError):
                read_model_proto(data[:cut])
            continue
        readable += 1
        assert not (part.HasField("trainer_spec") and part.HasField("normalizer_spec"))
        assert read_model_proto(data[:cut])[0] == len(part.pieces)
        assert not {2, 3} <= read_model_proto(data[:cut])[1]
    assert readable > 50  # piece boundaries among them: the cuts transformers would have loaded


def test_the_wire_reader_agrees_with_protobuf_and_refuses_what_no_model_holds() -> None:
    sentencepiece_model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = sentencepiece_model_pb2.ModelProto()
    for text in ("<unk>", "a", "b"):
        proto.pieces.add(piece=text, score=0.0)
    proto.trainer_spec.vocab_size = 3
    proto.normalizer_spec.add_dummy_prefix = True
    data = proto.SerializeToString()
    assert read_model_proto(data) == (3, {1, 2, 3})
    with pytest.raises(ValueError, match="more than 64 fields besides its pieces"):
        read_model_proto(data + b"\x22\x00" * 65)  # self_test_data, 65 times: no model has that
    with pytest.raises(ValueError, match="field 6, which SentencePiece models do not have"):
        read_model_proto(data + b"\x32\x00")
    with pytest.raises(ValueError, match="field 2 at byte"):
        read_model_proto(data + b"\x10\x01")  # trainer_spec as a number
    assert read_model_proto(data + b"\xc0\x0c\x01") == (3, {1, 2, 3, 200})  # an extension: allowed


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.47, 0.9, 0.999])
def test_truncated_at_a_piece_boundary_is_cut_short(model: Path, fraction: float) -> None:
    data = (model / "tokenizer.model").read_bytes()
    cut = _piece_boundary(data, int(len(data) * fraction))
    (model / "tokenizer.model").write_bytes(data[:cut])
    message = refusal(model)
    assert "tokenizer.model: is cut short: it ends after" in message and "(the file is truncated)" in message


def _piece_boundary(data: bytes, near: int) -> int:
    """The end of the first top-level field at or after byte `near` (a tag byte of 0x0a, then a one- or two-byte
    length, as the tiny model's pieces are)."""
    at = 0
    while True:
        length, size = (data[at + 1], 2) if data[at + 1] < 0x80 else ((data[at + 1] & 0x7F) | data[at + 2] << 7, 3)
        at += size + length
        if at >= near:
            return at


@pytest.mark.parametrize("seed", range(40))
def test_bytes_changed_anywhere_load_whole_or_are_one_line(model: Path, seed: int) -> None:
    """A few bytes changed at random (fixed seeds): a piece's text or score changed is still a SentencePiece model of
    every piece (no checksum can tell), anything else is refused naming the file (a piece that is no UTF-8 text
    too, which transformers 5 fails on deep in its conversion); never a smaller tokenizer, never a traceback."""
    rng = random.Random(seed)
    data = bytearray((model / "tokenizer.model").read_bytes())
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    (model / "tokenizer.model").write_bytes(bytes(data))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    try:
        tokenizer = load_tokenizer(resolve_model(str(model)))
    except BadInput as exc:
        assert str(exc).startswith(f"{model}/tokenizer.model: ") and "\n" not in str(exc), exc
        return
    assert len(tokenizer) == vocab


def test_a_tiktoken_file_is_left_to_transformers(model: Path) -> None:
    """Ranks in tiktoken's text form (Llama-3's original tokenizer.model) are no damaged SentencePiece model:
    transformers 5 converts them with tiktoken, and says so where it is not installed."""
    (model / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(BadInput) as caught:  # no tiktoken here; transformers 4 has no tiktoken route for LLaMA
        load_tokenizer(resolve_model(str(model)))
    assert "SentencePiece" not in str(caught.value) and str(caught.value).startswith(f"{model}: ")


def test_another_models_tokenizer_model_is_refused_by_its_piece_count(model: Path) -> None:
    """A complete SentencePiece model of another vocabulary (trained here on a tenth of the vocabulary)."""
    other = train_sentencepiece(vocab_size=600)
    (model / "tokenizer.model").write_bytes(other)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    message = refusal(model)
    assert f"has {sentencepiece_vocab_size(other):,} pieces, but config.json's vocab_size is {vocab:,}" in message
    assert "belongs to another model" in message


def test_more_pieces_than_embedding_rows_is_refused(model: Path) -> None:
    set_vocab_size(model, pieces(model) - 1)
    assert f"has {pieces(model):,} pieces, but config.json's vocab_size is {pieces(model) - 1:,}" in refusal(model)


def test_padding_and_added_tokens_fill_the_embedding(model: Path) -> None:
    """Rows past the pieces are fine when added tokens name them, or as padding of fewer than 128 rows."""
    count = pieces(model)
    set_vocab_size(model, count + 127)
    assert len(load_tokenizer(resolve_model(str(model)))) == count
    set_vocab_size(model, count + 128)
    assert f"has {count:,} pieces, but" in refusal(model)
    (model / "added_tokens.json").write_text(json.dumps({"<pad>": count, "<sep>": count + 1}))
    tokenizer = load_tokenizer(resolve_model(str(model)))
    assert tokenizer.convert_tokens_to_ids("<sep>") == count + 1
    set_vocab_size(model, count + 2 + 128)
    assert f"has {count:,} pieces and added tokens up to id {count + 1:,}" in refusal(model)


def test_the_good_file_loads_with_every_piece(model: Path) -> None:
    tokenizer = load_tokenizer(resolve_model(str(model)))
    assert len(tokenizer) == pieces(model) == json.loads((model / "config.json").read_text())["vocab_size"]


def test_a_tokenizer_json_of_another_smaller_model_is_refused(tmp_path: Path) -> None:
    """Whatever files transformers builds the tokenizer from: one of fewer than half the embedding's rows is not
    this model's (here a byte-level BPE tokenizer.json for a config of 4x its vocabulary)."""
    folder = build_tiny_llama(tmp_path / "bpe", dtype=torch.float32)
    tokens = len(load_tokenizer(resolve_model(str(folder))))
    set_vocab_size(folder, 4 * tokens)
    message = refusal(folder)
    assert f"the tokenizer transformers builds from these files has {tokens:,} tokens" in message


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "generation_config.json"]
)
def test_every_tokenizer_file_is_a_regular_file(tmp_path: Path, name: str, no_hang: None) -> None:
    folder = build_tiny_llama(tmp_path / "bpe", dtype=torch.float32)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    assert f"{name}: is a FIFO (named pipe), not a regular file" in refusal(folder)


# -- in a hub cache: the snapshot's links into blobs/ ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["empty", "fifo", "dev-zero", "folder", "random-bytes", "half"])
def test_a_damaged_blob_in_the_hub_cache_is_one_line(
    sp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, no_hang: None
) -> None:
    snapshot = put_in_hub_cache(Path(shutil.copytree(sp_model, tmp_path / "staged")), tmp_path / "hf", REPO)
    blob = (snapshot / "tokenizer.model").resolve()
    DAMAGE[kind][0](blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    message = refusal(REPO)
    assert message.startswith(f"{snapshot}/tokenizer.model: is"), message
    if kind in ("fifo", "dev-zero", "folder"):
        assert f"a symbolic link to {blob if kind != 'dev-zero' else '/dev/zero'}" in message


# -- through oneke-run: nothing loaded, nothing written ---------------------------------------------------------------
def run_damaged(model_dir: Path, tmp_path: Path, env: dict[str, str], model_arg: str) -> subprocess.CompletedProcess:
    """oneke-plan, then the weights removed (a run that reached them would say so), then oneke-run."""
    profile = tmp_path / "p.yaml"
    subprocess.run(
        [BIN / "oneke-plan", model_arg, "--max-new-tokens", "4", "-o", profile],
        check=True, capture_output=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    for weights in model_dir.glob("*.safetensors"):
        weights.resolve().unlink()
    return subprocess.run(
        [BIN / "oneke-run", "--profile", profile, "--model", model_arg, "--input", DEEPKE_DIR / "NER" / "test.json",
         "--output", tmp_path / "out.jsonl", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip


def assert_refused(ran: subprocess.CompletedProcess, where: Path, expected: str, tmp_path: Path) -> None:
    assert ran.returncode == 2, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in ran.stderr, ran.stderr
    assert lines[0].startswith(f"oneke-run: error: {where}/tokenizer.model: is "), lines[0]
    assert expected in lines[0] and "safetensors" not in lines[0], lines[0]
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.journal").exists()


@pytest.mark.parametrize("kind", ["empty", "half"])
def test_oneke_run_refuses_a_damaged_tokenizer_model_before_the_weights(
    sp_model: Path, tmp_path: Path, kind: str
) -> None:
    folder = Path(shutil.copytree(sp_model, tmp_path / "model"))
    DAMAGE[kind][0](folder / "tokenizer.model")
    ran = run_damaged(folder, tmp_path, dict(os.environ), str(folder))
    assert_refused(ran, folder, DAMAGE[kind][1].removeprefix("tokenizer.model: "), tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_oneke_run_refuses_a_damaged_hub_cache_blob_before_the_weights(
    sp_model: Path, tmp_path: Path, kind: str
) -> None:
    snapshot = put_in_hub_cache(Path(shutil.copytree(sp_model, tmp_path / "staged")), tmp_path / "hf", REPO)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    DAMAGE[kind][0]((snapshot / "tokenizer.model").resolve())
    ran = run_damaged(snapshot, tmp_path, env, REPO)
    assert_refused(ran, snapshot, "not a regular file", tmp_path)


def test_a_big_tokenizer_model_beside_a_tokenizer_json_is_not_bounded(tmp_path: Path) -> None:
    """transformers 4.x saves a GGUF-loaded tokenizer with the whole GGUF (94 MiB for SmolLM2) as tokenizer.model
    beside the tokenizer.json the tokenizer is built from: only a tokenizer.model that is read is bounded."""
    from oneke_plan.load.tokenizer_files import check_tokenizer_files

    os.truncate(_touch(tmp_path / "tokenizer.model"), MAX_SENTENCEPIECE_BYTES + 1)  # sparse: no disk taken
    with pytest.raises(BadInput, match="tokenizer.model: larger than"):
        check_tokenizer_files(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    check_tokenizer_files(tmp_path)


def _touch(path: Path) -> Path:
    path.touch()
    return path
