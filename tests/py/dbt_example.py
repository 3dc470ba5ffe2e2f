#!/usr/bin/env python3
# Read and write .dbt tensor streams with the msgpack package alone.
#   dbt_example.py write FILE   write a small example stream
#   dbt_example.py read FILE    check FILE and print one line per record
import math
import struct
import sys

import msgpack

_T = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    _T.append(c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


SIZES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8,
         "i32": 4, "i16": 2, "i8": 1, "u8": 1, "bool": 1}


class DbtWriter:
    def __init__(self, f, kind, meta=None):
        self.f, self.count, self.crc = f, 0, 0
        self._put({"format": "dbt", "version": 1, "kind": kind,
                   "meta": meta or {}})

    def _put(self, obj):
        b = msgpack.packb(obj, use_bin_type=True)
        self.crc = crc32c(b, self.crc)
        self.f.write(b)

    def record(self, name, dtype, shape, data, meta=None):
        assert len(data) == math.prod(shape) * SIZES[dtype]
        self._put({"name": name, "dtype": dtype, "shape": list(shape),
                   "meta": meta or {}, "data": bytes(data)})
        self.count += 1

    def close(self):
        self.f.write(msgpack.packb({"end": True, "count": self.count,
                                    "crc32c": self.crc}))


def read_dbt(data):
    """Yield (header, record) for every record of every stream in data
    (bytes); raise ValueError when a stream is truncated or corrupt."""
    up = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
    up.feed(data)
    header, streams, count = None, 0, 0
    while True:
        start = up.tell()
        try:
            obj = up.unpack()
        except msgpack.OutOfData:
            break
        raw = data[start:up.tell()]
        if not isinstance(obj, dict):
            raise ValueError("byte %d: not a dbt object" % start)
        if header is None:
            if obj.get("format") != "dbt" or obj.get("version") != 1:
                raise ValueError("byte %d: not a dbt header" % start)
            header, count, crc = obj, 0, crc32c(raw)
        elif "end" in obj:
            if "error" in obj:
                raise ValueError("stream aborted: %s" % obj["error"])
            if obj.get("count") != count or obj.get("crc32c") != crc:
                raise ValueError("byte %d: bad trailer (count %s, crc32c "
                                 "%s; computed %d, %08x)" % (start,
                                 obj.get("count"), obj.get("crc32c"), count, crc))
            header, streams = None, streams + 1
        elif "format" in obj:
            raise ValueError("byte %d: header inside a stream" % start)
        else:
            n = math.prod(obj["shape"]) * SIZES[obj["dtype"]]
            if len(obj["shape"]) > 8 or len(obj["data"]) != n:
                raise ValueError("byte %d: bad record" % start)
            crc, count = crc32c(raw, crc), count + 1
            yield header, obj
    if header is not None or up.tell() != len(data) or streams == 0:
        raise ValueError("truncated stream (%d records, no trailer)" % count)


def main(argv):
    if len(argv) != 3 or argv[1] not in ("read", "write"):
        sys.exit("usage: dbt_example.py read|write FILE")
    if argv[1] == "write":
        with open(argv[2], "wb") as f:
            w = DbtWriter(f, "example", {"tool": "dbt_example.py"})
            for i, shape in enumerate([[2, 3], [4], []]):
                x = [0.5 * k for k in range(math.prod(shape))]
                data = struct.pack("<%df" % len(x), *x)
                w.record("t%d" % i, "f32", shape, data, {"step": i})
            w.close()
        return
    with open(argv[2], "rb") as f:
        data = f.read()
    try:
        for h, r in read_dbt(data):
            shape = ", ".join(str(d) for d in r["shape"])
            print("%s %s %s [%s] %d %08x" % (h["kind"], r["name"], r["dtype"],
                  shape, len(r["data"]), crc32c(r["data"])))
    except (ValueError, KeyError, TypeError) as e:
        sys.exit("dbt_example.py: error: %s" % e)


if __name__ == "__main__":
    main(sys.argv)
