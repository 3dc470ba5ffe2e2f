#!/usr/bin/env python3
"""The launches of one UNet forward (or any stretch of work), counted
without a GPU: reads the emulator's EMU_LAUNCH_LOG (cuda_emu.h emu_note),
resolves each line's frames with addr2line, and prints, for the N-th
stretch that starts at a line naming MARK, how many launches each model-level
call site (the innermost frame in libcommon/) makes, and of which kernels.

   usage: census.py LOG [--mark timestep_kernel] [--nth 2] [--dir build/emu]
          [--by site|kernel|both]

tests/gpu/emu/census.sh makes the log (bench_sd's forward, EMU_DRY=1) and
calls this.  The counts are the eager forward's; a CUDA graph replays the
same launches (its capture is the eager run's work)."""
import argparse
import collections
import os
import subprocess
import sys


def resolve(mods, where):
    """{(module, offset): 'func file:line'} through one addr2line a module"""
    out = {}
    for mod, offs in mods.items():
        path = where.get(mod)
        if not path:
            continue
        offs = sorted(offs)
        r = subprocess.run(['addr2line', '-f', '-C', '-e', path] + [hex(o) for o in offs],
                           capture_output=True, text=True, check=True).stdout.split('\n')
        for i, o in enumerate(offs):
            fn, loc = r[2 * i], r[2 * i + 1]
            loc = loc.split(' (')[0]
            out[(mod, o)] = (fn, loc)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('log')
    ap.add_argument('--mark', default='timestep_kernel')
    ap.add_argument('--nth', type=int, default=2)
    ap.add_argument('--dir', default='build/emu')
    ap.add_argument('--by', default='both', choices=['site', 'kernel', 'both'])
    a = ap.parse_args()
    lines = [l.rstrip('\n').split('\t') for l in open(a.log)]
    starts = [i for i, l in enumerate(lines) if a.mark in l[0]]
    if len(starts) < a.nth:
        sys.exit('census: %s has %d stretches starting at %s, not %d' % (a.log, len(starts), a.mark, a.nth))
    lo = starts[a.nth - 1]
    hi = starts[a.nth] if len(starts) > a.nth else len(lines)
    part = lines[lo:hi]
    where = {}
    for d in ('lib', 'bench', 'bin', 'tests'):
        p = os.path.join(a.dir, d)
        if os.path.isdir(p):
            for f in os.listdir(p):
                where.setdefault(f, os.path.join(p, f))
    mods = collections.defaultdict(set)
    for l in part:
        for fr in l[2].split():
            m, o = fr.rsplit('+', 1)
            mods[m].add(int(o, 16))
    names = resolve(mods, where)
    sites = collections.Counter()
    kernels = collections.Counter()
    pairs = collections.Counter()
    for l in part:
        what = l[0].strip('()')
        site = '?'
        for fr in l[2].split():
            m, o = fr.rsplit('+', 1)
            fn, loc = names.get((m, int(o, 16)), ('?', '?'))
            if '/libcommon/' in loc:
                site = '%s %s' % (loc.split('/libcommon/')[1], fn)
                break
        if what == 'library':
            what = 'library ' + l[1].split(':')[0]
        sites[site] += 1
        kernels[what] += 1
        pairs[(site, what)] += 1
    print('%d launches from %s (stretch %d of %d)' % (len(part), a.log, a.nth, len(starts)))
    if a.by in ('kernel', 'both'):
        print('\n| kernel | launches |\n|---|---:|')
        for k, n in kernels.most_common():
            print('| %s | %d |' % (k, n))
    if a.by in ('site', 'both'):
        print('\n| model call site | launches | kernels |\n|---|---:|---|')
        for s, n in sites.most_common():
            ks = ', '.join('%s %d' % (k, m) for (s2, k), m in pairs.most_common() if s2 == s)
            print('| %s | %d | %s |' % (s, n, ks))


if __name__ == '__main__':
    main()
