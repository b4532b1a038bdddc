import io
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from operators.base import image_from_row
from operators.decode import DecodeConfig, DecodeImages
from schemas.columns import REJECT_REASON
from tests.conftest import encode, photo
from vesl.core.images import decode_image
from vesl.fixtures.hostile import bomb_png


def exif_rotated_jpeg() -> bytes:
    """A 60 x 20 JPEG whose EXIF says 'rotate 90': it displays as 20 x 60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(60, 20), "JPEG", exif=exif.tobytes())


def valid_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    palette = photo(30, 20).convert("P", palette=Image.Palette.ADAPTIVE)
    frames = [photo(24, 16, seed=i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen = Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50))
    return {
        "rgb_jpeg": (encode(photo(64, 48)), (64, 48)),
        "grayscale": (encode(photo(32, 32, mode="L"), "PNG"), (32, 32)),
        "cmyk": (encode(photo(40, 30).convert("CMYK"), "JPEG"), (40, 30)),
        "sixteen_bit": (encode(sixteen, "PNG"), (40, 30)),
        "palette_transparency": (encode(palette, "PNG", transparency=0), (30, 20)),
        "rgba": (encode(photo(20, 20, mode="RGBA"), "PNG"), (20, 20)),
        "animated_gif": (gif.getvalue(), (24, 16)),
        "webp": (encode(photo(50, 40), "WEBP"), (50, 40)),
        "exif_rotated": (exif_rotated_jpeg(), (20, 60)),
        "one_pixel": (encode(photo(1, 1), "PNG"), (1, 1)),
        "very_wide": (encode(photo(2000, 3), "PNG"), (2000, 3)),
    }


@pytest.mark.parametrize("name", list(valid_images()))
def test_valid_images_of_every_kind_decode_to_rgb(name):
    data, (width, height) = valid_images()[name]
    image, w, h = decode_image(data, max_side=1024)
    assert (w, h) == (width, height)
    assert image.mode == "RGB"
    assert max(image.size) <= DecodeConfig().working_max_side


def test_exif_orientation_is_applied_to_pixels():
    image, w, h = decode_image(exif_rotated_jpeg(), max_side=1024)
    assert image.size == (20, 60) and (w, h) == (20, 60)


def test_working_copy_is_a_uniform_rescale():
    image, w, h = decode_image(encode(photo(3000, 1000)), max_side=600)
    assert (w, h) == (3000, 1000) and image.size == (600, 200)


def test_decompression_bomb_is_refused_from_the_header_without_decoding():
    data = bomb_png()
    assert len(data) < 1_000_000
    start = time.perf_counter()
    table = DecodeImages()(pa.table({"image_id": ["bomb"], "image_bytes": [data]}))
    assert time.perf_counter() - start < 2.0  # decoding 900 MP would take far longer
    assert table.column(REJECT_REASON).to_pylist() == ["decompression_bomb"]
    assert "900000000 pixels" in table.column("reject_message")[0].as_py()


def test_broken_inputs_become_specific_rejects(tmp_path):
    good = encode(photo(64, 48))
    (tmp_path / "good.jpg").write_bytes(good)
    cases = {
        "truncated": (good[: len(good) // 2], None),
        "zero": (b"", None),
        "random": (np.random.default_rng(0).bytes(5000), None),
        "html": (b"<!doctype html><html><body>404</body></html>", None),
        "missing": (None, str(tmp_path / "nope.jpg")),
        "bad_scheme": (None, "nosuchproto://bucket/x.jpg"),
        "nothing": (None, None),
        "good_path": (None, str(tmp_path / "good.jpg")),
    }
    table = pa.table({
        "image_id": list(cases),
        "image_bytes": pa.array([c[0] for c in cases.values()], pa.large_binary()),
        "image_uri": [c[1] for c in cases.values()],
    })
    out = DecodeImages()(table)
    reasons = dict(zip(out.column("image_id").to_pylist(), out.column(REJECT_REASON).to_pylist()))
    assert reasons == {
        "truncated": "corrupt_image", "zero": "empty_file", "random": "not_an_image", "html": "not_an_image",
        "missing": "not_found", "bad_scheme": "fetch_failed", "nothing": "missing_input", "good_path": None,
    }
    row = out.column("image_id").to_pylist().index("good_path")
    assert image_from_row(out, row).shape == (48, 64, 3)
    assert out.column("width")[row].as_py() == 64


def test_embed_images_auto_keeps_the_bytes_only_of_images_without_a_location(tmp_path):
    """'auto' (the default): inline bytes have no place to be read again, so they stay; a file's do not
    (its location does). true keeps every image, false none."""
    data = encode(photo(32, 16))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    batch = pa.table({"image_id": ["inline", "file", "tar"], "image_bytes": [data, None, data],
                      "image_location": [None, str(path), str(path)], "image_offset": [None, None, 0],
                      "image_length": [None, None, len(data)]})
    kept = {mode: DecodeImages(DecodeConfig(embed_images=mode))(batch).column("image_bytes").to_pylist()
            for mode in ("auto", True, False)}
    assert kept["auto"] == [data, None, None]
    assert kept[True] == [data, data, data]
    assert kept[False] == [None, None, None]
    assert DecodeConfig().embed_images == "auto"


def test_decode_reads_a_tar_member_by_its_byte_range(tmp_path):
    """A row with only a location reads exactly the member's bytes (no scan of the tar); a range past the
    file's end is a fetch_failed reject naming the location."""
    data = encode(photo(40, 24))
    blob = b"x" * 1000 + data + b"y" * 50
    (tmp_path / "shard.tar").write_bytes(blob)
    batch = pa.table({"image_id": ["ok", "cut"], "image_location": [str(tmp_path / "shard.tar")] * 2,
                      "image_offset": [1000, len(blob) - 10], "image_length": [len(data), len(data)]})
    out = DecodeImages()(batch)
    assert out.column("width").to_pylist()[0] == 40 and out.column("reject_reason").to_pylist()[0] is None
    assert out.column("reject_reason").to_pylist()[1] == "fetch_failed"
    assert "shard.tar" in out.column("reject_message").to_pylist()[1]


def test_network_fetches_get_a_timeout_unless_one_is_set():
    from vesl.core.images import with_timeout

    assert with_timeout("https://x/a.jpg", {}, 5.0)["client_kwargs"]["timeout"].total == 5.0
    s3 = with_timeout("s3://b/a.jpg", {"config_kwargs": {"read_timeout": 1}}, 5.0)["config_kwargs"]
    assert s3 == {"read_timeout": 1, "connect_timeout": 5.0}
    assert with_timeout("/local/a.jpg", {}, 5.0) == {}


def test_reject_messages_say_what_happened_without_object_reprs(tmp_path):
    """http(s) failures carry the HTTP status (fsspec hides it behind a FileNotFoundError), a refused
    connection is `fetch_failed`, not `not_found`, and no message shows '<_io.BytesIO object at 0x...>'."""
    import http.server
    import socket
    import threading

    from schemas.columns import REJECT_MESSAGE

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if "busy" in self.path:
                self.send_error(503, "Service Unavailable")
            else:
                super().do_GET()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    (tmp_path / "ok.jpg").write_bytes(encode(photo(8, 8)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    base = f"http://127.0.0.1:{server.server_address[1]}"
    uris = {"gone": f"{base}/gone.jpg", "busy": f"{base}/busy.jpg", "refused": f"http://127.0.0.1:{closed}/a.jpg",
            "ok": f"{base}/ok.jpg", "text": None}
    table = pa.table({"image_id": list(uris), "image_uri": list(uris.values()),
                      "image_bytes": pa.array([None] * 4 + [b"hello, not an image"], pa.large_binary())})
    try:
        out = DecodeImages(DecodeConfig(fetch_timeout_s=10))(table)
    finally:
        server.shutdown()
    got = {i: (r, m) for i, r, m in zip(out.column("image_id").to_pylist(), out.column(REJECT_REASON).to_pylist(),
                                        out.column(REJECT_MESSAGE).to_pylist())}
    assert got["gone"] == ("not_found", f"HTTP 404 File not found: {uris['gone']}")
    assert got["busy"] == ("fetch_failed", f"HTTP 503 Service Unavailable: {uris['busy']}")
    assert got["refused"][0] == "fetch_failed" and "Cannot connect to host" in got["refused"][1]
    assert got["ok"] == (None, None)
    assert got["text"][0] == "not_an_image" and " object at 0x" not in got["text"][1]
    assert got["text"][1] == "UnidentifiedImageError: cannot identify image file"
