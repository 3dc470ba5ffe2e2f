"""Rewrite a .safetensors file as a torch.save zip (.bin) holding the same
state dict, without torch: the pickle is written by the fixture generator's
fake-torch pickler.  Used to test diffusers folders with .bin weights.
usage: st_to_bin.py IN.safetensors OUT.bin"""
import collections
import json
import os
import struct
import sys

sys.dont_write_bytecode = True

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data", "pickle"))
import make_fixtures as mf  # noqa: E402

CLASS = {"F32": "FloatStorage", "F16": "HalfStorage", "I64": "LongStorage", "F64": "DoubleStorage"}


def main(src, dst):
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    sd = collections.OrderedDict()
    for key, (name, t) in enumerate(sorted(header.items())):
        b, e = t["data_offsets"]
        itemsize = struct.calcsize(mf.STORAGE[CLASS[t["dtype"]]][1])
        st = mf.Storage(str(key), CLASS[t["dtype"]], [])
        st.values = range((e - b) // itemsize)  # numel for the persistent id
        st.data = data[b:e]
        shape = t["shape"]
        stride, acc = [], 1
        for d in reversed(shape):
            stride.insert(0, acc)
            acc *= d
        sd[name] = mf.Tensor(st, 0, shape, stride)
    mf.write_ckpt(dst, mf.torch_pickle(sd), mf.storages_of(sd, {}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
