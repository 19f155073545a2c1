#!/usr/bin/env python3
"""One line per run directory (in the order the runs ran): load1 before and
after, gateway CPU per sent message, acked/s, losses/unacked, e2e latency
p50/p90/p99/p99.9/max (ms); for one-hop runs with --cores 2, which core
threads carried the connections (CPU ticks of palaver-core-0/1)."""
import os, re
here = os.path.dirname(os.path.abspath(__file__))
rows = []
for d in os.listdir(here):
    out = os.path.join(here, d, "stdout.txt")
    if not os.path.exists(out):
        continue
    text = open(out).read()
    load = open(os.path.join(here, d, "load.txt")).read()
    lb = re.search(r"load before: (\S+)", load)
    la = re.search(r"load after: (\S+)", load)
    cpu = re.search(r"per sent message ([\d.]+) us", text)
    acked = re.search(r"acked \d+ \((\d+)/s\)", text)
    bad = re.search(r"losses (\d+)\s+unacked (\d+)", text)
    e2e = re.search(r"^\s+e2e\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    ticks = dict(re.findall(r"thread palaver-core-(\d) (\d+ \d+)", load))
    cores = " ".join(f"c{k}:{sum(map(int, v.split()))}" for k, v in sorted(ticks.items()))
    rows.append((os.path.getmtime(out), d, lb.group(1) if lb else "-", la.group(1) if la else "-",
                 cpu.group(1) if cpu else "-", acked.group(1) if acked else "-",
                 f"{bad.group(1)}/{bad.group(2)}" if bad else "-",
                 *((e2e.group(3), e2e.group(4), e2e.group(5), e2e.group(6), e2e.group(8)) if e2e else ("-",) * 5),
                 cores))
rows.sort()
print(f"{'run':24} {'load1':>11} {'cpu us/msg':>10} {'acked/s':>8} {'lost/unack':>10} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} {'max':>8}  core ticks")
for r in rows:
    print(f"{r[1]:24} {r[2]:>5}→{r[3]:<5} {r[4]:>10} {r[5]:>8} {r[6]:>10} {r[7]:>8} {r[8]:>8} {r[9]:>8} {r[10]:>8} {r[11]:>8}  {r[12]}")
