"""Files a user hands over (refs pickles, YOLO weights) are read without running code they carry."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from datasets.refer import load_refer
from datasets.safe_pickle import UnsafePickleError, load_data_pickle


class WritesMarker:
    """Unpickling this runs ``exec``, which writes the marker file: the payload of a tampered file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def refs_with_payload(marker: Path) -> list:
    return [{"ref_id": 0, "ann_id": 1, "image_id": 2, "split": "val",
             "sentences": [{"sent": "the man", "raw": WritesMarker(marker), "sent_id": 0}]}]


# Python 2 pickles written opcode by opcode (pickletools' documented encodings), as Python 2 wrote
# RefCOCO's refs files: ``str`` is STRING (protocol 0) or SHORT_BINSTRING (protocol 2), ``unicode``
# is UNICODE / BINUNICODE. Python 3's pickle.dumps never writes STRING/SHORT_BINSTRING itself.
def py2_protocol0(obj: object) -> bytes:
    if isinstance(obj, bytes):
        return b"S" + repr(obj.decode("ascii")).encode() + b"\n"
    if isinstance(obj, str):
        return b"V" + obj.encode("raw-unicode-escape") + b"\n"
    if isinstance(obj, bool) or not isinstance(obj, (int, float, list, dict)):
        raise TypeError(obj)
    if isinstance(obj, int):
        return b"I%d\n" % obj
    if isinstance(obj, float):
        return b"F" + repr(obj).encode() + b"\n"
    if isinstance(obj, list):
        return b"(l" + b"".join(py2_protocol0(x) + b"a" for x in obj)
    return b"(d" + b"".join(py2_protocol0(k) + py2_protocol0(v) + b"s" for k, v in obj.items())


def py2_protocol2(obj: object) -> bytes:
    if isinstance(obj, bytes):
        return b"U" + bytes([len(obj)]) + obj
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return b"X" + struct.pack("<I", len(data)) + data
    if isinstance(obj, int) and 0 <= obj < 256:
        return b"K" + bytes([obj])
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, list):
        return b"](" + b"".join(py2_protocol2(x) for x in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(py2_protocol2(k) + py2_protocol2(v) for k, v in obj.items()) + b"u"
    raise TypeError(obj)


PY2_REFS = [
    {b"ref_id": 7, b"ann_id": 70000, b"image_id": 123456, b"split": b"testA", b"category_id": 1,
     b"sentences": [{b"sent": b"man in red", b"raw": "man in red \u00e9", b"tokens": [b"man", b"in", b"red"],
                     b"sent_id": 3}], b"bbox_area": 12.5},
]
#: What Python 3 makes of it: Python 2 ``str`` decoded as ASCII (LISA's default), ``unicode`` as text.
PY3_REFS = [
    {"ref_id": 7, "ann_id": 70000, "image_id": 123456, "split": "testA", "category_id": 1,
     "sentences": [{"sent": "man in red", "raw": "man in red \u00e9", "tokens": ["man", "in", "red"],
                    "sent_id": 3}], "bbox_area": 12.5},
]


@pytest.mark.parametrize("encode", [lambda o: py2_protocol0(o) + b".", lambda o: b"\x80\x02" + py2_protocol2(o) + b"."],
                         ids=["protocol0", "protocol2"])
def test_python2_refs_pickles_load(tmp_path: Path, encode) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(encode(PY2_REFS))
    assert pickle.loads(path.read_bytes()) == PY3_REFS  # the stream is a valid pickle
    assert load_data_pickle(path) == PY3_REFS


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_python3_pickles_of_plain_data_load(tmp_path: Path, protocol: int) -> None:
    data = [{"a": [1, 2.5, "x", b"bytes", None, True], "s": {1, 2}, "t": (1, "two")}]
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_data_pickle(path) == data


def test_refs_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    root = tmp_path / "refer_seg"
    (root / "refcoco").mkdir(parents=True)
    (root / "images/mscoco/images/train2014").mkdir(parents=True)
    refs_path = root / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps(refs_with_payload(marker), protocol=2))
    (root / "refcoco" / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*builtins\.exec"):
        load_refer(tmp_path, dataset="refcoco", split_by="unc", split="val", name="refcoco|unc|val")
    assert not marker.exists()
    pickle.loads(refs_path.read_bytes())  # the plain unpickler runs it: the test's payload is real
    assert marker.read_text() == "ran"


@pytest.fixture(scope="module")
def yolo_module() -> torch.nn.Module:
    from csp.strategies.seg_first import _import_ultralytics_offline

    _import_ultralytics_offline()
    from ultralytics import YOLO

    return YOLO("yolo11n-seg.yaml", task="segment").model  # built from the packaged architecture file


def test_genuine_yolo_checkpoint_loads_weights_only(tmp_path: Path, yolo_module: torch.nn.Module) -> None:
    from ultralytics import YOLO

    from csp.strategies.seg_first import load_yolo_weights_only

    weights = tmp_path / "yolo11n-seg.pt"
    model = YOLO("yolo11n-seg.yaml", task="segment")
    model.model.load_state_dict(yolo_module.state_dict())
    model.save(str(weights))  # ultralytics' own checkpoint format
    loaded = load_yolo_weights_only(str(weights))
    assert loaded.task == "segment" and not loaded.training
    saved = yolo_module.state_dict()
    for name, tensor in loaded.state_dict().items():  # saved in half precision, read back as float
        assert torch.equal(tensor, saved[name].half().float()), name


def test_yolo_checkpoint_payload_is_refused_and_never_runs(tmp_path: Path, yolo_module: torch.nn.Module) -> None:
    from csp.strategies.seg_first import YoloSegmenter, load_yolo_weights_only

    marker = tmp_path / "marker"
    weights = tmp_path / "yolo11n-seg.pt"
    torch.save({"model": yolo_module, "train_args": {}, "extra": WritesMarker(marker)}, weights)
    with pytest.raises(ValueError, match=r"yolo11n-seg\.pt: refused to load this YOLO checkpoint.*official"):
        load_yolo_weights_only(str(weights))
    with pytest.raises(ValueError, match=r"yolo11n-seg\.pt: refused"):  # the path seg_first takes
        YoloSegmenter(str(weights))(Image.new("RGB", (64, 48)))
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # a full unpickle runs it: the test's payload is real
    assert marker.read_text() == "ran"
