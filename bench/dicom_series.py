"""Synthetic CT series made from pydicom's real CT slice (``CT_small.dcm``): several patients,
one study and one series each, slices 5 mm apart with distinct pixels and fake identifiers
(``PAT-NNNN``, ``Doe^PatientN``). Used by the series / split / PACS tests and by
``bench.label_latency --series``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data


def write_series(folder, *, patients: int, slices: int, seed: int = 0,
                 first_patient: int = 0) -> dict[str, dict]:
    """CT_small.dcm rewritten as ``patients`` patients with one study and one series of
    ``slices`` slices each (distinct pixels, positions 5 mm apart). Returns the identities
    written, by file name."""
    source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(seed)
    written = {}
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(first_patient, first_patient + patients):
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for s in range(slices):
            ds = pydicom.dcmread(source)
            pixels = ds.pixel_array.astype(np.int16) + rng.integers(0, 40, ds.pixel_array.shape,
                                                                    dtype=np.int16)
            ds.PixelData = pixels.tobytes()
            ds.PatientID = f"PAT-{p:04d}"
            ds.PatientName = f"Doe^Patient{p}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.SeriesNumber, ds.InstanceNumber = 3, s + 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-158.0, -179.0, -20.0 + 5.0 * s]
            ds.SliceThickness = 5
            name = f"p{p:03d}-s{s:02d}.dcm"
            buffer = io.BytesIO()
            ds.save_as(buffer)
            (folder / name).write_bytes(buffer.getvalue())
            written[name] = {"patient": ds.PatientID, "study": study, "series": series,
                             "sop": ds.SOPInstanceUID, "slice": s}
    return written
