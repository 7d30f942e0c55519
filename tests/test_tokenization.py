import pytest

from tasks.data.tokenization import load_tokenizer, save_vocabulary, sub_vocabulary, tokenizer_tokens, vocab_beside


def test_known_sentence_gives_known_ids():
    tok = load_tokenizer()
    assert tok.vocab_size == 30522
    ids = tok("What color is the cat?")["input_ids"]
    assert ids == [101, 2054, 3609, 2003, 1996, 4937, 1029, 102]


def test_vocab_file_path_and_missing(tmp_path):
    tok = load_tokenizer()
    (tmp_path / "vocab.txt").write_text("\n".join(tok.convert_ids_to_tokens(list(range(2000)))) + "\n")
    small = load_tokenizer(tmp_path / "vocab.txt")
    assert small.vocab_size == 2000
    assert small.convert_tokens_to_ids("[MASK]") == tok.convert_tokens_to_ids("[MASK]")
    with pytest.raises(FileNotFoundError, match="vocab"):
        load_tokenizer(tmp_path / "nowhere")


def test_vocab_without_special_tokens_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match=r"vocab\.txt is not a BERT WordPiece vocabulary \(no \[PAD\]"):
        load_tokenizer(tmp_path)


def test_sub_vocabulary_tokenizes_as_the_full_one(tmp_path):
    texts = ["What color is the hexagon?", "There are more crosses in the left image than stars.",
             "Is the small grey diamond above the unbelievably large octagon?"]
    full = load_tokenizer()
    tokens = sub_vocabulary(texts, full)
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's id order is kept
    assert len(tokens) < 60
    small = load_tokenizer(save_vocabulary(tokens, tmp_path))
    for text in texts:
        assert (small.convert_ids_to_tokens(small(text)["input_ids"])
                == full.convert_ids_to_tokens(full(text)["input_ids"]))
    assert small("a zebra")["input_ids"][2] == small.unk_token_id  # outside the texts: unknown
    assert tokenizer_tokens(small) == tokens


def test_vocab_beside_weights(tmp_path):
    assert vocab_beside(None) is None and vocab_beside(tmp_path) is None
    save_vocabulary(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert vocab_beside(tmp_path) == vocab_beside(tmp_path / "model.safetensors") == tmp_path / "vocab.txt"
