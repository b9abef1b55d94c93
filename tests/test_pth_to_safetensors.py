#!/usr/bin/env python3
"""Test of examples/pth_to_safetensors.py: a state dict with every dtype a checkpoint
uses round-trips to the exact bytes. Exits 77 (ctest: skipped) when torch is missing."""
import json
import os
import struct
import subprocess
import sys
import tempfile

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
