#!/usr/bin/env python3
"""Rewrite a kernels/cuda/*.cu file into C++ for the CPU emulator (cuda_emu.h):
kernel<<<grid, block, smem, stream>>>(args); becomes EMU_LAUNCH(...), the
dynamic shared memory becomes the emulator's buffer, and cuda_emu.h is
included first so its macros replace the runtime, cuBLAS and cuDNN calls.
   usage: transform.py IN.cu OUT.cpp"""
import re
import sys


def split_top(t):
    out, depth, cur = [], 0, ''
    for ch in t:
        if ch in '([<':
            depth += 1
        if ch in ')]>':
            depth -= 1
        if ch == ',' and depth == 0:
            out.append(cur)
            cur = ''
        else:
            cur += ch
    out.append(cur)
    return out


def launch(m):
    kern, cfg, args = m.group(1), [x.strip() for x in split_top(m.group(2))], m.group(3)
    while len(cfg) < 4:
        cfg.append('0')
    # the kernel in parentheses: a template's arguments may hold commas
    return 'EMU_LAUNCH((%s), (%s), %s, %s, (%s), %s);' % (cfg[0], cfg[1], cfg[2], cfg[3], kern, args)


src = open(sys.argv[1]).read()
src = '#include "tests/gpu/emu/cuda_emu.h"\n' + src
src = re.sub(r'extern __shared__ (?:__align__\(\d+\) )?float smem\[\];', 'float *smem = emu_smem();', src)
src = re.sub(r'([A-Za-z_]\w*(?:<[\w\s,]+>)?)\s*<<<(.*?)>>>\((.*?)\);', launch, src, flags=re.S)
if '<<<' in src:
    sys.exit('%s: a launch the rewrite did not understand' % sys.argv[1])
open(sys.argv[2], 'w').write(src)
