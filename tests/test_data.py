import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interp.data import HOLDOUT_EVERY, builtin_corpus, iter_texts, iter_token_batches
from interp.models import byte_tokenizer


def test_builtin_corpus_is_english_text_and_split():
    docs = builtin_corpus()
    assert sum(len(d) for d in docs) > 1_000_000
    train, test = list(iter_texts("builtin", "train")), list(iter_texts("builtin", "test"))
    assert set(train).isdisjoint(test)
    assert len(test) == pytest.approx(len(docs) / HOLDOUT_EVERY, rel=0.1)


def test_local_files_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json doc"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet doc"]}), tmp_path / "c.parquet")
    docs = [d for split in ("train", "test") for d in iter_texts(str(tmp_path), split)]
    assert sorted(docs) == ["first paragraph", "json doc", "parquet doc", "second paragraph"]
    assert list(iter_texts(str(tmp_path / "b.jsonl"))) == ["json doc"]


def test_missing_path_and_bad_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_texts(str(tmp_path / "nope.txt")))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match="no field 'text'"):
        list(iter_texts(str(tmp_path / "d.jsonl")))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        list(iter_token_batches(byte_tokenizer(), iter_texts(str(tmp_path / "empty.txt")), 8, 2))


def test_token_batches_pack_with_bos_and_mask():
    tok = byte_tokenizer()
    batches = list(iter_token_batches(tok, iter(["abcdefghij"] * 10), context_size=8, batch_size=3))
    assert len(batches) == 5  # 10 docs x 11 tokens (text + EOS) = 110 tokens -> 15 rows of 7
    for batch in batches:
        assert batch.tokens_bt.shape == (3, 8)
        assert (batch.tokens_bt[:, 0] == tok.bos_token_id).all()
        assert not batch.mask_bt[:, 0].any() and batch.mask_bt[:, 1:].all()
    flat = batches[0].tokens_bt[:, 1:].flatten().tolist()
    assert tok.decode(flat[:10]) == "abcdefghij" and flat[10] == tok.eos_token_id


def test_hub_dataset_offline_gives_clear_error():
    with pytest.raises(RuntimeError, match="Offline, use 'builtin'"):
        next(iter_texts("no-such-org/no-such-dataset"))
