import pytest

from prunekit.core.errors import CheckpointError, ConfigError, read_json


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe not utf-8", "is not valid JSON"),
    (b"{not json", "is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),  # deeper than the parser's recursion limit
    (b"[1, 2]", "holds a JSON list, not an object"),
])
def test_damaged_files_are_one_error_naming_the_file_and_what_to_do(tmp_path, content, needle):
    path = tmp_path / "thing.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as info:
        read_json(path, "record", "remove it", mapping=True)
    assert str(path) in str(info.value) and str(info.value).endswith("remove it")


def test_a_good_file_reads_and_the_error_class_is_the_callers(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text('{"a": [1, 2]}')
    assert read_json(path, "record", "x", mapping=True) == {"a": [1, 2]}
    with pytest.raises(ConfigError, match="cannot be read"):
        read_json(tmp_path / "missing.json", "result", "write it first", error=ConfigError)
