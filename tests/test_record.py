from stages.record import MAX_KEY_LEN, make_key, sanitize_key
from stages.write import ShardWriter


def test_keys_are_webdataset_safe():
    assert sanitize_key("coco/2017.val image#3") == "coco-2017-val-image-3"
    assert make_key("coco2017", "000000391895", 0) == "coco2017-000000391895-0"


def test_long_ids_give_short_distinct_keys_that_fit_a_tar_name(tmp_path):
    a = make_key("dataset", "x" * 300 + "a")
    b = make_key("dataset", "x" * 300 + "b")
    assert a != b and len(a) <= MAX_KEY_LEN and len(b) <= MAX_KEY_LEN
    assert a == make_key("dataset", "x" * 300 + "a")  # deterministic
    assert "." not in a and "/" not in a
    # a shard with such a key can be written (USTAR names are limited to 100 bytes)
    from test_write import _ok_row

    writer = ShardWriter(tmp_path, "demo")
    writer.write_shard(0, [_ok_row(0, a), _ok_row(1, b)])
    assert writer.is_complete(0)
