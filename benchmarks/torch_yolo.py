#!/usr/bin/env python3
"""The PyTorch side of the YOLOv5-OREPA latency comparison (issue 20), in one sitting with
orepa_bench's yolo/ rows.

Builds the deployed (fused) YOLOv5 network in plain PyTorch from a model yaml: every conv
a Conv2d with its bias and SiLU, C3 / Bottleneck / SPPF, nearest upsampling, Concat and
Detect with YOLOv5's decode; eval, torch.no_grad, channels_last.

1. Check: the network built from the fixture's yaml and the deployed weights that the C++
   converter wrote (orepa-convert IN OUT --model YAML) must give the C++ deployed model's
   output (orepa-run --model YAML --mode deploy) on the fixture's inputs.
2. Timing: YOLOv5n-OREPA (models/yolov5n-orepa.yaml, nc 80) at 320 and 640, batch 1, the
   PyTorch model and orepa_bench's yolo/deploy/{fp32,bf16,int8}/<size> rows interleaved
   (rounds of: PyTorch, then orepa_bench), medians over the rounds, and the ratios.
3. Peak memory: the process's peak growth over the first forward at each size (VmHWM
   after minus VmRSS before, free heap returned first), PyTorch's measured here as
   orepa_bench measures its deploy rows' peak_mb.
4. With --ort DIR (a folder where `npm install --ignore-scripts onnxruntime-node` ran):
   the same PyTorch network exported to ONNX (torch.onnx.export, decoded rows out), checked
   against PyTorch's output, and timed by ONNX Runtime's CPU provider (benchmarks/ort_time.js,
   same threads) in the same rounds.

Usage: python3 benchmarks/torch_yolo.py BUILD_DIR [--rounds 3] [--threads 2] [--sizes 320,640] [--ort DIR]
Needs Debian's python3-torch (1.13) and python3-yaml; without them it says so and exits 0.
On Debian, run it with /usr/bin/python3 when another python3 comes first on PATH.
"""
import argparse
import ctypes
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

# glibc's malloc hands PyTorch's large activations back to the system and maps them again
# on a later forward whenever its dynamic mmap threshold lags behind them: PyTorch's 640
# forward then took 25-31 ms here against 18 ms without that churn, depending on what ran
# before. Both sides run with a fixed threshold and no trimming, so PyTorch is timed at its
# best (--default-malloc keeps glibc's defaults).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967295"
if "--default-malloc" not in sys.argv and os.environ.get("GLIBC_TUNABLES") != MALLOC_TUNABLES:
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))

try:
    import numpy as np
    import torch
    import yaml
except ImportError as e:  # the comparison is optional: skip cleanly
    print("torch_yolo.py: skipped, %s (install python3-torch and python3-yaml)" % e)
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "yolov5n_orepa")
sys.path.insert(0, os.path.join(ROOT, "examples"))
from pth_to_safetensors import write_safetensors  # noqa: E402  (the converter's own writer)
NP_TYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path):
    """name -> float32 torch tensor (every dtype orepa writes for these files)."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        arr = np.frombuffer(data[8 + n + a:8 + n + b], dtype=NP_TYPES[h["dtype"]]).reshape(h["shape"])
        out[name] = torch.from_numpy(arr.astype(np.float32))
    return out


def make_divisible(x, d=8):
    return int(math.ceil(x / d) * d)


class ConvAct(torch.nn.Module):
    """A fused conv slot: Conv2d with bias, then SiLU (Detect's convs have no activation)."""

    def __init__(self, c1, c2, k=1, s=1, p=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=True)

    def forward(self, x):
        return torch.nn.functional.silu(self.conv(x))


class Bottleneck(torch.nn.Module):
    def __init__(self, c1, c2, shortcut):
        super().__init__()
        self.cv1, self.cv2 = ConvAct(c1, c2, 1), ConvAct(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(torch.nn.Module):
    def __init__(self, c1, c2, n, shortcut):
        super().__init__()
        c_ = c2 // 2
        self.cv1, self.cv2, self.cv3 = ConvAct(c1, c_), ConvAct(c1, c_), ConvAct(2 * c_, c2)
        self.m = torch.nn.Sequential(*[Bottleneck(c_, c_, shortcut) for _ in range(n)])

    def forward(self, x):
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(torch.nn.Module):
    def __init__(self, c1, c2, k):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = ConvAct(c1, c_), ConvAct(4 * c_, c2)
        self.k = k

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(torch.nn.functional.max_pool2d(y[-1], self.k, 1, self.k // 2))
        return self.cv2(torch.cat(y, 1))


class Detect(torch.nn.Module):
    def __init__(self, nc, anchors, ch):
        super().__init__()
        self.nc, self.nl, self.na, self.no = nc, len(anchors), len(anchors[0]) // 2, nc + 5
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))  # pixels
        self.m = torch.nn.ModuleList(torch.nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs, image_hw):
        z, raw = [], []
        for i, x in enumerate(xs):
            n, _, h, w = x.shape
            r = self.m[i](x).view(n, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(r)
            stride = image_hw[0] / h
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
            grid = torch.stack((gx, gy), 2).view(1, 1, h, w, 2)
            s = r.sigmoid()
            xy = (s[..., :2] * 2 - 0.5 + grid) * stride
            wh = (s[..., 2:4] * 2) ** 2 * self.anchors[i].view(1, self.na, 1, 1, 2)
            z.append(torch.cat((xy, wh, s[..., 4:]), -1).view(n, -1, self.no))
        return torch.cat(z, 1), raw


class FusedYolo(torch.nn.Module):
    """The deployed network of a YOLOv5 model yaml (channels and repeats as YOLOv5 computes them)."""

    def __init__(self, cfg, ch=3):
        super().__init__()
        gd, gw, nc = cfg["depth_multiple"], cfg["width_multiple"], cfg["nc"]
        anchors = cfg["anchors"]
        self.rows, layers, chans = [], [], []
        for i, (f, n, m, args) in enumerate(cfg["backbone"] + cfg["head"]):
            n = max(round(n * gd), 1) if n > 1 else n
            c_in = chans[f] if isinstance(f, int) and chans and f != -1 else (chans[-1] if chans else ch)
            if m in ("Conv", "OREPA", "OREPA_1x1"):
                c2 = make_divisible(args[0] * gw)
                k = args[1] if len(args) > 1 else 1
                s = args[2] if len(args) > 2 else 1
                p = args[3] if len(args) > 3 else None
                layer = ConvAct(c_in, c2, k, s, p)
            elif m == "C3":
                c2 = make_divisible(args[0] * gw)
                layer = C3(c_in, c2, n, args[1] if len(args) > 1 else True)
            elif m == "SPPF":
                c2 = make_divisible(args[0] * gw)
                layer = SPPF(c_in, c2, args[1] if len(args) > 1 else 5)
            elif m == "nn.Upsample":
                c2, layer = c_in, torch.nn.Upsample(None, args[1], args[2])
            elif m == "Concat":
                c2, layer = sum(chans[j] for j in f), None
            elif m == "Detect":
                c2, layer = 0, Detect(nc, anchors, [chans[j] for j in f])
            else:
                raise SystemExit("torch_yolo.py: module %s is not in this builder" % m)
            self.rows.append((f, m))
            layers.append(layer if layer is not None else torch.nn.Identity())
            chans.append(c2)
        self.model = torch.nn.ModuleList(layers)
        self.save = {j % len(layers) for f, _ in self.rows if not isinstance(f, int) for j in f} | \
                    {f % len(layers) for f, _ in self.rows if isinstance(f, int) and f != -1}

    def forward(self, x):
        outs, y = [], x
        for i, ((f, m), layer) in enumerate(zip(self.rows, self.model)):
            if m == "Concat":
                y = torch.cat([y if j == -1 else outs[j] for j in f], 1)
            elif m == "Detect":
                return layer([outs[j] for j in f], x.shape[2:])
            else:
                y = layer(y if f == -1 else outs[f])
            outs.append(y if i in self.save else None)
        raise SystemExit("torch_yolo.py: the yaml has no Detect row")

    def load_deployed(self, weights):
        """Takes every conv's weight and bias from a deployed state dict: the slot prefix plus
        any one name (conv., orepa_reparam., or1x1_reparam., ...), Detect's m.i.* as they are.
        The anchors buffer (grid units, as YOLOv5 keeps it) is not needed: the yaml's pixels are."""
        used = set()
        for name, module in self.named_modules():
            if not isinstance(module, torch.nn.Conv2d):
                continue
            if name.endswith(".conv"):  # a conv slot: "<slot>.<anything>.weight"
                slot = name[:-len("conv")]
                found = [k for k in weights if k.startswith(slot) and k.endswith(".weight")
                         and k[len(slot):].count(".") == 1 and weights[k].dim() == 4]
                if len(found) != 1:
                    raise SystemExit("torch_yolo.py: %d conv weights under %s (expected 1)" % (len(found), slot))
                wk = found[0]
            else:  # Detect's model.24.m.i
                wk = name + ".weight"
            bk = wk[:-len("weight")] + "bias"
            for k in (wk, bk):
                if k not in weights:
                    raise SystemExit("torch_yolo.py: %s is missing" % k)
            if weights[wk].shape != module.weight.shape:
                raise SystemExit("torch_yolo.py: %s is %s, the yaml makes %s" %
                                 (wk, list(weights[wk].shape), list(module.weight.shape)))
            module.weight.data.copy_(weights[wk])
            module.bias.data.copy_(weights[bk])
            used |= {wk, bk}
        left = [k for k in weights if k not in used and not k.endswith(".anchors")]
        if left:
            raise SystemExit("torch_yolo.py: deployed tensors this network has no place for: %s" % left[:5])


def fixture_check():
    """The builder against the fixture: yaml + PyTorch's own deployed state dict must give
    the reference outputs (float64, stored as float32) within the fixture's tolerance."""
    with open(os.path.join(FIXTURE, "model.yaml")) as f:
        net = FusedYolo(yaml.safe_load(f)).eval()
    net.load_deployed(read_safetensors(os.path.join(FIXTURE, "deploy_state.safetensors")))
    io = read_safetensors(os.path.join(FIXTURE, "io.safetensors"))
    with torch.no_grad():
        for x in ("a", "b"):
            pred, raw = net(io["input." + x])
            ref = io["ref64.%s.pred" % x]
            err = float((pred - ref).abs().max() / ref.abs().max())
            print("fixture input.%s: pred within %.1e of the reference (bound 2e-3)" % (x, err))
            if err > 2e-3:
                raise SystemExit("torch_yolo.py: the PyTorch builder does not match the fixture")


def cpp_check(build):
    """The C++ converter's deployed weights in the PyTorch network against the C++ deployed
    model's own output, on the fixture's inputs."""
    yaml_path = os.path.join(FIXTURE, "model.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        fused, out = os.path.join(tmp, "fused.safetensors"), os.path.join(tmp, "out.safetensors")
        inputs = os.path.join(tmp, "inputs.safetensors")
        subprocess.run([os.path.join(build, "examples", "orepa-convert"), os.path.join(FIXTURE, "train_state.safetensors"),
                        fused, "--model", yaml_path], check=True, stdout=subprocess.DEVNULL)
        io = read_safetensors(os.path.join(FIXTURE, "io.safetensors"))
        write_safetensors(inputs, {x: io["input." + x] for x in ("a", "b")}, {"format": "pt"})
        subprocess.run([os.path.join(build, "examples", "orepa-run"), "--model", yaml_path, "--weights",
                        os.path.join(FIXTURE, "train_state.safetensors"), "--input", inputs, "--output", out,
                        "--mode", "deploy"], check=True, stdout=subprocess.DEVNULL)
        with open(yaml_path) as f:
            net = FusedYolo(yaml.safe_load(f)).eval()
        net.load_deployed(read_safetensors(fused))
        cpp = read_safetensors(out)
        with torch.no_grad():
            for x in ("a", "b"):
                pred, _ = net(io["input." + x])
                ref = cpp[x + ".pred"]
                err = float((pred - ref).abs().max() / ref.abs().max())
                print("C++ deployed (orepa-convert --model, orepa-run --model) input.%s: PyTorch within %.1e" % (x, err))
                if err > 1e-3:
                    raise SystemExit("torch_yolo.py: PyTorch on the converted weights differs from the C++ deployed model")


def torch_ms(net, x, seconds):
    """Median milliseconds of one forward, over about `seconds` of repeated runs."""
    times = []
    with torch.no_grad():
        net(x)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 5:
            t = time.perf_counter()
            net(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def process_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise SystemExit("torch_yolo.py: /proc/self/status has no " + key)


def peak_mb(work):
    """Peak memory growth of this process while work() runs, MB: the free heap returned to
    the system, VmHWM reset to VmRSS (/proc/self/clear_refs), then VmHWM after minus VmRSS
    before (orepa_bench's peak_memory_of)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = process_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    work()
    return (process_kb("VmHWM") - before) * 1024 / 1e6


def orepa_ms(build, sizes, seconds):
    """orepa_bench's yolo/deploy, train_form and bare_primitives rows: name -> milliseconds,
    and the oneDNN ISA."""
    sizes_re = "|".join(str(s) for s in sizes)
    run = subprocess.run([os.path.join(build, "benchmarks", "orepa_bench"), "--benchmark_format=json",
                          "--benchmark_min_time=%g" % seconds,
                          "--benchmark_filter=^yolo/((deploy|bare_primitives)/(fp32|bf16|int8)|train_form)/(%s)/"
                          % sizes_re],
                         check=True, stdout=subprocess.PIPE, text=True)
    report = json.loads(run.stdout)
    ok = [b for b in report["benchmarks"] if not b.get("error_occurred")]
    rows = {b["name"].replace("/real_time", ""): b["real_time"] for b in ok}
    peaks = {b["name"].replace("/real_time", ""): b["peak_mb"] for b in ok if "peak_mb" in b}
    return rows, peaks, report["context"].get("onednn_isa", "?")


class OnnxRuntime:
    """The network exported to ONNX per size and run by onnxruntime-node through
    benchmarks/ort_time.js."""

    def __init__(self, node_dir, net, sizes, threads, folder):
        self.env = dict(os.environ, NODE_PATH=os.path.join(os.path.abspath(node_dir), "node_modules"))
        self.script = os.path.join(ROOT, "benchmarks", "ort_time.js")
        self.threads, self.models, self.version = threads, {}, "?"
        pred_only = PredOnly(net)
        for s in sizes:
            x = torch.rand(1, 3, s, s)
            path = os.path.join(folder, "yolo%d.onnx" % s)
            torch.onnx.export(pred_only, x, path, opset_version=13, input_names=["images"], output_names=["pred"])
            self.models[s] = path
            x.numpy().astype(np.float32).tofile(os.path.join(folder, "x.f32"))
            self.node(path, s, os.path.join(folder, "x.f32"), os.path.join(folder, "y.f32"))
            with torch.no_grad():
                want = pred_only(x)
            got = torch.from_numpy(np.fromfile(os.path.join(folder, "y.f32"), dtype=np.float32)).view(want.shape)
            err = float((got - want).abs().max() / want.abs().max())
            print("ONNX Runtime on the exported network at %d: PyTorch within %.1e" % (s, err))
            if err > 1e-4:
                raise SystemExit("torch_yolo.py: ONNX Runtime's output differs from PyTorch's")

    def node(self, *args):
        run = subprocess.run(["node", self.script, args[0], str(args[1]), str(self.threads)] + [str(a) for a in args[2:]],
                             env=self.env, stdout=subprocess.PIPE, text=True)
        if run.returncode != 0:
            raise SystemExit("torch_yolo.py: benchmarks/ort_time.js failed (is onnxruntime-node installed under --ort?)")
        return run.stdout

    def ms(self, size, seconds):
        r = json.loads(self.node(self.models[size], size, seconds))
        self.version = r["version"]
        return r["median_ms"]


class PredOnly(torch.nn.Module):
    """The decoded rows alone (what the ONNX export and orepa's yolo/deploy rows give)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", help="the build folder holding examples/orepa-convert and benchmarks/orepa_bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="320,640")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row and round")
    ap.add_argument("--ort", metavar="DIR", help="a folder holding node_modules/onnxruntime-node: time ONNX Runtime too")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc defaults (see MALLOC_TUNABLES)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    fixture_check()
    cpp_check(a.build)
    sizes = [int(s) for s in a.sizes.split(",")]
    with open(os.path.join(ROOT, "models", "yolov5n-orepa.yaml")) as f:
        net_cfg = yaml.safe_load(f)
    net = FusedYolo(net_cfg).eval().to(memory_format=torch.channels_last)
    torch_rows, orepa_rows, isa = {s: [] for s in sizes}, {}, "?"
    ort_rows, ort, ort_folder = {s: [] for s in sizes}, None, tempfile.TemporaryDirectory()
    if a.ort:
        ort = OnnxRuntime(a.ort, FusedYolo(net_cfg).eval(), sizes, a.threads, ort_folder.name)
    else:
        print("ONNX Runtime: skipped (give --ort DIR, a folder where `npm install --ignore-scripts onnxruntime-node` ran)")
    torch_peak = {}
    for s in sizes:  # before any timing: the first forward at this size
        x = torch.rand(1, 3, s, s).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch_peak[s] = peak_mb(lambda: net(x))
    orepa_peak = {}
    for r in range(a.rounds):
        for s in sizes:
            x = torch.rand(1, 3, s, s).contiguous(memory_format=torch.channels_last)
            torch_rows[s].append(torch_ms(net, x, a.seconds))
            if ort:
                ort_rows[s].append(ort.ms(s, a.seconds))
        rows, peaks, isa = orepa_ms(a.build, sizes, a.seconds)
        for k, v in rows.items():
            orepa_rows.setdefault(k, []).append(v)
        orepa_peak = orepa_peak or peaks  # the first round's: a fresh process, as PyTorch's
        print("round %d of %d done" % (r + 1, a.rounds), file=sys.stderr)
    print("\nYOLOv5n-OREPA (nc 80), batch 1, %d threads, oneDNN ISA %s, medians of %d interleaved rounds (ms), %s"
          % (a.threads, isa, a.rounds, "glibc's default malloc" if a.default_malloc else "GLIBC_TUNABLES=" + MALLOC_TUNABLES))
    ort_name = "ONNX Runtime %s" % (ort.version if ort else "(not run)")
    print("| size | PyTorch %s deployed | %s | orepa train form | orepa fp32 | bf16 | int8 | fp32 / PyTorch "
          "| fp32 / ONNX Runtime | int8 / fp32 speed-up |" % (torch.__version__, ort_name))
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        med = {k: statistics.median(orepa_rows.get("yolo/%s/%d" % (k, s), [float("nan")]))
               for k in ("train_form", "deploy/fp32", "deploy/bf16", "deploy/int8")}
        pt = statistics.median(torch_rows[s])
        rt = statistics.median(ort_rows[s]) if ort_rows[s] else float("nan")
        print("| %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f | %.2fx |" % (
            s, pt, rt, med["train_form"], med["deploy/fp32"], med["deploy/bf16"], med["deploy/int8"],
            med["deploy/fp32"] / pt, med["deploy/fp32"] / rt, med["deploy/fp32"] / med["deploy/int8"]))
    # The yardstick of the bf16 and int8 graphs: their 60 convolutions as bare primitives.
    print("\n| size | bare fp32 | bare bf16 | bare int8 | bf16 graph / its bare primitives "
          "| int8 graph / its bare primitives | bare bf16 speed-up over bare fp32 |")
    print("|---|---|---|---|---|---|---|")
    slower = []
    for s in sizes:
        med = {k: statistics.median(orepa_rows.get("yolo/%s/%d" % (k, s), [float("nan")]))
               for k in ("deploy/bf16", "deploy/int8", "bare_primitives/fp32", "bare_primitives/bf16",
                         "bare_primitives/int8")}
        up = med["bare_primitives/fp32"] / med["bare_primitives/bf16"]
        print("| %d | %.1f | %.1f | %.1f | %.2fx | %.2fx | %.2fx |" % (
            s, med["bare_primitives/fp32"], med["bare_primitives/bf16"], med["bare_primitives/int8"],
            med["deploy/bf16"] / med["bare_primitives/bf16"], med["deploy/int8"] / med["bare_primitives/int8"], up))
        if up < 1:
            slower.append("%d: %.2fx" % (s, up))
    print("\nPeak memory growth of the first forward (MB; the weights loaded before it are not counted)")
    print("| size | PyTorch deployed | orepa fp32 | bf16 | int8 |")
    print("|---|---|---|---|---|")
    for s in sizes:
        print("| %d | %.1f | %s |" % (s, torch_peak[s], " | ".join(
            "%.1f" % orepa_peak["yolo/deploy/%s/%d" % (p, s)] if "yolo/deploy/%s/%d" % (p, s) in orepa_peak else "-"
            for p in ("fp32", "bf16", "int8"))))
    if slower:
        print("\nOn this CPU (oneDNN ISA %s) oneDNN's bf16 convolutions are slower than its fp32 ones (%s):"
              " bf16 deployment cannot beat fp32 here, whatever the graph around them." % (isa, ", ".join(slower)))


if __name__ == "__main__":
    main()
