"""Reading and decoding one frame: bytes from a file that cannot hang or flood memory, the JPEG
decoder (libjpeg-turbo through torchvision or torchcodec, PIL otherwise), a JPEG's size from its
header before decoding, and the crop / stretch resize to the model's square.
"""
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from files import read_file

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _pick_jpeg_decoder():
    """(name, bytes tensor -> uint8 RGB CHW) of the JPEG decoder frames go through: the first
    that decodes a small JPEG made here (that a decoder imports says nothing: torchcodec loads
    FFmpeg's libraries only when it decodes).

    torchvision's and torchcodec's decode_jpeg give the same pixels at the same speed
    (libjpeg-turbo; BENCHMARKS.md), PIL's takes twice as long. torchvision's is a dependency
    already and comes first; torchvision 0.29 deprecates it in favour of torchcodec's, which
    takes over when a torchvision without it is installed; PIL is the announced last resort
    (describe_jpeg_decoder)."""
    def torchvision_decoder():
        with warnings.catch_warnings():     # torchvision >= 0.29 marks its decoders deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
        return lambda t: decode_jpeg(t, mode=ImageReadMode.RGB)

    def torchcodec_decoder():
        from torchcodec.decoders import decode_jpeg
        return decode_jpeg

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 90)).save(out, "JPEG")
    probe = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)
    for name, make in (("torchvision", torchvision_decoder), ("torchcodec", torchcodec_decoder)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                decode = make()
                if tuple(decode(probe).shape) == (3, 8, 8):
                    return name, decode
        except Exception:          # not installed, or its libraries do not load: the next one
            continue
    return "pil", None


JPEG_DECODER, _jpeg_decode = _pick_jpeg_decoder()


def describe_jpeg_decoder():
    """One line for the logs: which decoder reads the frames, and what to do about PIL."""
    if JPEG_DECODER == "pil":
        return ("JPEG frames are decoded by PIL, about half the speed of libjpeg-turbo: this "
                "torchvision has no decode_jpeg; pip install torchcodec for the fast decoder")
    return f"JPEG frames are decoded by {JPEG_DECODER}'s decode_jpeg (libjpeg-turbo)"


def is_complete_jpeg(data):
    """Start and end markers in place, and a JPEG decoder to hand."""
    return _jpeg_decode is not None and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def decode_rgb(data):
    """uint8 (3, H, W) from encoded bytes. Complete JPEGs go through libjpeg-turbo
    (JPEG_DECODER); anything else (PNG, a JPEG without its end marker) through PIL, which
    rejects truncated files. Every image's size is read from its header first (a JPEG's frame
    header directly, anything else by PIL): one of more than PIL's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS) pixels is refused before it is decoded. 16-bit images are scaled to 8 bits, not clipped."""
    if not data:
        raise ValueError("empty file")
    size = jpeg_size(data) if is_complete_jpeg(data) else None
    if size:                                  # the common case, without PIL's header parse
        _check_pixels(*size)
        return _decode_jpeg(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))     # reads the header only
    except Image.DecompressionBombWarning as e:
        raise Image.DecompressionBombError(str(e)) from None
    except UnidentifiedImageError:
        raise ValueError("not an image format PIL can read") from None
    with image:
        _check_pixels(*image.size)
        if is_complete_jpeg(data):
            return _decode_jpeg(data)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):     # 16-bit grey: keep the range
            grey = (np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return torch.from_numpy(grey)[None].expand(3, -1, -1).contiguous()
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # frame headers (not DHT/JPG/DAC)


def jpeg_size(data):
    """(width, height) from a JPEG's frame header, or None if none is found before the
    image data (then PIL reads the header)."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                    # fill byte
            i += 1
            continue
        if marker in SOF_MARKERS:
            return (int.from_bytes(data[i + 7:i + 9], "big"),
                    int.from_bytes(data[i + 5:i + 7], "big"))
        if marker == 0xDA:                    # image data before any frame header
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:     # markers without a length field
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_pixels(width, height):
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise Image.DecompressionBombError(f"{width}x{height} pixels, more than the "
                                           f"{limit} PIL accepts (decompression bomb?)")


def _decode_jpeg(data):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _jpeg_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError as e:
        raise ValueError(f"JPEG decode failed: {str(e).splitlines()[-1][:200]}") from None


def resize_frame(img, image_size, resize="crop"):
    """The centre square of the frame ("crop") or the whole frame ("stretch") to S x S;
    bilinear with antialiasing, on uint8. Cropping before resizing resamples only the pixels
    that are kept (about 2x faster than resizing the short side to S and cropping after)."""
    h, w = img.shape[-2:]
    if resize != "stretch":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[:, top:top + side, left:left + side]
    if img.shape[-2:] != (image_size, image_size):
        img = F.interpolate(img[None], size=(image_size, image_size), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return img                  # possibly a view: batching copies it once, into the batch


def load_frame(path, image_size, resize="crop"):
    """uint8 (3, S, S) frame from a file, resized as resize_frame says. Raises DECODE_ERRORS."""
    return resize_frame(decode_rgb(read_file(path)), image_size, resize)


def luminance(rgb):
    """uint8 (..., 1, H, W) grey images of uint8 (..., 3, H, W) ones, as PIL's convert("L")
    computes them (ITU-R 601-2 weights in 16-bit fixed point, rounded)."""
    r, g, b = rgb.to(torch.int32).unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)
