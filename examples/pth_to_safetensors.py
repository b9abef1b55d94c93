#!/usr/bin/env python3
"""Turn a PyTorch .pth/.pt state dict into a safetensors file that orepa can load.

Usage: python3 pth_to_safetensors.py IN.pt OUT.safetensors [--yolov5-src DIR]

IN may hold a state dict, or a checkpoint dict with the state dict (or a module) under
`state_dict`, `ema` or `model`. Tensors of a state dict keep their dtype (F32, F16, BF16,
F64, I64, ...).

A YOLOv5 checkpoint ({'model': <pickled Model, half>, 'ema': <pickled Model or None>, ...})
holds pickled classes of the YOLOv5 source that saved it (models.yolo.DetectionModel,
models.common.Conv, and the recipe's OREPA blocks): --yolov5-src DIR puts that source
tree first on sys.path so they load. The EMA model is taken when present, else `model`
(as YOLOv5's attempt_load does), converted to float32; its state dict has the names
orepa's yolo::load_model reads (model.N.*).

Needs only torch and the standard library. The header carries {"format": "pt"} as
PyTorch-written files do. OUT is written to a temporary file in the same folder and renamed.
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
    """The flat name -> tensor mapping inside whatever torch.load returned; a pickled
    module's in float32."""
    import torch
    if isinstance(obj, torch.nn.Module):
        return obj.float().state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "ema", "model"):  # YOLOv5: the EMA weights when present
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


def parse_args(argv):
    """(IN, OUT, yolov5_src or None), or None for --help; SystemExit(2) on bad usage."""
    args, src = [], None
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            return None
        if a == "--yolov5-src" or a.startswith("--yolov5-src="):
            if "=" in a:
                src = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                src = argv[i]
            if not src:
                raise SystemExit("pth_to_safetensors: --yolov5-src needs the YOLOv5 source folder")
            if not os.path.isdir(src):
                raise SystemExit("pth_to_safetensors: --yolov5-src %s: not a folder" % src)
        elif a.startswith("-") and a != "-":
            raise SystemExit("pth_to_safetensors: unknown option %s (see --help)" % a)
        else:
            args.append(a)
        i += 1
    if len(args) != 2:
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    return args[0], args[1], src


def load(path, yolov5_src):
    """torch.load of `path` with the YOLOv5 source (if given) importable."""
    import torch
    if yolov5_src:
        sys.path.insert(0, os.path.abspath(yolov5_src))
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except TypeError:  # torch < 1.13 has no weights_only
            return torch.load(path, map_location="cpu")
    except (ModuleNotFoundError, AttributeError) as e:
        # A pickled module whose class cannot be found: a checkpoint of source code that
        # is not importable here.
        hint = ("pass --yolov5-src DIR, the YOLOv5 source tree that saved it (with the "
                "recipe's OREPA blocks)") if not yolov5_src else \
            "is %s the YOLOv5 source tree that saved it, with the recipe's OREPA blocks?" % yolov5_src
        raise SystemExit("pth_to_safetensors: %s holds pickled Python classes that cannot be "
                         "imported (%s): %s" % (path, e, hint))


def main(argv):
    parsed = parse_args(argv)
    if parsed is None:
        print(__doc__.strip())
        return 0
    src_path, out_path, yolov5_src = parsed
    state = find_state_dict(load(src_path, yolov5_src))
    write_safetensors(out_path, state, {"format": "pt"})
    print("pth_to_safetensors: %d tensors -> %s" % (len(state), out_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
