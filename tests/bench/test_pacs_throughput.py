"""bench.pacs_throughput's pure parts: the studies it stores in Orthanc are valid DICOM that
carry the synthetic identifiers (which the product's decoder reads and its stored copy drops),
and the docs' table renders from a saved result. (The run itself needs Orthanc and
PostgreSQL: `python -m bench.pacs_throughput --studies 10`.)"""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom

from bench import pacs_throughput as bench


def _images(count: int, side: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (side, side), dtype=np.uint8) for _ in range(count)]


def test_a_built_study_is_dicom_with_the_identity_in_its_headers():
    images = _images(2)
    identity = bench.synthetic_identity(7)
    datasets = bench.build_study(images, identity, modality="CR", body_part="CHEST")
    read = [pydicom.dcmread(io.BytesIO(bench.dicom_bytes(ds))) for ds in datasets]
    assert len({ds.SOPInstanceUID for ds in read}) == 2
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in read}) == 1
    for ds, image in zip(read, images):
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == bench.SOP_CLASSES["CR"]
        assert (ds.Modality, ds.BodyPartExamined, ds.BitsStored) == ("CR", "CHEST", 12)
        for keyword, value in identity.items():
            assert str(ds.get(keyword)) == value, keyword
        assert np.array_equal(ds.pixel_array, image.astype(np.uint16) * 16)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "InstitutionName", "ReferringPhysicianName"):
        assert identity[keyword]
    # a different study is a different patient; the same number, the same patient
    assert bench.synthetic_identity(8)["PatientID"] != identity["PatientID"]
    assert bench.synthetic_identity(7) == identity


def test_the_product_reads_a_built_instance_and_its_copy_drops_the_identity():
    from ml_backend.data.decode import decode_scan

    identity = bench.synthetic_identity(11)
    # a series has one matrix size: a slice of another size is resized to the first's
    ds, other = bench.build_study(_images(1, side=32) + _images(1, side=24), identity,
                                  modality="MR", body_part="BRAIN")
    assert (other.Rows, other.Columns) == (32, 32)
    assert other.ImagePositionPatient[2] - ds.ImagePositionPatient[2] == 5.0
    decoded = decode_scan(bench.dicom_bytes(ds), salt="test-salt", linkage=True)
    assert (decoded.width, decoded.height) == (32, 32)
    assert decoded.meta["modality"] == "MR" and decoded.meta["body_part"] == "BRAIN"
    assert decoded.linkage["PatientName"] == identity["PatientName"]
    assert decoded.linkage["StudyInstanceUID"] == str(ds.StudyInstanceUID)
    for value in (identity["PatientName"], identity["PatientID"], identity["AccessionNumber"],
                  identity["InstitutionName"], str(ds.StudyInstanceUID)):
        assert value.encode() not in decoded.stored_bytes


def test_studies_alternate_classes_and_never_share_a_scan():
    images = _images(12, side=8)
    labels = ["normal", "pneumonia"] * 6
    studies = bench.make_studies(images, labels, count=4, instances=2, start=0, modality="CR",
                                 body_part="CHEST", side=0)
    later = bench.make_studies(images, labels, count=2, instances=2, start=4, modality="CR",
                               body_part="CHEST", side=0)
    assert [s["label"] for s in studies] == ["normal", "pneumonia", "normal", "pneumonia"]
    pixels = [pydicom.dcmread(io.BytesIO(f)).PixelData for s in studies + later
              for f in s["files"]]
    assert len(set(pixels)) == len(pixels) == 12
    assert len({s["identity"]["PatientID"] for s in studies + later}) == 6


def test_the_table_renders_a_saved_result(tmp_path, capsys):
    row = {"studies": 50, "instances": 100, "mb": 0.3, "build_s": 0.5,
           "orthanc_ingest": {"seconds": 1.0, "instances_per_s": 100.0},
           "pull": {"seconds": 5.0, "studies_per_s": 10.0, "instances_per_s": 20.0,
                    "phases_s": {"qido": 0.1, "wado": 0.9, "import": 3.5, "other": 0.5}},
           "pull_again": {"seconds": 0.25},
           "push": {"reports_per_s": 40.0, "phases_s": {"results": 0.2, "linkage": 0.1,
                                                        "build_sr": 0.8, "stow": 1.2,
                                                        "other": 0.2}},
           "push_again": {"seconds": 0.05},
           "checks": {"db_clean": True, "push_logs_clean": False, "ok": False}}
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"command": "python -m bench.pacs_throughput", "rows": [row]}))
    assert bench.main(["--table", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| | 50 studies |" in table
    assert "| instances (MB) | 100 (0.3 MB) |" in table
    assert "| pull: studies/s | 10.0 |" in table and "| pull: instances/s | 20.0 |" in table
    assert "| pull: QIDO-RS / WADO-RS / import / rest s | 0.10 / 0.90 / 3.50 / 0.50 |" in table
    assert "| pull again (nothing new): wall s | 0.25 |" in table
    assert ("| push: results / linkage / SR build / STOW-RS / rest s | "
            "0.20 / 0.10 / 0.80 / 1.20 / 0.20 |") in table
    assert "| checks | FAILED: push_logs_clean |" in table
    # a size without a push (a run that stopped) shows dashes, not a crash
    del row["push"]
    path.write_text(json.dumps({"rows": [row]}))
    assert "| push: reports/s | – |" in bench.table(json.loads(path.read_text()))
