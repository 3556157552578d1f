from pathlib import Path

import pytest

from pipeline.manifest import ManifestError, load_manifest, parse_override

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_all_shipped_manifests_validate():
    from pipeline.train import load_train_manifest

    paths = sorted((REPO / "manifests").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        if path.name.startswith("train-"):
            assert load_train_manifest(path), path  # training manifests have their own schema
        else:
            manifest = load_manifest(path)
            assert manifest.name and manifest.input.path, path


def test_overrides_are_typed_and_applied(tmp_path):
    path = _write(tmp_path, "name: x\ninput: {path: a.jsonl}\n")
    m = load_manifest(path, ["detect.box_threshold=0.2", "input.limit=5", "runtime.executor=local",
                             "adjudicate.base_url=http://127.0.0.1:8000/v1"], out="elsewhere")
    assert m.detect.box_threshold == 0.2 and m.input.limit == 5
    assert m.runtime.executor == "local"
    assert m.adjudicate.base_url == "http://127.0.0.1:8000/v1"
    assert m.output.path == "elsewhere"


@pytest.mark.parametrize("text, override, expected", [
    ("name: x\ninput: {path: a}\ndetect: {bogus: 1}\n", None, "detect.bogus: unknown field"),
    ("name: x\ninput: {path: a}\n", "detect.box_threshold=2", "detect.box_threshold"),
    ("name: x\ninput: {path: a}\n", "input.format=csv", "input.format"),
    ("name: x\n", None, "input: required field is missing"),
    ("name: 'a.b'\ninput: {path: a}\n", None, "name"),
    ("name: x\ninput: {path: a}\n", "adjudicate.judge=openai", "adjudicate.model is required"),
])
def test_invalid_fields_name_the_field(tmp_path, text, override, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        load_manifest(path, [override] if override else [])
    assert expected in str(err.value)


def test_input_format_error_lists_allowed_values(tmp_path):
    path = _write(tmp_path, "name: x\ninput: {path: a, format: csv}\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert "jsonl" in str(err.value) and "webdataset" in str(err.value)


def test_override_syntax_errors():
    with pytest.raises(ManifestError):
        parse_override("no-equals-sign")
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=text:with=signs") == ("a.b", "text:with=signs")


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.yaml")


# --- hostile or broken YAML (issue 9): refused with the file's name, never a traceback ---------

_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
          "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nname: x\ninput: {path: a}\n"


@pytest.mark.parametrize("loader", ["build", "train"])
def test_yaml_aliases_are_refused(tmp_path, loader):
    from pipeline.train import load_train_manifest

    path = _write(tmp_path, _LAUGHS)
    load = load_manifest if loader == "build" else load_train_manifest
    with pytest.raises(ManifestError) as err:
        load(path)
    assert "YAML aliases are not allowed" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("loader", ["build", "train"])
@pytest.mark.parametrize("payload", [b"\x00\x01\x02\xff\xfe binary", "name: caf\xe9\n".encode("latin-1")])
def test_binary_or_non_utf8_manifest(tmp_path, loader, payload):
    from pipeline.train import load_train_manifest

    path = tmp_path / "m.yaml"
    path.write_bytes(payload)
    load = load_manifest if loader == "build" else load_train_manifest
    with pytest.raises(ManifestError) as err:
        load(path)
    assert str(path) in str(err.value) and "UTF-8" in str(err.value)


@pytest.mark.parametrize("loader", ["build", "train"])
def test_duplicate_keys_name_the_key_and_line(tmp_path, loader):
    from pipeline.train import load_train_manifest

    path = _write(tmp_path, "name: x\ninput: {path: a}\ndetect:\n  box_threshold: 0.3\n  box_threshold: 0.4\n")
    load = load_manifest if loader == "build" else load_train_manifest
    with pytest.raises(ManifestError) as err:
        load(path)
    message = str(err.value)
    assert "duplicate key 'box_threshold'" in message and "line 5" in message and str(path) in message


def test_train_manifest_invalid_yaml_and_top_level(tmp_path):
    from pipeline.train import load_train_manifest

    with pytest.raises(ManifestError, match="not valid YAML"):
        load_train_manifest(_write(tmp_path, "a: [unclosed\n"))
    with pytest.raises(ManifestError, match="mapping"):
        load_train_manifest(_write(tmp_path, "- a\n- b\n"))
