"""A DICOM series as one scan: the de-identified slices stacked, in position order, into one
multi-frame DICOM. Pure: no Django.

The import decodes (and so de-identifies) every slice on its own first; ``stack_series``
only ever sees those de-identified copies. The stack keeps the first slice's whitelisted
attributes, drops the per-slice ones (position, slice location, instance number: the
positions are returned instead, for the scan row), and refuses slices that cannot share one
pixel description (size, bit depth, signedness, photometric interpretation, rescale) with a
reason, so the caller can import them one by one instead.

The model sees the representative slice (the middle one, as ``decode_scan`` picks for any
multi-frame file), so the loop works unchanged; the viewer pages through every slice.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from ml_backend.data.decode import DecodedScan

# What every slice of one stack must share (a multi-frame DICOM has one of each).
SHARED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
          "SamplesPerPixel", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept")
# A slice's own per-frame functional groups (an enhanced single-frame slice) describe its
# one frame, not the stack's: its rescale, window and spacing are also at the top level of
# its de-identified copy (``decode._frame_functional_groups``), where SHARED compares them.
PER_SLICE = ("ImagePositionPatient", "SliceLocation", "InstanceNumber",
             "PerFrameFunctionalGroupsSequence")


class SeriesError(Exception):
    """The slices cannot be stacked; ``str(exc)`` says why."""


@dataclass
class SeriesStack:
    data: bytes                    # a de-identified multi-frame DICOM, slices in order
    digest: str                    # of the slices' own content hashes: same slices, same stack
    positions: list[float | None]  # per frame, mm along the series (None where unknown)
    spacing: float | None          # median distance between neighbouring positions


def slice_order(slices: list[DecodedScan]) -> list[int]:
    """Indices of ``slices`` in series order: by position along the series where every slice
    has one, else by instance number, else as given."""
    positions = [s.meta.get("slice_position") for s in slices]
    if all(p is not None for p in positions):
        return sorted(range(len(slices)), key=lambda i: (positions[i], i))
    numbers = [s.meta.get("instance_number") for s in slices]
    if all(n is not None for n in numbers):
        return sorted(range(len(slices)), key=lambda i: (numbers[i], i))
    return list(range(len(slices)))


def stack_series(slices: list[DecodedScan], digests: list[str]) -> SeriesStack:
    """Stack the de-identified slices (``DecodedScan.stored_bytes`` of single-frame DICOM)
    of one series. ``digests``: each slice's content hash, for the stack's own. Each slice's
    ``stored_bytes`` is let go (emptied) once it is stacked; after a ``SeriesError`` the
    caller imports the slices from their sources."""
    import numpy as np
    import pydicom

    if len(slices) < 2:
        raise SeriesError("a series needs at least 2 slices to be stacked")
    order = slice_order(slices)
    known = [round(float(p), 3) for p in (s.meta.get("slice_position") for s in slices)
             if p is not None]
    if len(set(known)) < len(known):
        shared = len(known) - len(set(known)) + 1 if len(set(known)) == 1 else None
        raise SeriesError(
            (f"all {shared} of its slices share one position" if shared else
             "some of its slices share a position") + " along the series (several "
            "acquisitions, echoes or time points in one series?): a volume needs one slice "
            "per position")
    # One slice at a time: its pixel data joins the stack and its copy is let go, so a
    # series of N slices costs about 3 x its size at the end (the joined frames, the file
    # written, its bytes), not 8 x (docs/benchmarks.md, "PACS pull and push").
    first = None
    pixels = bytearray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in order:
            piece = slices[index]
            if not piece.stored_bytes or piece.file_format != "dicom":
                raise SeriesError("only DICOM slices can be stacked")
            ds = pydicom.dcmread(io.BytesIO(piece.stored_bytes))
            piece.stored_bytes = b""         # stacked: the slice's own copy is not needed
            if "PixelData" not in ds:
                raise SeriesError("only slices of integer pixel data can be stacked (a slice "
                                  "holds float pixel data)")
            if int(ds.get("NumberOfFrames", 1) or 1) != 1:
                raise SeriesError("a slice is itself a multi-frame image")
            if first is None:
                first, length = ds, len(ds.PixelData)
            else:
                for keyword in SHARED:
                    if str(ds.get(keyword, "")) != str(first.get(keyword, "")):
                        raise SeriesError(f"its slices differ in {keyword}")
                if len(ds.PixelData) != length:
                    raise SeriesError("its slices' pixel data differ in length")
            pixels += ds.PixelData
            del ds
    stacked = first
    for keyword in PER_SLICE:
        if keyword in stacked:
            delattr(stacked, keyword)
    stacked.NumberOfFrames = len(order)
    stacked.PixelData = bytes(pixels)
    del pixels
    if hasattr(stacked, "_pixel_array"):
        stacked._pixel_array = None
    buffer = io.BytesIO()
    stacked.save_as(buffer, enforce_file_format=True)
    del stacked, first
    data = buffer.getvalue()
    buffer.close()
    positions = [slices[i].meta.get("slice_position") for i in order]
    known = [p for p in positions if p is not None]
    spacing = float(np.median(np.abs(np.diff(known)))) if len(known) > 1 else None
    digest = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return SeriesStack(data=data, digest=digest,
                       positions=positions, spacing=spacing if spacing else None)
