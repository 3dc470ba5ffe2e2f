#!/usr/bin/python3
"""Generate the pickle / .ckpt fixtures for tests/unit/test_ckpt.c and the
seed corpus of tests/fuzz/fuzz_pickle.c.  Run once; the outputs are committed.

    /usr/bin/python3 tests/data/pickle/make_fixtures.py [tiny.safetensors]

Needs only the standard library: torch's pickle format is emulated with fake
`torch` / `torch._utils` modules so the stdlib pickler writes the same
GLOBAL / BINPERSID / REDUCE sequences torch.save does.  Nothing here is ever
unpickled: the hostile pickles would run `echo pwned > MARKER` if they were.
"""
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "fuzz", "corpus", "pickle")
MARKER = "/tmp/dbc-pickle-pwned"  # test_ckpt.c checks it never appears

# ---- a fake torch, just enough for the pickler to name things like torch does

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


def _fake_global(module, name, obj):
    obj.__module__ = module.__name__
    obj.__qualname__ = name
    obj.__name__ = name
    setattr(module, name, obj)
    return obj


def _stub(*args):
    raise RuntimeError("fixture generator never unpickles")


for fn in ("_rebuild_tensor_v2", "_rebuild_parameter"):
    _fake_global(torch_utils, fn, types.FunctionType(_stub.__code__, {}, fn))

STORAGE = {}
for cls, fmt in (("FloatStorage", "<f"), ("HalfStorage", "<e"), ("LongStorage", "<q"),
                 ("DoubleStorage", "<d"), ("IntStorage", "<i"), ("ByteStorage", "<B")):
    STORAGE[cls] = (_fake_global(torch, cls, type(cls, (), {})), fmt)


class Storage:
    """Bytes that torch would write to <top>/data/<key>."""

    def __init__(self, key, cls, values):
        self.key, self.cls, self.values = key, cls, values
        self.data = b"".join(struct.pack(STORAGE[cls][1], v) for v in values)


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce_ex__(self, proto):
        return (torch_utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class Parameter:
    def __init__(self, t):
        self.t = t

    def __reduce_ex__(self, proto):
        return (torch_utils._rebuild_parameter, (self.t, False, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    """torch.save's persistent ids: ('storage', class, key, location, numel)."""

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGE[obj.cls][0], obj.key, "cpu", len(obj.values))
        return None


def torch_pickle(obj, protocol=2):
    f = io.BytesIO()
    TorchPickler(f, protocol=protocol).dump(obj)
    return f.getvalue()


def storages_of(obj, acc):
    if isinstance(obj, Storage):
        acc[obj.key] = obj
    elif isinstance(obj, Tensor):
        storages_of(obj.storage, acc)
    elif isinstance(obj, Parameter):
        storages_of(obj.t, acc)
    elif isinstance(obj, dict):
        for v in obj.values():
            storages_of(v, acc)
    return acc


def write_ckpt(path, pkl, storages, top="archive", byteorder=b"little", skip=()):
    """A torch.save zip: stored (uncompressed) members under one folder."""
    def add(z, name, data):  # fixed timestamps: regenerating gives the same bytes
        z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        if pkl is not None:
            add(z, f"{top}/data.pkl", pkl)
        if byteorder is not None:
            add(z, f"{top}/byteorder", byteorder)
        for key, s in sorted(storages.items()):
            if key not in skip:
                add(z, f"{top}/data/{key}", s.data)
        add(z, f"{top}/version", b"3\n")


def write(name, data, corpus=True):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
    if corpus and len(data) < 65536:
        with open(os.path.join(CORPUS, os.path.splitext(name)[0]), "wb") as f:
            f.write(data)


# ---- the valid small state dict ---------------------------------------------

def small_state_dict():
    s0 = Storage("0", "FloatStorage", [float(i) for i in range(12)])
    s1 = Storage("1", "HalfStorage", [0.5, -1.0, 2.0, 65504.0])
    s2 = Storage("2", "LongStorage", [1234567890123])
    s3 = Storage("3", "FloatStorage", [10.0, 20.0])
    sd = collections.OrderedDict()
    sd["model.a"] = Tensor(s0, 0, (3, 4), (4, 1))      # contiguous
    sd["model.t"] = Tensor(s0, 0, (4, 3), (1, 4))      # transposed view of model.a
    sd["model.slice"] = Tensor(s0, 5, (2,), (3,))      # offset + stride
    sd["model.bcast"] = Tensor(s0, 1, (2, 3), (0, 1))  # expanded (stride 0)
    sd["model.half"] = Tensor(s1, 0, (2, 2), (2, 1))
    sd["model.param"] = Parameter(Tensor(s3, 0, (2,), (1,)))
    sd["model.long"] = Tensor(s2, 0, (), ())           # 0-dim scalar
    sd["model.empty"] = Tensor(s3, 0, (0, 5), (5, 1))  # no elements
    # torch.nn.Module.state_dict() hangs per-module versions on the dict
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("model", {"version": 2})])
    return sd


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli), as libcommon/core/crc32c.c computes it."""
    table = crc32c.table
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c.table = [0] * 256
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    crc32c.table[_i] = _c


def tiny_index(st_path, out):
    """name, dtype, shape and CRC-32C of every tensor of the CompVis tiny
    safetensors, so test_ckpt checks tiny.ckpt without that 25 MB file."""
    with open(st_path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    with open(out, "w") as f:
        f.write("# made by make_fixtures.py from tiny-dev/compvis/tiny.safetensors: name dtype shape crc32c\n")
        for name in sorted(k for k in header if k != "__metadata__"):
            t = header[name]
            b0, b1 = t["data_offsets"]
            shape = ",".join(str(d) for d in t["shape"])
            f.write(f"{name}\t{t['dtype']}\t{shape}\t{crc32c(data[b0:b1]):08x}\n")


def main():
    os.makedirs(CORPUS, exist_ok=True)
    st = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/tiny-dev/compvis/tiny.safetensors"
    if os.path.exists(st):
        tiny_index(st, os.path.join(HERE, "tiny_index.tsv"))
    sd = small_state_dict()
    top = {"state_dict": sd, "global_step": 470, "epoch": 2,
           "nested": {"model.hidden": Tensor(Storage("0", "FloatStorage", [0.0] * 12), 0, (1,), (1,))},
           "lr": 1e-4, "name": "fixture", "flags": [True, False, None]}
    storages = storages_of(sd, {})
    small2 = torch_pickle(top, protocol=2)
    write("small_p2.pkl", small2)
    write_ckpt(os.path.join(HERE, "small.ckpt"), small2, storages, top="tiny")
    # protocol 4: FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE; a bare state dict
    write("small_p4.pkl", torch_pickle(sd, protocol=4))
    write("small_p5.pkl", torch_pickle({"state_dict": dict(sd)}, protocol=5))

    # many tensors: > 256 memo entries, so LONG_BINPUT / LONG_BINGET appear
    s = Storage("0", "FloatStorage", [float(i) for i in range(64)])
    many = collections.OrderedDict()
    for i in range(120):
        many[f"model.diffusion_model.input_blocks.{i}.0.weight"] = Tensor(s, i % 32, (2, 4, 2, 2) if i % 3 else (32,),
                                                                          (16, 4, 2, 1) if i % 3 else (1,))
    write("many.pkl", torch_pickle({"state_dict": many}, protocol=2))

    # ---- hostile pickles: each would run `echo pwned > MARKER` if unpickled
    cmd = f"echo pwned > {MARKER}"

    class PosixSystem:
        def __reduce__(self):
            return (os.system, (cmd,))

    class Eval:
        def __reduce__(self):
            return (eval, (f"__import__('os').system({cmd!r})",))

    class Popen:
        def __reduce__(self):
            return (subprocess.Popen, (["sh", "-c", cmd],))

    posix = pickle.dumps(PosixSystem(), protocol=2)
    assert b"cposix\nsystem\n" in posix
    write("evil_posix_system.pkl", posix)
    # the same pickle written on another OS names os.system (protocol 2 has no
    # length prefixes, so a byte substitution is a valid pickle)
    write("evil_os_system.pkl", posix.replace(b"cposix\nsystem\n", b"cos\nsystem\n"))
    write("evil_builtins_eval.pkl", pickle.dumps(Eval(), protocol=4))  # STACK_GLOBAL
    # fix_imports would rename the module for Python 2 ('commands')
    write("evil_subprocess_popen.pkl", pickle.dumps(Popen(), protocol=2, fix_imports=False))
    # hostile global hidden among real tensors, after a valid tensor
    evil_sd = collections.OrderedDict([("model.a", sd["model.a"]), ("model.b", PosixSystem())])
    evil_pkl = torch_pickle({"state_dict": evil_sd}, protocol=2).replace(b"cposix\nsystem\n", b"cos\nsystem\n")
    write("evil_in_state_dict.pkl", evil_pkl)
    write_ckpt(os.path.join(HERE, "evil_os_system.ckpt"), evil_pkl, storages_of(evil_sd, {}))
    # INST carries the class inline: still named and refused
    write("evil_inst.pkl", b"(U" + bytes([len(cmd)]) + cmd.encode() + b"ios\nsystem\n.")

    # ---- malformed input
    write("truncated.pkl", small2[:len(small2) // 2])
    write("huge_string.pkl", b"\x80\x02X\xff\xff\xff\x7fabc.")
    write("huge_string8.pkl", b"\x80\x04\x8d" + struct.pack("<Q", 1 << 62) + b"abc.")
    write("deep_marks.pkl", b"\x80\x02" + b"(" * 1000 + b"t" * 1000 + b".", corpus=False)
    write("deep_marks_small.pkl", b"\x80\x02" + b"(" * 200 + b"N.")
    write("memo_huge_index.pkl", b"\x80\x02}r\xff\xff\xff\xff.")
    write("not_a_dict.pkl", pickle.dumps([1, 2, 3], protocol=2))
    write("proto1.pkl", b"\x80\x01}.")
    bad_view = collections.OrderedDict([("w", Tensor(Storage("0", "FloatStorage", [0.0] * 4), 2, (2, 2), (2, 1)))])
    write("view_outside.pkl", torch_pickle(bad_view, protocol=2))
    neg = torch_pickle(collections.OrderedDict([("w", Tensor(Storage("0", "FloatStorage", [0.0] * 4), 0, (2,), (-1,)))]))
    write("negative_stride.pkl", neg)

    with open(os.path.join(HERE, "small.ckpt"), "rb") as f:
        good = f.read()
    write("truncated.ckpt", good[:len(good) * 2 // 3], corpus=False)
    write_ckpt(os.path.join(HERE, "missing_pkl.ckpt"), None, storages)
    write_ckpt(os.path.join(HERE, "big_endian.ckpt"), small2, storages, byteorder=b"big")
    write_ckpt(os.path.join(HERE, "missing_storage.ckpt"), small2, storages, skip=("1",))
    short = dict(storages)
    short["0"] = Storage("0", "FloatStorage", [float(i) for i in range(11)])  # pickle says 12
    write_ckpt(os.path.join(HERE, "bad_storage_size.ckpt"), small2, short)
    # torch < 1.6: a pickled magic number, protocol version, sys info, then data
    legacy = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + pickle.dumps(1001, protocol=2)
    write("legacy.pt", legacy, corpus=False)


if __name__ == "__main__":
    main()
