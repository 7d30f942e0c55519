"""The incremental JSON reader: same values as json.load whatever the buffer size, errors that locate."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractor.jsonstream import (
    DataFormatError,
    iter_array,
    iter_jsonl,
    iter_members,
    iter_object,
    load_json,
    write_json_atomic,
    write_text_atomic,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(json_values, max_size=6), indent=st.sampled_from([None, 0, 2]),
       chunk=st.integers(1, 9))
def test_iter_array_equals_json_load_for_any_buffer_size(tmp_path_factory, items, indent, chunk):
    path = tmp_path_factory.mktemp("js") / "a.json"
    path.write_text(json.dumps(items, indent=indent), encoding="utf-8")
    assert list(iter_array(path, chunk_chars=chunk)) == items


def test_numbers_split_by_the_buffer_are_read_whole(tmp_path):
    path = tmp_path / "n.json"
    path.write_text("[123456789, -0.5e-3, 42]")
    for chunk in range(1, 12):
        assert list(iter_array(path, chunk_chars=chunk)) == [123456789, -0.0005, 42]


def test_escapes_and_unicode_across_chunks(tmp_path):
    items = ["a\\\"b", "caf\u00e9 \u2603", "tab\there", {"k\u00ff": ["\U0001F600"]}]
    path = tmp_path / "u.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    for chunk in (1, 2, 3, 5):
        assert list(iter_array(path, chunk_chars=chunk)) == items


def test_iter_object_yields_members_in_order(tmp_path):
    path = tmp_path / "o.json"
    path.write_text('\ufeff {"b": 1, "a": {"x": [1, 2]}, "c": "s"} \n', encoding="utf-8")
    assert list(iter_object(path, chunk_chars=3)) == [("b", 1), ("a", {"x": [1, 2]}), ("c", "s")]


def test_iter_members_streams_only_the_named_arrays_and_skips_unread_elements(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"info": {"v": 1}, "images": [1, 2, 3], "annotations": [{"a": 1}, {"a": 2}]}))
    seen = []
    for key, value in iter_members(path, stream={"images", "annotations"}, chunk_chars=4):
        if key == "info":
            seen.append(("info", value))
        elif key == "images":
            seen.append(("images", next(value)))  # read one, leave the rest
        else:
            seen.append(("annotations", list(value)))
    assert seen == [("info", {"v": 1}), ("images", 1), ("annotations", [{"a": 1}, {"a": 2}])]


def test_empty_containers(tmp_path):
    (tmp_path / "a.json").write_text("[ ]")
    (tmp_path / "o.json").write_text("{}")
    assert list(iter_array(tmp_path / "a.json")) == []
    assert list(iter_object(tmp_path / "o.json")) == []


@pytest.mark.parametrize("text, where", [
    ('[{"a": 1}, {"a": 2,}, {"a": 3}]', "record 1"),
    ('[{"a": 1}, {"a": 2} {"a": 3}]', "record 1: expected ',' or ']'"),
    ('[1, 2', "end of file"),
    ('[1, 2] x', "unexpected data after the top-level value"),
    ('{"a": 1}', "expected a top-level JSON array"),
])
def test_malformed_array_errors_name_file_and_record(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataFormatError) as err:
        list(iter_array(path, chunk_chars=4))
    assert str(path) in str(err.value) and where in str(err.value)


def test_malformed_member_error_names_the_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"q1": {"a": 1}, "q2": {"a": tru}}')
    with pytest.raises(DataFormatError, match=r"bad.json: key 'q2': invalid JSON"):
        list(iter_object(path))
    path.write_text('{"x": 1, "annotations": [{"a": 1}, {"a": ]}')
    with pytest.raises(DataFormatError, match=r"'annotations' record 1: invalid JSON"):
        for _, v in iter_members(path, stream={"annotations"}):
            if not isinstance(v, int):
                list(v)


def test_not_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'["caf\xe9"]')
    with pytest.raises(DataFormatError, match="not UTF-8"):
        list(iter_array(path))
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_json(path)


def test_jsonl_and_load_json_errors_locate(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    it = iter_jsonl(path)
    assert next(it) == (1, {"a": 1}) and next(it) == (3, {"a": 2})
    with pytest.raises(DataFormatError, match=r"d.jsonl: line 4: invalid JSON"):
        next(it)
    (tmp_path / "x.json").write_text('{"a": [1,\n 2,,]}')
    with pytest.raises(DataFormatError, match=r"x.json: invalid JSON: .* \(line 2 column 4\)"):
        load_json(tmp_path / "x.json")


def test_atomic_writers_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(path, {"b": [1, 2], "é": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": [1, 2], "é": "ü"}
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["out.json"]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("text, read, message", [
    (DEEP, lambda p: list(iter_array(p)), r"d.json: record 0: invalid JSON: nested too deeply to parse"),
    ('{"q": ' + DEEP + "}", lambda p: list(iter_object(p)), r"d.json: key 'q': invalid JSON: nested too deeply"),
    ('{"a": [' + DEEP + "]}", lambda p: [list(v) for _, v in iter_members(p, stream={"a"})],
     r"d.json: 'a' record 0: invalid JSON: nested too deeply"),
    ('{"a": 1}\n' + DEEP + "\n", lambda p: list(iter_jsonl(p)), r"d.json: line 2: invalid JSON: nested too deeply"),
    (DEEP, load_json, r"d.json: invalid JSON: nested too deeply to parse$"),
    ("[" + "7" * 5000 + "]", load_json, r"d.json: invalid JSON: Exceeds the limit \(4300 digits\)"),
    ("[" + "7" * 5000 + "]", lambda p: list(iter_array(p)), r"d.json: record 0: invalid JSON: Exceeds the limit"),
])
def test_too_deep_or_too_long_values_are_data_errors_naming_the_file(tmp_path, text, read, message):
    """json raises RecursionError / a bare ValueError on these, not JSONDecodeError; both name the file."""
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message):
        read(path)


def test_pre_work_json_check_reports_deep_nesting_in_one_line(tmp_path):
    from pipeline.base import json_check
    path = tmp_path / "corpus.json"
    path.write_text(DEEP)
    with pytest.raises(DataFormatError, match=r"^\S*corpus.json: invalid JSON: nested too deeply to parse$"):
        json_check("[")(path)
