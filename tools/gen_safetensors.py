#!/usr/bin/python3
"""PyTorch-side fixtures and checks for batchnorm's safetensors support (include/batchnorm/io/safetensors.hpp).

Run with Debian's /usr/bin/python3 (python3-torch 1.13). Two modes:

  gen_safetensors.py [--out DIR]
      Trains small torch BatchNorm layers for a few steps and writes their state_dict()s
      as .safetensors files into DIR (default: tests/fixtures/safetensors/), each with a
      JSON sidecar <name>.json holding the expected values (every number exact: float16,
      bfloat16 and float32 values are exactly representable as JSON doubles), plus eval-
      and train-mode forward results for bn2d_f32 so the C++ test can check PyTorch's
      semantics on the loaded state. Deterministic (fixed seeds).

  gen_safetensors.py --check FILE [--prefix P] [--expect SIDECAR.json]
      Reads FILE (written by our C++ library), strips prefix P from its keys and loads the
      result into a torch.nn.BatchNorm2d with load_state_dict(strict=True). With --expect,
      compares every tensor with the sidecar exactly and, when the sidecar has an "eval"
      block, runs the eval forward in torch and compares with the C++ output. Exits 1 on
      any mismatch, printing what differs.

NOTE: the `safetensors` Python package is NOT available here (Debian has python3-torch but
no python3-safetensors), so this script writes and reads the format itself, following its
specification (https://github.com/huggingface/safetensors, "Format"):
  - 8 bytes: N, an unsigned little-endian 64-bit integer, the size of the header;
  - N bytes: a UTF-8 JSON object {"<name>": {"dtype": "F32", "shape": [..],
    "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}, padded with spaces
    (the reference writer pads to a multiple of 8 so that the data is aligned);
  - the data buffer: each tensor little-endian, row-major, at [begin, end) of the buffer;
    the tensors tile the buffer with no gap, overlap or trailing byte.
The writer mirrors safetensors.torch.save_file (data ordered by dtype size, largest first,
then by name; compact JSON). The reader applies the reference implementation's checks.
"""

import argparse
import copy
import json
import os
import sys

import torch

DTYPES = {  # safetensors name -> (torch dtype, bytes per element)
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
NAME_OF = {v[0]: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000


def tensor_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def to_safetensors_bytes(tensors, metadata=None):
    """tensors: dict name -> torch.Tensor. Returns the bytes of a .safetensors file."""
    assert sys.byteorder == "little", "this writer assumes a little-endian host"
    order = sorted(tensors, key=lambda k: (-DTYPES[NAME_OF[tensors[k].dtype]][1], k))
    header, chunks, at = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in order:
        t = tensors[name]
        data = tensor_bytes(t)
        header[name] = {"dtype": NAME_OF[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(data)]}
        chunks.append(data)
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def from_safetensors_bytes(blob):
    """Parses and validates a .safetensors file; returns (dict name -> tensor, metadata)."""
    if len(blob) < 8:
        raise ValueError("truncated: shorter than the 8-byte header length")
    n = int.from_bytes(blob[:8], "little")
    if n > MAX_HEADER or 8 + n > len(blob):
        raise ValueError(f"bad header length {n} for a file of {len(blob)} bytes")
    text = blob[8:8 + n]
    if not text.startswith(b"{"):
        raise ValueError("header does not start with '{'")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate keys in header: {keys}")
        return dict(pairs)

    header = json.loads(text.decode("utf-8"), object_pairs_hook=no_duplicates)
    metadata = header.pop("__metadata__", None) or {}
    data = blob[8 + n:]
    spans, tensors = [], {}
    for name, info in header.items():
        if set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{name}: fields {sorted(info)}")
        dtype, size = DTYPES[info["dtype"]]
        shape = info["shape"]
        begin, end = info["data_offsets"]
        numel = 1
        for e in shape:
            if not isinstance(e, int) or e < 0:
                raise ValueError(f"{name}: bad shape {shape}")
            numel *= e
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(data)):
            raise ValueError(f"{name}: bad data_offsets {info['data_offsets']}")
        if end - begin != numel * size:
            raise ValueError(f"{name}: {end - begin} bytes for {info['dtype']} {shape}")
        spans.append((begin, end, name))
        raw = bytearray(data[begin:end])
        if dtype == torch.bfloat16:
            t = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16) if raw else torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape).clone()
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise ValueError(f"{name}: data_offsets begin {begin}, expected {at} (gap or overlap)")
        at = end
    if at != len(data):
        raise ValueError(f"data buffer has {len(data)} bytes, tensors cover {at}")
    return tensors, metadata


def values(t):
    return t.double().reshape(-1).tolist() if t.dim() else int(t)


def sidecar(state, prefix, extra=None):
    out = {"prefix": prefix, "tensors": {}}
    for k, t in state.items():
        if k.startswith(prefix):
            out["tensors"][k] = {"dtype": NAME_OF[t.dtype], "shape": list(t.shape), "values": values(t)}
    if extra:
        out.update(extra)
    return out


def train(module, steps, shape, seed):
    """A few SGD steps so that weight, bias and the running statistics all move away from their init."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    for step in range(steps):
        x = torch.randn(shape, generator=g, dtype=torch.float64).float() * (1.5 + step) + 0.25 * step
        loss = (module(x) * torch.linspace(-1, 2, x.numel()).reshape(x.shape)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module


def write(out_dir, name, state, prefix, extra=None):
    blob = to_safetensors_bytes(state, metadata={"format": "pt"})
    with open(os.path.join(out_dir, name + ".safetensors"), "wb") as f:
        f.write(blob)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(sidecar(state, prefix, extra), f, indent=1)
        f.write("\n")
    # Read back with the validating reader and load into torch, as a self-check.
    back, _ = from_safetensors_bytes(blob)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    print(f"wrote {name}.safetensors ({len(blob)} bytes, {len(state)} tensors) and {name}.json")


def generate(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    torch.set_grad_enabled(True)

    # 1. A lone BatchNorm2d(4), no prefix, float32; with forward results for semantic checks.
    bn = train(torch.nn.BatchNorm2d(4), 3, (6, 4, 5, 5), seed=1)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn((2, 4, 3, 3), generator=g, dtype=torch.float64) * 2 + 0.5).float()
    state = copy.deepcopy(bn.state_dict())
    with torch.no_grad():
        y_eval = bn.eval()(x)
        probe = copy.deepcopy(bn).train()
        y_train = probe(x)
    extra = {
        "eval": {"shape": list(x.shape), "x": values(x), "y": values(y_eval)},
        "train": {"shape": list(x.shape), "x": values(x), "y": values(y_train), "momentum": 0.1, "eps": 1e-5,
                  "running_mean": values(probe.running_mean), "running_var": values(probe.running_var),
                  "num_batches_tracked": int(probe.num_batches_tracked)},
    }
    write(out_dir, "bn2d_f32", state, "", extra)

    # 2. The same layer in float64, float16 and bfloat16 (dtypes the loader converts from).
    write(out_dir, "bn2d_f64", copy.deepcopy(bn).double().state_dict(), "")
    write(out_dir, "bn2d_f16", copy.deepcopy(bn).half().state_dict(), "")
    write(out_dir, "bn2d_bf16", copy.deepcopy(bn).bfloat16().state_dict(), "")

    # 3. A small model: the layers are found by prefix among other tensors.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 5, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(5)
            self.conv2 = torch.nn.Conv2d(5, 3, 1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(3, affine=False, momentum=None)

        def forward(self, x):
            return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    net = train(Net(), 4, (4, 3, 6, 6), seed=3)
    state = net.state_dict()
    write(out_dir, "model_f32", state, "bn1.")
    with open(os.path.join(out_dir, "model_f32.json")) as f:
        side = json.load(f)
    side["bn2"] = sidecar(state, "bn2.")
    with open(os.path.join(out_dir, "model_f32.json"), "w") as f:
        json.dump(side, f, indent=1)
        f.write("\n")


def check(path, prefix, expect_path):
    with open(path, "rb") as f:
        tensors, metadata = from_safetensors_bytes(f.read())
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "weight" not in sd and "running_mean" not in sd:
        sys.exit(f"FAIL: no BatchNorm tensors with prefix '{prefix}' in {path}: {sorted(tensors)}")
    c = (sd.get("weight") if "weight" in sd else sd["running_mean"]).shape[0]
    dtype = (sd.get("weight") if "weight" in sd else sd["running_mean"]).dtype
    bn = torch.nn.BatchNorm2d(c, affine="weight" in sd, track_running_stats="running_mean" in sd).to(dtype)
    result = bn.load_state_dict(sd, strict=True)  # raises on missing/unexpected keys or shape mismatch
    print(f"loaded {len(sd)} tensors from {path} into torch.nn.BatchNorm2d({c}, affine={bn.affine}, "
          f"track_running_stats={bn.track_running_stats}) [{dtype}] with load_state_dict(strict=True): {result}")
    if metadata:
        print(f"metadata: {metadata}")
    if not expect_path:
        return
    with open(expect_path) as f:
        expect = json.load(f)
    bad = 0
    got = bn.state_dict()
    for key, e in expect["tensors"].items():
        name = key[len(prefix):]
        t = got[name]
        want = torch.tensor(e["values"], dtype=torch.float64).reshape(e["shape"]) if e["shape"] else e["values"]
        ok = (int(t) == want) if not e["shape"] else (list(t.shape) == e["shape"] and torch.equal(t.double(), want))
        print(f"  {name}: {'equal' if ok else 'DIFFERENT'}")
        bad += not ok
    if "eval" in expect:
        ev = expect["eval"]
        x = torch.tensor(ev["x"], dtype=torch.float64).reshape(ev["shape"]).to(dtype)
        with torch.no_grad():
            y = bn.eval()(x).double().reshape(-1)
        want = torch.tensor(ev["y"], dtype=torch.float64)
        err = float((y - want).abs().max() / want.abs().max().clamp(min=1))
        ok = err <= 1e-6
        print(f"  eval forward in torch vs C++ output: max relative error {err:.3g} ({'ok' if ok else 'TOO LARGE'}, "
              f"tolerance 1e-6)")
        bad += not ok
    if bad:
        sys.exit(f"FAIL: {bad} mismatches")
    print("OK")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "safetensors"))
    p.add_argument("--check", metavar="FILE", help="load FILE (written by the C++ library) into torch")
    p.add_argument("--prefix", default="", help="key prefix of the layer in FILE (e.g. bn1.)")
    p.add_argument("--expect", metavar="JSON", help="sidecar with the expected values (written by the C++ test)")
    a = p.parse_args()
    if a.check:
        check(a.check, a.prefix, a.expect)
    else:
        generate(os.path.normpath(a.out))


if __name__ == "__main__":
    main()
