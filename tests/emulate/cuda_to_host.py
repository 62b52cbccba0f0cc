#!/usr/bin/env python3
"""Rewrites a .cu file of kernels/cuda/ into C++ that g++ builds against tests/emulate/include/
(the CUDA backend on the host, cuda_host.h): the two things of CUDA C++ that are not C++.

  kernel<<<grid, block[, smem[, stream]]>>>(args);
      -> emu_launch(grid, block, smem, stream, kernel,
                    [emu_args = std::make_tuple(args)] { std::apply(... kernel(emu_arg...) ..., emu_args); });
  extern __shared__ [__align__(n)] T name[];
      -> T *name = reinterpret_cast<T *>(emu_dynamic_smem());
  reinterpret_cast<[const] float2/float4/uint2/uint4 *>(p)
      -> emu_vector_cast<...>(p), which stops the kernel where p is not aligned to the type's size
  __shared__ T name[N];
      -> static T name[N]; emu_fresh_shared(name, sizeof name);
         (one array for the launch, since launches take turns; NaN bytes again for each block,
         as a GPU's shared memory does not carry one block's values over to the next)

Everything else is left as it is, line for line (a launch keeps its line breaks), so that the
compiler's messages point at the right lines of the original. A .cuh is rewritten the same way,
beside the .cpp files that include it, so that their #include "x.cuh" finds the rewritten one.
Usage: cuda_to_host.py IN.cu OUT.cpp
"""
import re
import sys

SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
VECTOR_CAST = re.compile(r"reinterpret_cast<(\s*(?:const\s+)?(?:float2|float4|uint2|uint4)\s*\*\s*)>")
STATIC_SHARED = re.compile(r"(?<!extern )__shared__\s+((?:__align__\(\s*\d+\s*\)\s+)?[A-Za-z_][\w\s]*?)\s+(\w+)\s*(\[[^\]]+\])\s*;")


def split_top_level(text):
    """Splits on commas outside (), <>, [] and {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def kernel_start(src, end):
    """The start of the kernel expression ending just before `end` (a name with template args)."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if src[i - 1] == ">":  # template arguments: back to the matching '<'
        depth = 0
        while i > 0:
            i -= 1
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def matching(src, start, open_ch, close_ch):
    depth = 0
    for i in range(start, len(src)):
        if src[i] == open_ch:
            depth += 1
        elif src[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise SystemExit(f"cuda_to_host.py: unbalanced {open_ch} at offset {start}")


def template_kernels(src):
    """The names of the kernel templates declared in src."""
    names = set()
    for m in re.finditer(r"__global__", src):
        name = re.search(r"\bvoid\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", src[m.end():])
        before = src[max(src.rfind(";", 0, m.start()), src.rfind("}", 0, m.start())) + 1:m.start()]
        if name and "template" in before:
            names.add(name.group(1))
    return names


def rewrite_launches(src):
    templates = template_kernels(src)
    out, pos = [], 0
    while True:
        at = src.find("<<<", pos)
        if at < 0:
            out.append(src[pos:])
            return "".join(out)
        begin = kernel_start(src, at)
        kernel = src[begin:at].strip()
        config_end = src.find(">>>", at)
        config = split_top_level(src[at + 3:config_end])
        if len(config) < 2 or len(config) > 4:
            raise SystemExit(f"cuda_to_host.py: a launch of {kernel} with {len(config)} configuration values")
        config += ["0", "nullptr"][len(config) - 2:]
        paren = src.find("(", config_end)
        close = matching(src, paren, "(", ")")
        args = src[paren + 1:close]
        # a template launched without its arguments (deduced from the call) has no address here:
        # nullptr, and the launch is held to the default dynamic shared memory limit
        address = "nullptr" if kernel in templates else kernel
        out.append(src[pos:begin])
        # the arguments are taken when the launch is queued, as CUDA takes them; the kernel runs in
        # its stream's turn
        out.append(f"emu_launch({', '.join(config)}, {address}, [emu_args = std::make_tuple({args})] "
                   f"{{ std::apply([](const auto &...emu_arg) {{ {kernel}(emu_arg...); }}, emu_args); }})")
        pos = close + 1


def main():
    source, target = sys.argv[1], sys.argv[2]
    with open(source, encoding="utf-8") as f:
        src = f.read()
    src = SHARED.sub(lambda m: f"{m.group(1)} *{m.group(2)} = reinterpret_cast<{m.group(1)} *>(emu_dynamic_smem());", src)
    src = STATIC_SHARED.sub(lambda m: f"static {m.group(1)} {m.group(2)}{m.group(3)}; emu_fresh_shared({m.group(2)}, sizeof {m.group(2)});", src)
    src = VECTOR_CAST.sub(r"emu_vector_cast<\1>", src)
    src = rewrite_launches(src)
    with open(target, "w", encoding="utf-8") as f:
        f.write(f'#line 1 "{source}"\n')
        f.write(src)


if __name__ == "__main__":
    main()
