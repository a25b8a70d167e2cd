"""notellm2.data_shards.images.open_image on decompression bombs: our limit, one message, no PIL noise."""
import struct
import warnings
import zlib

import pytest

from notellm2.data_shards.images import BadImage, open_image


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries no pixel data (what a bomb's header looks like)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w, h", [(8000, 6000), (12000, 10000), (20000, 10000)])
def test_oversized_images_are_rejected_quietly_with_the_limit_named(w, h):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own DecompressionBombWarning must not leak out
        with pytest.raises(BadImage, match="limit of 40000000"):
            open_image(png_header(w, h), max_pixels=40_000_000)


def test_size_under_the_limit_is_decoded_not_rejected_for_size():
    with pytest.raises(BadImage) as e:
        open_image(png_header(100, 100))  # the header passes; the missing pixels then fail to decode
    assert "limit" not in str(e.value) and "undecodable" in str(e.value)
