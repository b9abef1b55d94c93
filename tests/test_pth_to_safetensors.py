#!/usr/bin/env python3
"""Test of examples/pth_to_safetensors.py: a state dict with every dtype a checkpoint
uses round-trips to the exact bytes; a YOLOv5-style checkpoint (pickled half-precision
modules of a source tree under 'model' and 'ema') converts with --yolov5-src to the EMA
model's float32 state dict, and without it fails naming the flag. Exits 77 (ctest:
skipped) when torch is missing."""
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap

try:
    import torch
except ImportError:
    # Debian's python3-torch lives in the system interpreter, which may not be the first
    # python3 on PATH (pyenv); use it when it has torch.
    system = "/usr/bin/python3"
    if os.path.realpath(sys.executable) != os.path.realpath(system) and os.path.exists(system) and \
            subprocess.run([system, "-c", "import torch"], capture_output=True).returncode == 0:
        sys.exit(subprocess.run([system, os.path.abspath(__file__)]).returncode)
    print("torch is not importable: skipped")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, os.pardir, "examples", "pth_to_safetensors.py")

state = {
    "conv.weight": torch.randn(4, 3, 3, 3),
    "half.weight": torch.randn(5).half(),
    "bf.weight": torch.randn(6).bfloat16(),
    "dbl.weight": torch.randn(2, 2).double(),
    "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
}
with tempfile.TemporaryDirectory() as d:
    src, dst = os.path.join(d, "m.pt"), os.path.join(d, "m.safetensors")
    torch.save({"model": state, "epoch": 3}, src)
    subprocess.run([sys.executable, TOOL, src, dst], check=True)
    raw = open(dst, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0, "data must start 8-aligned"
    assert header["__metadata__"] == {"format": "pt"}
    want = {"conv.weight": "F32", "half.weight": "F16", "bf.weight": "BF16", "dbl.weight": "F64",
            "bn.num_batches_tracked": "I64"}
    for name, dtype in want.items():
        e = header[name]
        assert e["dtype"] == dtype, (name, e)
        assert e["shape"] == list(state[name].shape), (name, e)
        b, end = e["data_offsets"]
        t = state[name].contiguous()
        if dtype == "BF16":
            t = t.view(torch.int16)
        assert raw[8 + n + b:8 + n + end] == t.numpy().tobytes(), name
print("pth_to_safetensors: 5 tensors round-trip exactly")


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], raw[8 + n + b:8 + n + end])
    return out


# A stand-in for the YOLOv5 source tree: a package `models` whose classes get pickled by
# reference (module path + class name), as YOLOv5's are; the checkpoint cannot be loaded
# without that tree on sys.path.
SOURCE = {
    "models/__init__.py": "",
    "models/common.py": """
        import torch.nn as nn

        class Conv(nn.Module):
            def __init__(self, c1, c2, k=1, s=1):
                super().__init__()
                self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
                self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
                self.act = nn.SiLU()
        """,
    "models/yolo.py": """
        import torch
        import torch.nn as nn
        from models.common import Conv

        class Detect(nn.Module):
            def __init__(self, nc, ch):
                super().__init__()
                self.m = nn.ModuleList(nn.Conv2d(c, 3 * (nc + 5), 1) for c in ch)
                self.register_buffer("anchors", torch.rand(len(ch), 3, 2))

        class DetectionModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = nn.Sequential(Conv(3, 8, 3, 2), Conv(8, 16, 3, 2), Detect(2, [16]))
        """,
}

with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "yolov5")
    for rel, text in SOURCE.items():
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        with open(os.path.join(src, rel), "w") as f:
            f.write(textwrap.dedent(text))
    sys.path.insert(0, src)
    from models.yolo import DetectionModel  # noqa: E402
    torch.manual_seed(0)
    model, ema = DetectionModel(), DetectionModel()
    for m in (model, ema):
        for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
            t.data.uniform_(0.5, 1.5)
        m.model[0].bn.num_batches_tracked.fill_(11)
    ckpt = os.path.join(d, "last.pt")
    torch.save({"epoch": 9, "model": model.half(), "ema": ema.half(), "updates": 5}, ckpt)
    sys.path.remove(src)

    out = os.path.join(d, "ckpt.safetensors")
    # Without the source tree the pickled classes cannot load: a message naming the flag.
    r = subprocess.run([sys.executable, TOOL, ckpt, out], capture_output=True, text=True, cwd=d)
    assert r.returncode != 0 and "--yolov5-src" in r.stderr, r.stderr
    assert not os.path.exists(out)
    r = subprocess.run([sys.executable, TOOL, ckpt, out, "--yolov5-src", src], capture_output=True, text=True, cwd=d)
    assert r.returncode == 0, r.stderr
    got = read_safetensors(out)
    want = ema.float().state_dict()
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    assert "model.2.m.0.weight" in got and "model.0.bn.running_var" in got and "model.2.anchors" in got
    for name, t in want.items():
        dtype, shape, data = got[name]
        assert shape == list(t.shape), name
        if t.is_floating_point():  # the EMA's half values, widened to float32 exactly
            assert dtype == "F32", (name, dtype)
            assert data == t.float().contiguous().numpy().tobytes(), name
        else:
            assert dtype == "I64" and data == t.numpy().tobytes(), name
    assert struct.unpack("<q", got["model.0.bn.num_batches_tracked"][2])[0] == 11

    # Once the EMA is stripped (ema None, as YOLOv5's final weights), `model` is taken.
    torch.save({"model": model, "ema": None}, ckpt)
    r = subprocess.run([sys.executable, TOOL, ckpt, out, "--yolov5-src=" + src], capture_output=True, text=True, cwd=d)
    assert r.returncode == 0, r.stderr
    got = read_safetensors(out)
    w = model.float().state_dict()["model.1.conv.weight"]
    assert got["model.1.conv.weight"][2] == w.contiguous().numpy().tobytes()
    bad = subprocess.run([sys.executable, TOOL, ckpt, out, "--yolov5-src", os.path.join(d, "nowhere")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not a folder" in bad.stderr, bad.stderr
print("pth_to_safetensors: a YOLOv5-style checkpoint converts with --yolov5-src (EMA, float32)")
