#!/usr/bin/env python3
"""Turn a PyTorch .pth/.pt state dict into a safetensors file that orepa can load.

Usage: python3 pth_to_safetensors.py IN.pt OUT.safetensors

IN may hold a state dict, or a checkpoint dict with the state dict (or a module) under
`state_dict`, `model` or `ema` (YOLOv5/YOLOv8 checkpoints store the module under `model`).
Needs only torch and the standard library. Tensors keep their dtype (F32, F16, BF16, F64,
I64, ...); the header carries {"format": "pt"} as PyTorch-written files do. OUT is
written to a temporary file in the same folder and renamed.
"""
import json
import os
import struct
import sys
import tempfile

DTYPES = {  # torch dtype name -> (safetensors dtype, reinterpretation for raw bytes)
    "float32": ("F32", None), "float64": ("F64", None), "float16": ("F16", None),
    "bfloat16": ("BF16", "int16"), "int64": ("I64", None), "int32": ("I32", None),
    "int16": ("I16", None), "int8": ("I8", None), "uint8": ("U8", None), "bool": ("BOOL", None),
}


def find_state_dict(obj):
    """The flat name -> tensor mapping inside whatever torch.load returned."""
    import torch
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "ema"):
            if key in obj and obj[key] is not None:
                return find_state_dict(obj[key])
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise SystemExit("pth_to_safetensors: no state dict found (expected a dict of tensors, "
                     "or one under 'state_dict' / 'model' / 'ema')")


def tensor_bytes(t):
    import torch
    name = str(t.dtype).replace("torch.", "")
    if name not in DTYPES:
        raise SystemExit("pth_to_safetensors: unsupported dtype %s" % name)
    st_dtype, view = DTYPES[name]
    t = t.detach().cpu().contiguous()
    if view:
        t = t.view(getattr(torch, view))
    data = t.numpy().tobytes() if t.numel() else b""
    if sys.byteorder != "little":
        raise SystemExit("pth_to_safetensors: big-endian hosts are not supported")
    return st_dtype, data


def write_safetensors(path, tensors, metadata):
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in tensors:
        dtype, data = tensor_bytes(tensors[name])
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-aligned
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for b in blobs:
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) == 2 else 2
    import torch
    try:
        obj = torch.load(argv[1], map_location="cpu", weights_only=False)
    except TypeError:  # torch < 1.13 has no weights_only
        obj = torch.load(argv[1], map_location="cpu")
    state = find_state_dict(obj)
    write_safetensors(argv[2], state, {"format": "pt"})
    print("pth_to_safetensors: %d tensors -> %s" % (len(state), argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
