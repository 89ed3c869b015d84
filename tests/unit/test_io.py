import os

from atlasfl.results.io import atomic_write_json


def test_an_atomic_write_replaces_whole_and_leaves_the_usual_file_mode(tmp_path):
    path = tmp_path / "out" / "result.json"
    atomic_write_json(path, {"a": 1})
    previous = os.umask(0o027)
    try:
        atomic_write_json(path, {"a": 2})
    finally:
        os.umask(previous)
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert path.stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left
