#!/usr/bin/env python3
"""Join the BENCH lines of bench_sd (impl=c) and bench_torch.py (impl=torch,
impl=torch_compile) into one markdown table with the ratios ours/theirs
(time ratios: below 1 means ours is faster).

    bench_table.py FILE...        (any mix of the programs' outputs; stdout)

A BENCH line is `BENCH key=value ...`; a value may be double-quoted (error="...").
Figures are matched by (name, precision); a figure one side lacks or failed
is listed with what there is.  The programs' '# ' header lines come first, so
the table says what it was measured on.  Standard library only.
"""
import shlex
import sys


def parse(paths):
    rows, notes = [], []
    for p in paths:
        try:
            text = open(p, encoding="utf-8", errors="replace").read()
        except OSError as e:
            notes.append("%s: %s" % (p, e.strerror))
            continue
        for line in text.splitlines():
            if line.startswith("# ") and ("bench_sd:" in line or "bench_torch:" in line):
                if line[2:].strip() not in notes:
                    notes.append(line[2:].strip())
            if not line.startswith("BENCH "):
                continue
            try:
                fields = shlex.split(line)[1:]
            except ValueError:  # an unbalanced quote: a cut-off line
                continue
            kv = dict(f.split("=", 1) for f in fields if "=" in f)
            if "name" in kv and "impl" in kv:
                rows.append(kv)
    return rows, notes


def num(kv, key):
    try:
        return float(kv[key])
    except (KeyError, ValueError):
        return None


def cell(x, fmt):
    return "" if x is None else fmt % x


def main(argv):
    if len(argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    rows, notes = parse(argv[1:])
    figs, impls = {}, []
    for kv in rows:
        key = (kv["name"], kv.get("precision", "?"))
        if key not in figs:
            figs[key] = {}
        figs[key][kv["impl"]] = kv  # the last line of a figure wins (a rerun)
        if kv["impl"] not in impls:
            impls.append(kv["impl"])
    others = [i for i in ("torch", "torch_compile") if i in impls] + [
        i for i in impls if i not in ("c", "torch", "torch_compile")]
    for n in notes:
        print("- " + n)
    if notes:
        print()
    head = ["figure", "precision", "ours ms"]
    for o in others:
        head += ["%s ms" % o, "ours/%s" % o]
    head += ["ours TFLOP/s"] + ["%s TFLOP/s" % o for o in others]
    head += ["ours peak MiB"] + ["%s peak MiB" % o for o in others] + ["plan MiB", "notes"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 or h == "notes" else "---:" for i, h in enumerate(head)) + "|")
    order = ["unet_fwd_b2", "unet_fwd_b2_graph", "train_step", "train_step_f32grads", "train_step_nograph",
             "train_step_fused",
             "sample_ddim_cfg", "sample_ddim_cfg_fresh", "sample_ddim_cfg_hoststep",
             "sample_ddim_cfg_nograph", "ddim_unet_only", "vae_decode"]
    keys = sorted(figs, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[0],
                                       ["fp32", "bf16", "fp16"].index(k[1]) if k[1] in ("fp32", "bf16", "fp16") else 9))
    for key in keys:
        f = figs[key]
        c = f.get("c", {})
        note = []
        if "error" in c:
            note.append("ours: error: " + c["error"])
        ours = None if "error" in c else num(c, "ms")
        row = [key[0], key[1], "-" if "c" not in f else "error" if "error" in c else cell(ours, "%.2f")]
        for o in others:
            t = f.get(o)
            if t is None:
                row += ["", ""]
                continue
            if "error" in t:
                row += ["error", ""]
                note.append("%s: error: %s" % (o, t["error"]))
                continue
            theirs = num(t, "ms")
            ratio = ""
            if ours and theirs:
                if c.get("steps") != t.get("steps"):
                    note.append("steps differ (ours %s, %s %s): no ratio" % (c.get("steps"), o, t.get("steps")))
                else:
                    ratio = "%.2f" % (ours / theirs)
            row += [cell(theirs, "%.2f"), ratio]
        row += [cell(num(c, "tflops"), "%.3g")] + [cell(num(f.get(o, {}), "tflops"), "%.3g") for o in others]
        row += [cell(num(c, "peak_mib"), "%.0f")] + [cell(num(f.get(o, {}), "peak_mib"), "%.0f") for o in others]
        row += [cell(num(c, "plan_mib"), "%.0f")]
        for side, kv in [("ours", c)] + [(o, f.get(o, {})) for o in others]:
            for k in ("steps", "shortened", "vae", "checkpointing"):
                if k in kv and k != "steps":
                    note.append("%s %s=%s" % (side, k, kv[k]))
        if "steps" in c:
            note.insert(0, "steps=%s" % c["steps"])
        row.append("; ".join(note))
        print("| " + " | ".join(r.replace("|", "/") for r in row) + " |")
    if not figs:
        print("| (no BENCH lines) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
