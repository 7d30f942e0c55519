import pytest

from tasks.tokenization import load_tokenizer


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
