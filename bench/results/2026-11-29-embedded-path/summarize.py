#!/usr/bin/env python3
"""One line per run directory: load before, gateway CPU per sent message,
acked/s, unacked+losses, e2e p50/p99/p99.9 (ms)."""
import os, re, sys
here = os.path.dirname(os.path.abspath(__file__))
rows = []
for d in sorted(os.listdir(here)):
    out = os.path.join(here, d, "stdout.txt")
    if not os.path.exists(out):
        continue
    text = open(out).read()
    load = open(os.path.join(here, d, "load.txt")).read()
    lb = re.search(r"load before: (\S+) (\S+) (\S+)", load)
    cpu = re.search(r"per sent message ([\d.]+) us", text)
    acked = re.search(r"acked \d+ \((\d+)/s\)", text)
    bad = re.search(r"losses (\d+)\s+unacked (\d+)", text)
    e2e = re.search(r"^\s+e2e\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    rows.append((d, lb.group(1) if lb else "-", cpu.group(1) if cpu else "-",
                 acked.group(1) if acked else "-",
                 f"{bad.group(1)}/{bad.group(2)}" if bad else "-",
                 *((e2e.group(3), e2e.group(5), e2e.group(6)) if e2e else ("-",) * 3)))
print(f"{'run':26} {'load1':>6} {'cpu us/msg':>10} {'acked/s':>8} {'lost/unacked':>13} {'p50 ms':>9} {'p99 ms':>9} {'p99.9 ms':>9}")
for r in rows:
    print(f"{r[0]:26} {r[1]:>6} {r[2]:>10} {r[3]:>8} {r[4]:>13} {r[5]:>9} {r[6]:>9} {r[7]:>9}")
