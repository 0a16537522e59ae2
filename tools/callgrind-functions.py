#!/usr/bin/env python3
"""Instructions per function from a callgrind output file, with each function's inlined code
merged (`callgrind_annotate` lists a function once per source file its inlined code comes
from, so a thread's cost is spread over many lines that each look small).

Usage: tools/callgrind-functions.py CALLGRIND_OUT [--per N] [--top K] [--only REGEX] [REGEX ...]
  Without REGEX: the K functions with the most instructions, inclusive (with what they call;
  of the functions whose name matches --only, if given) and self, divided by N (e.g. the
  messages of the run: instructions per message).
  With REGEX: for each function whose name matches, what it calls and who calls it.
"""
import argparse
import collections
import re
import signal


def read(path):
    """Self instructions per function, and instructions per call edge (caller, callee)."""
    names = {}
    self_ir = collections.Counter()
    edges = collections.Counter()
    calls = collections.Counter()
    fn = callee = None
    call_cost_next = False
    # A cost line holds one field per position (`positions:`, "line" unless told), then the
    # events, Ir first.
    ir_field = 1

    def name(space, text):
        # Compressed names: "(id) name" defines an id, "(id)" refers to it.
        m = re.match(r"\((\d+)\)(?: (.*))?$", text)
        if not m:
            return text
        if m.group(2) is not None:
            names[(space, m.group(1))] = m.group(2)
        return names[(space, m.group(1))]

    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith("positions:"):
                ir_field = len(line.split()[1:])
            elif line.startswith("events:") and line.split()[1:2] != ["Ir"]:
                raise SystemExit(f"{path}: the first event is not Ir: {line}")
            elif line[0].isdigit() or line[0] in "+-*":
                parts = line.split()
                if len(parts) <= ir_field:
                    continue
                ir = int(parts[ir_field])
                if call_cost_next:
                    edges[(fn, callee)] += ir
                    call_cost_next = False
                else:
                    self_ir[fn] += ir
            elif line.startswith("fn="):
                fn = name("fn", line[3:])
            elif line.startswith("cfn="):
                callee = name("fn", line[4:])
            elif line.startswith("calls="):
                calls[(fn, callee)] += int(line[6:].split()[0])
                call_cost_next = True
            elif "=" in line and line.split("=", 1)[0] in ("fl", "fi", "fe", "cfi", "cfl", "ob", "cob"):
                key, value = line.split("=", 1)
                name("ob" if key.endswith("ob") else "file", value)
    inclusive = collections.Counter(self_ir)
    for (caller, called), ir in edges.items():
        if caller != called:
            inclusive[caller] += ir
    return self_ir, inclusive, edges, calls


def short(function):
    return re.sub(r"\s*\[.*?\]$", "", function)[:160]


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into `head`
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--per", type=float, default=1.0, help="divide counts by this")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--only", help="list inclusive counts of matching functions only")
    parser.add_argument("patterns", nargs="*")
    args = parser.parse_intermixed_args()
    self_ir, inclusive, edges, calls = read(args.path)
    total = sum(self_ir.values())
    unit = args.per

    def row(ir, function, count=None):
        times = f"{count:>9,}x " if count is not None else ""
        return f"{ir / unit:>13,.0f} {100 * ir / total:5.1f}%  {times}{short(function)}"

    if not args.patterns:
        print(f"instructions in all: {total:,}; below, divided by {unit:g}")
        print("-- inclusive (the function and what it calls)")
        only = re.compile(args.only or "")
        listed = [(f, ir) for f, ir in inclusive.most_common() if f and only.search(f)]
        for function, ir in listed[: args.top]:
            print(row(ir, function))
        print("-- self")
        for function, ir in self_ir.most_common(args.top):
            print(row(ir, function))
    for pattern in args.patterns:
        wanted = re.compile(pattern)
        for function in [f for f in inclusive if f and wanted.search(f)][:3]:
            print(f"== {short(function)}: inclusive {inclusive[function] / unit:,.0f}, "
                  f"self {self_ir[function] / unit:,.0f}")
            callees = sorted(((ir, b) for (a, b), ir in edges.items() if a == function and b != a),
                             reverse=True)
            for ir, callee in callees[: args.top]:
                print("  calls    " + row(ir, callee, calls[(function, callee)]))
            callers = sorted(((ir, a) for (a, b), ir in edges.items() if b == function and a != b),
                             reverse=True)
            for ir, caller in callers[:8]:
                print("  called by" + row(ir, caller, calls[(caller, function)]))


if __name__ == "__main__":
    main()
