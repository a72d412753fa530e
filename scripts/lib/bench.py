#!/usr/bin/env python3
"""Shared helpers of the benchmark scripts (scripts/bench-*.sh). Python 3 standard library only.

    bench.py host                                 host facts as JSON (stdout)
    bench.py procs SOCK kiln|runc                 the runtime's processes for the containerd at
                                                  SOCK, with PSS, as JSON (stdout)
    bench.py pss PID                              a process's PSS in KiB (stdout)
    bench.py meminfo                              /proc/meminfo's MemFree, MemAvailable (KiB) as JSON
    bench.py running SOCK PREFIX                  how many tasks whose id starts with PREFIX are RUNNING
    bench.py log-scan LOG [SKIP_LINES]            warnings/errors in a containerd log as JSON
    bench.py throughput-report META_JSON          table + JSON report of bench-throughput.sh
    bench.py density-report META_JSON             table + JSON report of bench-density.sh
    bench.py http-report META_JSON                table + JSON report of bench-http.sh
    bench.py scale-report META_JSON               table + JSON report of bench-density.sh --scale
    bench.py coldstart-plot JSON PNG              the chart of bench-coldstart.sh (gnuplot)
    bench.py cri-report META_JSON                 table + JSON report of bench-cri.sh
    bench.py image-size TAR                       an image tarball's layer sizes, raw and gzipped
    bench.py cpu-sampler OUT                      /proc/stat's busy and total jiffies every 100 ms
                                                  to OUT until killed
    bench.py seeds-report META_JSON               table + JSON report of bench-seeds.sh
    bench.py seeds-plot JSON PNG                  the chart of bench-seeds.sh (gnuplot)

The report commands read a JSON file of inputs the shell script wrote (paths of raw samples,
options, snapshots), print the table on stdout and write the report to the path it names.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

KILN_EXE = "containerd-shim-kiln-v1"
RUNC_EXE = "containerd-shim-runc-v2"
MIB = 1024.0  # KiB per MiB


# --- small utilities -------------------------------------------------------------------------

def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, `inclusive`)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "min_ms": round(min(xs), 3),
        "median_ms": round(statistics.median(xs), 3),
        "p90_ms": round(quantile(xs, 0.9), 3),
        "max_ms": round(max(xs), 3),
        "mean_ms": round(statistics.fmean(xs), 3),
    }


def run_out(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def grouping_label(value: str | None) -> str:
    return value if value else "container (default; KILN_SHIM_GROUPING unset)"


# --- host facts --------------------------------------------------------------------------------

def meminfo() -> dict:
    out = {}
    for line in read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemFree", "MemAvailable"):
            out[key] = int(rest.split()[0])
    return out


def cgroup_version() -> str:
    try:
        fstype = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        fstype = ""
    if fstype == "cgroup2fs":
        return "v2"
    if os.path.isdir("/sys/fs/cgroup/unified") and os.path.exists(
            "/sys/fs/cgroup/unified/cgroup.controllers"):
        return "v1 (hybrid: v2 mounted at /sys/fs/cgroup/unified, no controllers)"
    return "v1"


def busy_processes() -> list[str]:
    """Names of compilers/builders running now: the machine is shared with builds if any."""
    names = []
    for pid in pids():
        try:
            comm = read(f"/proc/{pid}/comm").strip()
        except OSError:
            continue
        if comm in ("rustc", "cargo", "cc1", "cc1plus", "ld", "clang", "go"):
            names.append(comm)
    return names


def host() -> dict:
    mem = meminfo()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit = run_out("git", "-C", repo, "rev-parse", "HEAD")
    dirty = None
    if commit:
        dirty = subprocess.run(["git", "-C", repo, "diff", "--quiet", "HEAD"],
                               check=False).returncode != 0
    busy = busy_processes()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "mem_total_mib": round(mem.get("MemTotal", 0) / MIB),
        "cgroup": cgroup_version(),
        "containerd": run_out("containerd", "--version"),
        "runc": (run_out("runc", "--version") or "").split("\n")[0] or None,
        "loadavg": read("/proc/loadavg").split()[:3],
        "rcu_expedited": (read("/sys/kernel/rcu_expedited").strip()
                          if os.path.exists("/sys/kernel/rcu_expedited") else None),
        "concurrent_builds": len(busy),
    }


# --- processes ---------------------------------------------------------------------------------

def pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def proc_stat(pid: int) -> dict | None:
    """exe basename, ppid, cmdline, threads, PSS (KiB) of a process; None if it is gone."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    try:
        status = read(f"/proc/{pid}/status")
        cmdline = read(f"/proc/{pid}/cmdline").split("\0")
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        fields[key] = rest.strip()
    base = os.path.basename(exe)
    if base.endswith(" (deleted)"):  # the binary was rebuilt while the process runs
        base = base[: -len(" (deleted)")]
    return {
        "pid": pid,
        "ppid": int(fields.get("PPid", "0")),
        "exe": base,
        "comm": fields.get("Name", ""),
        "cmdline": [c for c in cmdline if c],
        "threads": int(fields.get("Threads", "1")),
    }


def smaps_rollup(pid: int) -> dict:
    """Pss, Pss_Anon, Pss_File, Rss of a process in KiB (0s if it is gone)."""
    out = {"pss_kib": 0, "pss_anon_kib": 0, "pss_file_kib": 0, "rss_kib": 0}
    try:
        text = read(f"/proc/{pid}/smaps_rollup")
    except OSError:
        return out
    keys = {"Pss": "pss_kib", "Pss_Anon": "pss_anon_kib", "Pss_File": "pss_file_kib",
            "Rss": "rss_kib"}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[keys[key]] = int(rest.split()[0])
    return out


def own_cgroup(pid: int) -> str | None:
    """The text of /proc/PID/cgroup (which cgroup a process is in, in every hierarchy)."""
    try:
        return read(f"/proc/{pid}/cgroup")
    except OSError:
        return None


def address_of(cmdline: list[str]) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg in ("-address", "--address") and i + 1 < len(cmdline):
            return cmdline[i + 1]
    return None


def runtime_procs(sock: str, runtime: str) -> dict:
    """The processes a runtime runs for the containerd listening on SOCK, classified.

    kiln: every process whose executable is containerd-shim-kiln-v1 and that belongs to a shim
    server started for SOCK (its -address): the server itself (its parent is not a Kiln
    process) is `shim`; a Kiln child of a shim is its `zygote` if it shares the shim's cgroup
    and a `worker` if not (the zygote clones workers with CLONE_PARENT, so they are the shim's
    children, each in its container's cgroup); a Kiln child of a zygote (or
    deeper) is `worker`. Other processes under a Kiln process are `other`.
    runc: containerd-shim-runc-v2 processes started for SOCK are `shim`, their children (the
    containers' processes) `container`.
    """
    procs = {}
    for pid in pids():
        p = proc_stat(pid)
        if p is not None:
            procs[pid] = p
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p["ppid"], []).append(p["pid"])
    exe = KILN_EXE if runtime == "kiln" else RUNC_EXE
    roots = [p for p in procs.values()
             if p["exe"] == exe and address_of(p["cmdline"]) == sock
             and procs.get(p["ppid"], {}).get("exe") != exe]
    found = []

    def walk(pid: int, depth: int) -> None:
        p = procs[pid]
        if runtime == "kiln":
            if p["exe"] != KILN_EXE:
                kind = "other"
            else:
                kind = "shim" if depth == 0 else "worker"
                if depth == 1 and own_cgroup(pid) == own_cgroup(p["ppid"]):
                    kind = "zygote"
        else:
            kind = "shim" if depth == 0 else ("container" if depth == 1 else "other")
        found.append({"pid": pid, "ppid": p["ppid"], "kind": kind, "comm": p["comm"],
                      "threads": p["threads"], **smaps_rollup(pid)})
        for c in children.get(pid, []):
            walk(c, depth + 1)

    for r in roots:
        walk(r["pid"], 0)
    by_kind: dict[str, dict] = {}
    for f in found:
        k = by_kind.setdefault(f["kind"], {"count": 0, "pss_kib": 0, "pss_anon_kib": 0,
                                           "pss_file_kib": 0, "rss_kib": 0, "threads": 0})
        k["count"] += 1
        for key in ("pss_kib", "pss_anon_kib", "pss_file_kib", "rss_kib", "threads"):
            k[key] += f[key]
    return {
        "runtime": runtime,
        "processes": found,
        "by_kind": by_kind,
        "count": len(found),
        "pss_kib": sum(f["pss_kib"] for f in found),
        "threads": sum(f["threads"] for f in found),
    }


def running(sock: str, prefix: str) -> int:
    out = subprocess.run(["ctr", "--address", sock, "tasks", "ls"], capture_output=True,
                         text=True, check=False).stdout
    n = 0
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith(prefix) and parts[2] == "RUNNING":
            n += 1
    return n


LIMIT_PATTERNS = [
    ("open files (RLIMIT_NOFILE)", re.compile(r"too many open files|EMFILE|ENFILE", re.I)),
    ("processes/threads (pid_max, threads-max, RLIMIT_NPROC or pids cgroup)",
     re.compile(r"resource temporarily unavailable|EAGAIN|cannot allocate thread", re.I)),
    ("memory", re.compile(r"cannot allocate memory|ENOMEM|out of memory", re.I)),
    ("space (disk, inotify or mounts)", re.compile(r"no space left on device|ENOSPC", re.I)),
]


def log_runtime(line: str) -> str:
    """Which runtime a containerd log line is about: its runtime= field, else the label the
    benchmarks put in container ids (tp-kiln-1-7, density-runc-3, warmup-kiln), else `-`."""
    m = re.search(r'runtime=io\.containerd\.(\w+)', line)
    if m:
        return m.group(1)
    m = re.search(r'\bid=\"?[a-z]+-(kiln|runc)\b', line)
    if m:
        return m.group(1)
    m = re.search(r'[a-z]+-(kiln|runc)-\d', line)
    return m.group(1) if m else "-"


def log_scan(path: str, skip: int = 0) -> dict:
    """Warnings and errors in a containerd log from line SKIP on, grouped by message and by the
    runtime they are about."""
    counts = {"error": 0, "warning": 0, "fatal": 0}
    by_runtime: dict[str, dict[str, int]] = {}
    examples: dict[str, int] = {}
    limits: dict[str, int] = {}
    try:
        lines = read(path).splitlines()[skip:]
    except OSError:
        lines = []
    for line in lines:
        m = re.search(r'level=(error|warning|fatal)', line)
        if not m:
            continue
        level = m.group(1)
        counts[level] += 1
        rt = log_runtime(line)
        by_runtime.setdefault(rt, {"error": 0, "warning": 0, "fatal": 0})[level] += 1
        msg = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
        err = re.search(r'error="((?:[^"\\]|\\.)*)"', line)
        text = msg.group(1) if msg else line
        if err:
            text += f" (error: {err.group(1)})"
        # Nested log text (a shim's stderr) is cut at its first line; ids, times and numbers
        # vary per container: fold them so one message is counted once.
        parts = text.split("\\n")
        nested = [x for x in parts[1:] if re.search(r"level=(warning|error|fatal)", x)]
        if nested:  # e.g. "cleanup warnings": keep the shim's own warnings, not its info lines
            text = parts[0].split(" time=")[0] + ": " + " | ".join(
                re.sub(r'^time=\\"[^\\]*\\" ', "", x) for x in nested)
        else:
            text = parts[0]
        text = text[:300]
        key = re.sub(r'time=\\"[^\\]*\\"', "time=T", text)
        key = re.sub(r"\b[0-9a-f]{12,}\b|\b\d+\b", "N", key)
        key = re.sub(r"\b[a-z]+-(kiln|runc)(-N)*\b", "ID", key)
        key = re.sub(r"/tmp/kiln-bench[^ /]*", "WORKDIR", key)
        k = f"{level} [{rt}]: {key}"
        examples[k] = examples.get(k, 0) + 1
        for name, pattern in LIMIT_PATTERNS:
            if pattern.search(line):
                limits[name] = limits.get(name, 0) + 1
    top = sorted(examples.items(), key=lambda kv: -kv[1])[:20]
    return {"counts": counts, "by_runtime": by_runtime,
            "messages": [{"count": c, "message": k} for k, c in top],
            "limit_hits": limits, "lines_scanned": len(lines)}


def end_of_run(host_facts: dict) -> dict:
    """The host facts, plus the load and the builds running at the end of the run."""
    out = dict(host_facts)
    out["loadavg_end"] = read("/proc/loadavg").split()[:3]
    out["concurrent_builds_end"] = len(busy_processes())
    return out


def shared_note(h: dict) -> str | None:
    builds = max(h.get("concurrent_builds") or 0, h.get("concurrent_builds_end") or 0)
    if builds:
        return (f"note: the machine was shared: {builds} compiler processes were running "
                f"(load {' '.join(h.get('loadavg', []))} at the start, "
                f"{' '.join(h.get('loadavg_end', []))} at the end)")
    return None


def keep_log(meta: dict) -> str | None:
    """Copy the containerd log next to the report (the work dir is removed on exit)."""
    dest = re.sub(r"\.json$", "", meta["out"]) + "-containerd.log"
    try:
        shutil.copyfile(meta["containerd_log"], dest)
    except OSError:
        return None
    return dest


def finish_report(meta: dict, report: dict, scan: dict) -> None:
    """The common end of every report: the log scan, the shared-machine note, the JSON."""
    print_log_scan(scan)
    note = shared_note(report["host"])
    if note:
        print(note)
    kept = keep_log(meta)
    write_json(meta["out"], report)
    print(f'\nreport: {meta["out"]}' + (f"; containerd log: {kept}" if kept else ""))


def print_log_scan(scan: dict) -> None:
    c = scan["counts"]
    per = "; ".join(f'{rt}: {v["error"]} errors, {v["warning"]} warnings'
                    for rt, v in sorted(scan["by_runtime"].items()))
    print(f'containerd log: {c["error"]} errors, {c["warning"]} warnings, {c["fatal"]} fatal'
          + (f" ({per})" if per else ""))
    for m in scan["messages"][:10]:
        print(f'  {m["count"]:5d} x {m["message"]}')


# --- throughput --------------------------------------------------------------------------------

def throughput_report(meta_path: str) -> None:
    meta = load_json(meta_path)
    passes = []
    for p in meta["passes"]:
        lat = []
        failures = 0
        for line in read(p["samples"]).splitlines():
            _n, rc, t0, t1 = line.split()
            if rc != "0":
                failures += 1
            else:
                lat.append((int(t1) - int(t0)) / 1e6)
        errors = read(p["errors"]).splitlines() if os.path.exists(p["errors"]) else []
        wall_s = (p["end_ns"] - p["start_ns"]) / 1e9
        recorded = failures + len(lat)
        passes.append({
            "label": p["label"], "pass": p["pass"], "runtime": p["runtime"],
            "image": p["image"], "args": p["args"],
            "tasks": meta["tasks"], "recorded": recorded, "failures": failures,
            "wall_s": round(wall_s, 3),
            "tasks_per_s": round(meta["tasks"] / wall_s, 2),
            "ok_per_s": round(len(lat) / wall_s, 2),
            "latency": summary_ms(lat),
            "latencies_ms": [round(x, 3) for x in lat],
            "errors": errors[:20],
            "leftover_containers": p.get("leftover", 0),
        })
    scan = log_scan(meta["containerd_log"])
    report = {
        "benchmark": "throughput",
        "host": end_of_run(meta["host"]),
        "shim_grouping": meta.get("shim_grouping") or None,
        "method": "M `ctr run --rm --runtime RUNTIME IMAGE ID ARGS` with unique ids, at most P "
                  "at once (xargs -P), on a private containerd; tasks_per_s = M / wall time of "
                  "the whole pass; latency = wall time of each successful `ctr run` (ctr "
                  "start-up included, date +%s%N), p90 by linear interpolation; one untimed "
                  "run per runtime first (fills the compile cache)",
        "tasks": meta["tasks"], "parallel": meta["parallel"],
        "passes": passes,
        "containerd_log": scan,
    }
    print()
    print(f'throughput: {meta["tasks"]} x `ctr run --rm`, at most {meta["parallel"]} at once; '
          f'shim grouping: {grouping_label(meta.get("shim_grouping"))}')
    print(f'{"runtime":<8} {"pass":>4} {"tasks":>6} {"fail":>5} {"wall s":>8} {"tasks/s":>8} '
          f'{"median ms":>10} {"p90 ms":>8}  workload')
    for p in passes:
        lat = p["latency"]
        med = f'{lat["median_ms"]:10.1f}' if lat["n"] else f'{"-":>10}'
        p90 = f'{lat["p90_ms"]:8.1f}' if lat["n"] else f'{"-":>8}'
        print(f'{p["label"]:<8} {p["pass"]:>4} {p["tasks"]:>6} {p["failures"]:>5} '
              f'{p["wall_s"]:8.2f} {p["tasks_per_s"]:8.2f} {med} {p90}  '
              f'{" ".join([p["image"], *p["args"]])}')
    for p in passes:
        if p["errors"]:
            print(f'{p["label"]} pass {p["pass"]}: first failures:')
            for e in p["errors"][:5]:
                print(f"  {e[:300]}")
        if p["leftover_containers"]:
            print(f'{p["label"]} pass {p["pass"]}: {p["leftover_containers"]} containers were '
                  "left behind by `ctr run --rm` (removed)")
    finish_report(meta, report, scan)


# --- density -----------------------------------------------------------------------------------

def mib(kib: float) -> float:
    return round(kib / MIB, 2)


def density_phase(ph: dict) -> dict:
    before, after = ph["before"], ph["after"]
    n = ph["n"]
    added_pss = after["pss_kib"] - before["pss_kib"]
    added_procs = after["count"] - before["count"]
    cd_growth = ph["containerd_pss_after_kib"] - ph["containerd_pss_before_kib"]
    total = added_pss + cd_growth
    running_n = ph["running"]
    per = running_n if running_n else n
    kinds = {}
    for kind, k in sorted(after["by_kind"].items()):
        b = before["by_kind"].get(kind, {"count": 0, "pss_kib": 0, "threads": 0})
        kinds[kind] = {
            "count": k["count"], "count_added": k["count"] - b["count"],
            "pss_mib": mib(k["pss_kib"]), "pss_added_mib": mib(k["pss_kib"] - b["pss_kib"]),
            "pss_anon_mib": mib(k["pss_anon_kib"]), "pss_file_mib": mib(k["pss_file_kib"]),
            "rss_mib": mib(k["rss_kib"]), "threads": k["threads"],
            "pss_per_process_mib": mib(k["pss_kib"] / k["count"]) if k["count"] else None,
        }
    mem_b, mem_a = ph["mem_before"], ph["mem_after"]
    return {
        "label": ph["label"], "runtime": ph["runtime"], "image": ph["image"],
        "args": ph["args"], "requested": n, "start_failures": ph["start_failures"],
        "running": running_n,
        "start_wall_s": round(ph["start_wall_s"], 3),
        "start_latency": ph.get("start_latency"),
        "by_kind": kinds,
        "processes_added": added_procs,
        "processes_per_container": round(added_procs / per, 2) if per else None,
        "threads_added": after["threads"] - before["threads"],
        "shim_pss_added_mib": mib(added_pss),
        "containerd_pss_before_mib": mib(ph["containerd_pss_before_kib"]),
        "containerd_pss_after_mib": mib(ph["containerd_pss_after_kib"]),
        "containerd_pss_growth_mib": mib(cd_growth),
        "total_pss_mib": mib(total),
        "pss_per_container_mib": mib(total / per) if per else None,
        "procs_pss_per_container_mib": mib(added_pss / per) if per else None,
        "mem_available_before_mib": mib(mem_b["MemAvailable"]),
        "mem_available_after_mib": mib(mem_a["MemAvailable"]),
        "mem_available_drop_per_container_mib":
            mib((mem_b["MemAvailable"] - mem_a["MemAvailable"]) / per) if per else None,
        "leftover_processes_after_cleanup": ph.get("leftover", 0),
        "errors": ph.get("errors", [])[:20],
    }


def read_latencies(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    lat = []
    for line in read(path).splitlines():
        _n, rc, t0, t1 = line.split()
        if rc == "0":
            lat.append((int(t1) - int(t0)) / 1e6)
    return summary_ms(lat)


def load_phase(p: dict) -> dict:
    ph = dict(p)
    ph["before"] = load_json(p["before"])
    ph["after"] = load_json(p["after"])
    ph["mem_before"] = load_json(p["mem_before"])
    ph["mem_after"] = load_json(p["mem_after"])
    ph["start_latency"] = read_latencies(p["samples"])
    ph["errors"] = read(p["errors"]).splitlines() if os.path.exists(p["errors"]) else []
    return ph


def density_report(meta_path: str) -> None:
    meta = load_json(meta_path)
    phases = [density_phase(load_phase(p)) for p in meta["phases"]]
    scan = log_scan(meta["containerd_log"])
    report = {
        "benchmark": "density",
        "host": end_of_run(meta["host"]),
        "shim_grouping": meta.get("shim_grouping") or None,
        "method": "N idle containers started with `ctr run -d` (at most P at once) on a private "
                  "containerd; once all are RUNNING (plus a short settle), PSS from "
                  "/proc/PID/smaps_rollup of every process the runtime added (kiln: all "
                  "containerd-shim-kiln-v1 processes of this containerd, classified by parent "
                  "as shim/zygote/worker; runc: containerd-shim-runc-v2 processes and their "
                  "children) plus the growth of containerd's own PSS; per container = total / "
                  "containers running. MemAvailable is system-wide and noisy on a shared machine.",
        "n": meta["n"], "parallel": meta["parallel"],
        "phases": phases,
        "containerd_log": scan,
    }
    print()
    print(f'density: {meta["n"]} idle containers per runtime; shim grouping: '
          f'{grouping_label(meta.get("shim_grouping"))}')
    print("PSS/ctr: (runtime processes + containerd growth) / containers; procs only: without "
          "containerd's growth (its Go heap makes that part noisy at small N)")
    print(f'{"runtime":<7} {"running":>7} {"procs/ctr":>9} {"PSS/ctr MiB":>11} '
          f'{"procs only":>10} {"total MiB":>9} {"containerd +MiB":>15} {"MemAvail drop/ctr":>17}'
          "  processes (count: PSS MiB)")

    def cell(v, width, fmt="{:.2f}"):
        return f"{'-' if v is None else fmt.format(v):>{width}}"

    for ph in phases:
        kinds = ", ".join(f'{k} {v["count"]}: {v["pss_mib"]:.1f}'
                          for k, v in ph["by_kind"].items())
        per_procs = ph["procs_pss_per_container_mib"]
        print(f'{ph["label"]:<7} {ph["running"]:>3}/{ph["requested"]:<3} '
              f'{cell(ph["processes_per_container"], 9, "{:.1f}")} '
              f'{cell(ph["pss_per_container_mib"], 11)} {cell(per_procs, 10)} '
              f'{ph["total_pss_mib"]:>9.1f} {ph["containerd_pss_growth_mib"]:>15.1f} '
              f'{cell(ph["mem_available_drop_per_container_mib"], 17)}  {kinds}')
    print("per-process PSS (MiB, mean): " + "; ".join(
        f'{ph["label"]} ' + ", ".join(f'{k} {v["pss_per_process_mib"]}' for k, v in ph["by_kind"].items())
        for ph in phases))
    for ph in phases:
        lat = ph["start_latency"]
        if lat and lat.get("n"):
            print(f'{ph["label"]}: `ctr run -d` median {lat["median_ms"]:.1f} ms, p90 '
                  f'{lat["p90_ms"]:.1f} ms; all {ph["requested"]} started in {ph["start_wall_s"]:.1f} s')
        if ph["start_failures"]:
            print(f'{ph["label"]}: {ph["start_failures"]} starts failed; first: '
                  + "; ".join(e[:200] for e in ph["errors"][:3]))
        if ph["leftover_processes_after_cleanup"]:
            print(f'{ph["label"]}: {ph["leftover_processes_after_cleanup"]} processes still '
                  "there after cleanup")
    finish_report(meta, report, scan)


def scale_report(meta_path: str) -> None:
    meta = load_json(meta_path)
    ph = load_phase(meta["phase"])
    d = density_phase(ph)
    scan = log_scan(meta["containerd_log"])
    # Numbers where the shell gave numbers as strings ("unlimited" stays a string).
    limits = {k: (int(v) if isinstance(v, str) and v.isdigit() else v)
              for k, v in meta["limits"].items()}
    hits = []
    for name, count in scan["limit_hits"].items():
        hits.append(f"containerd log: {count} lines about {name}")
    err_text = "\n".join(ph["errors"])
    for name, pattern in LIMIT_PATTERNS:
        n = len(pattern.findall(err_text))
        if n:
            hits.append(f"ctr errors: {n} about {name}")
    if isinstance(limits.get("containerd_fds_after"), int) and \
            isinstance(limits.get("containerd_nofile_soft"), int):
        if limits["containerd_fds_after"] >= 0.9 * limits["containerd_nofile_soft"]:
            hits.append(f'containerd holds {limits["containerd_fds_after"]} fds of its '
                        f'{limits["containerd_nofile_soft"]} limit')
    if limits.get("tasks_after") and limits.get("pid_max"):
        if limits["tasks_after"] >= 0.9 * min(limits["pid_max"], limits["threads_max"]):
            hits.append(f'{limits["tasks_after"]} threads on the machine, close to pid_max/threads-max')
    report = {
        "benchmark": "density-scale",
        "host": end_of_run(meta["host"]),
        "shim_grouping": meta.get("shim_grouping") or None,
        "method": "K idle Kiln sleepers started with `ctr run -d`, at most P at once; counted "
                  "RUNNING after all starts returned (with a wait of up to the timeout); PSS as "
                  "in the density benchmark; time = from the first start to the count",
        "k": meta["k"], "parallel": meta["parallel"],
        "result": d,
        "time_to_running_s": round(meta["time_to_running_s"], 3),
        "cleanup_s": round(meta.get("cleanup_s", 0), 3),
        "mem_free_before_mib": mib(ph["mem_before"]["MemFree"]),
        "mem_free_after_mib": mib(ph["mem_after"]["MemFree"]),
        "limits": limits,
        "limit_hits": hits,
        "containerd_log": scan,
    }
    print()
    print(f'density at scale: {meta["k"]} Kiln sleepers, at most {meta["parallel"]} starts at once; '
          f'shim grouping: {grouping_label(meta.get("shim_grouping"))}')
    print(f'  reached RUNNING     {d["running"]} of {meta["k"]} ({d["start_failures"]} starts failed)')
    print(f'  time                {meta["time_to_running_s"]:.1f} s to start all '
          f'({d["running"] / meta["time_to_running_s"]:.1f} containers/s); cleanup {meta.get("cleanup_s", 0):.1f} s')
    print(f'  processes added     {d["processes_added"]} ('
          + ", ".join(f'{k} {v["count"]}' for k, v in d["by_kind"].items())
          + f'), {d["threads_added"]} threads')
    print(f'  total PSS           {d["total_pss_mib"]:.1f} MiB (shim processes '
          f'{d["shim_pss_added_mib"]:.1f} + containerd growth {d["containerd_pss_growth_mib"]:.1f}); '
          f'{d["pss_per_container_mib"]} MiB per container')
    print(f'  MemFree             {report["mem_free_before_mib"]:.0f} -> {report["mem_free_after_mib"]:.0f} MiB; '
          f'MemAvailable {d["mem_available_before_mib"]:.0f} -> {d["mem_available_after_mib"]:.0f} MiB '
          f'({d["mem_available_drop_per_container_mib"]} MiB per container)')
    print(f'  limits              ulimit -n {limits["ulimit_n"]} (containerd: {limits["containerd_nofile_soft"]}, '
          f'{limits["containerd_fds_after"]} fds open at the peak), ulimit -u {limits["ulimit_u"]}, '
          f'pid_max {limits["pid_max"]}, threads-max {limits["threads_max"]}, '
          f'{limits["tasks_after"]} threads on the machine at the peak')
    mem_max = limits.get("containerd_memory_cgroup_max")
    if isinstance(mem_max, int) and mem_max >= 2**62:
        mem_max = "none"
    print(f'  cgroups             containerd (and the shims): pids.max '
          f'{limits.get("containerd_pids_cgroup_max")}, memory limit {mem_max}')
    if hits:
        print("  LIMIT HIT: " + "; ".join(hits))
    else:
        print("  no limit hit (no EMFILE/EAGAIN/ENOMEM/ENOSPC in the containerd log or ctr errors)")
    if ph["errors"]:
        print("  first failures: " + "; ".join(e[:200] for e in ph["errors"][:3]))
    finish_report(meta, report, scan)


# --- HTTP serving --------------------------------------------------------------------------------

HTTP_SERVERS = {
    "kiln": "http-p2 component in a Kiln container (io.containerd.kiln.v1, --net-host)",
    "wasmtime": "http-p2 component under `wasmtime serve -S cli` (host process)",
    "native": "bench/native-echo (hyper, static) in a runc container (--net-host)",
}


def parse_phases(line: str) -> dict:
    """`requests=N context_us=1.2 ...` (Kiln's `http phases` log line) as a dict of numbers."""
    out = {}
    for m in re.finditer(r"(\w+)=([0-9.]+)", line or ""):
        out[m.group(1)] = float(m.group(2)) if "." in m.group(2) else int(m.group(2))
    return out


def http_run(run: dict, clk_tck: int) -> dict | None:
    w = run["wrk"]
    if not w.get("requests") or not w.get("duration_us"):
        return None
    lat = w["latency_us"]
    errors = w["errors"]
    return {
        "round": run["round"],
        "requests": w["requests"],
        "duration_s": round(w["duration_us"] / 1e6, 3),
        "requests_per_s": round(w["requests"] / (w["duration_us"] / 1e6), 1),
        "latency_ms": {k: round(v / 1000, 3) for k, v in lat.items()},
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "non_2xx": errors["status"],
        "errors": errors,
        "server_cpu_us_per_request": round(run["cpu_ticks"] / clk_tck * 1e6 / w["requests"], 2),
        "server_cpu_cores": round(run["cpu_ticks"] / clk_tck / (w["duration_us"] / 1e6), 3),
    }


def http_report(meta_path: str) -> None:
    meta = load_json(meta_path)
    clk = meta["clk_tck"]
    servers = {}
    for label in HTTP_SERVERS:
        runs = [x for x in meta["runs"] if x["label"] == label]
        samples = [r for r in (http_run(x, clk) for x in runs if x["kind"] == "sample") if r]
        failed = sum(1 for x in runs if x["kind"] == "sample") - len(samples)

        def med(f):
            xs = [f(r) for r in samples]
            return round(statistics.median(xs), 3) if xs else None

        servers[label] = {
            "what": HTTP_SERVERS[label],
            "rounds": samples,
            "failed_runs": failed,
            "warmup": [r for r in (http_run(x, clk) for x in runs if x["kind"] == "warmup") if r],
            "median": {
                "requests_per_s": med(lambda r: r["requests_per_s"]),
                "p50_ms": med(lambda r: r["latency_ms"]["p50"]),
                "p90_ms": med(lambda r: r["latency_ms"]["p90"]),
                "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
                "max_ms": med(lambda r: r["latency_ms"]["max"]),
                "server_cpu_us_per_request": med(lambda r: r["server_cpu_us_per_request"]),
                "server_cpu_cores": med(lambda r: r["server_cpu_cores"]),
            },
            "socket_errors": sum(r["socket_errors"] for r in samples),
            "non_2xx": sum(r["non_2xx"] for r in samples),
        }
    rps = {k: v["median"]["requests_per_s"] for k, v in servers.items()}
    ratios = {}
    for other in ("wasmtime", "native"):
        if rps["kiln"] and rps[other]:
            ratios[f"kiln/{other}"] = round(rps["kiln"] / rps[other], 3)
    target = 1.5
    met = ratios.get("kiln/wasmtime") is not None and ratios["kiln/wasmtime"] >= target

    ph = parse_phases(meta.get("kiln_phases", ""))
    breakdown = None
    kcpu = servers["kiln"]["median"]["server_cpu_us_per_request"]
    ncpu = servers["native"]["median"]["server_cpu_us_per_request"]
    if ph.get("requests"):
        breakdown = {
            "phases_us": ph,
            "kiln_cpu_us_per_request": kcpu,
            "native_cpu_us_per_request": ncpu,
            # native-echo is the same HTTP stack answering the same bytes (and logging a line):
            # what Kiln spends beyond it is the Wasm part of a request.
            "wasm_cpu_us_per_request": (round(kcpu - ncpu, 2)
                                        if kcpu is not None and ncpu is not None else None),
        }

    scan = log_scan(meta["containerd_log"])
    report = {
        "benchmark": "http",
        "host": end_of_run(meta["host"]),
        "uptime_before": meta["uptime_before"],
        "uptime_after": meta["uptime_after"],
        "method": "wrk -t THREADS -c CONNECTIONS -d DURATION --latency against GET /bench on "
                  "127.0.0.1, per server, rounds interleaved (kiln, wasmtime, native), after an "
                  "untimed warm-up per server; requests_per_s = wrk's requests / its duration; "
                  "latency from wrk's histogram; server CPU = utime+stime of the serving "
                  "process (/proc/PID/stat, all threads) over the run / requests; medians over "
                  "the rounds; wrk shares the machine's CPUs with the servers. Kiln's phases "
                  "are the worker's own per-request means over its whole life (warm-up "
                  "included), wall time (so a phase preempted by another process on a busy "
                  "machine counts the wait), logged at debug level when it stops; "
                  "wasm_cpu_us_per_request = Kiln's server CPU per request - native-echo's",
        "duration_s": meta["duration_s"], "rounds": meta["rounds"],
        "connections": meta["connections"], "threads": meta["threads"],
        "warmup_s": meta["warmup_s"],
        "wasmtime": meta["wasmtime"], "wrk": meta["wrk"],
        "servers": servers,
        "ratios": ratios,
        "target": {"kiln/wasmtime": target, "met": met},
        "kiln_breakdown": breakdown,
        "containerd_log": scan,
    }

    print()
    print(f'HTTP: wrk -t{meta["threads"]} -c{meta["connections"]} -d{meta["duration_s"]}s, '
          f'{meta["rounds"]} rounds interleaved; medians over the rounds')
    print(f'{"server":<9} {"req/s":>9} {"p50 ms":>8} {"p90 ms":>8} {"p99 ms":>8} {"max ms":>8} '
          f'{"CPU us/req":>10} {"CPU cores":>9} {"errors":>6}  per-round req/s')
    for label, sv in servers.items():
        m = sv["median"]

        def cell(v, width, fmt="{:.2f}"):
            return f"{'-' if v is None else fmt.format(v):>{width}}"

        print(f'{label:<9} {cell(m["requests_per_s"], 9, "{:.0f}")} {cell(m["p50_ms"], 8)} '
              f'{cell(m["p90_ms"], 8)} {cell(m["p99_ms"], 8)} {cell(m["max_ms"], 8)} '
              f'{cell(m["server_cpu_us_per_request"], 10, "{:.1f}")} '
              f'{cell(m["server_cpu_cores"], 9)} '
              f'{sv["socket_errors"] + sv["non_2xx"] + sv["failed_runs"]:>6}  '
              + " ".join(f'{r["requests_per_s"]:.0f}' for r in sv["rounds"]))
    for name, r in ratios.items():
        print(f"req/s ratio {name}: {r:.2f}")
    if "kiln/wasmtime" in ratios:
        print(f'target kiln >= {target}x wasmtime serve: {"met" if met else "NOT met"}')
    if breakdown:
        p = breakdown["phases_us"]
        print(f'Kiln per request ({p["requests"]} requests over the server\'s life; phase means, '
              "wall time, us):")
        print(f'  context {p.get("context_us")}  instantiate {p.get("instantiate_us")} (max '
              f'{p.get("instantiate_max_us")})  handler {p.get("handler_us")}  teardown '
              f'{p.get("teardown_us")}  slot to response head {p.get("to_response_us")}')
        if breakdown["wasm_cpu_us_per_request"] is not None:
            print(f'  server CPU {kcpu:.1f} us/request against native-echo\'s {ncpu:.1f} (the '
                  f'same hyper/tokio/TCP path): {breakdown["wasm_cpu_us_per_request"]:.1f} '
                  "us/request for the Wasm part (the phases above, as CPU time)")
    else:
        print("Kiln's phase times: none (no `http phases` line in containerd's log)")
    print(f'uptime before: {meta["uptime_before"].strip()}')
    print(f'uptime after:  {meta["uptime_after"].strip()}')
    finish_report(meta, report, scan)


# --- cold-start chart --------------------------------------------------------------------------

def run_gnuplot(gnuplot: str, script: str, size: str, png_path: str) -> int:
    """Runs SCRIPT, whose first line sets `pngcairo size SIZE`; falls back to the plain png
    terminal where gnuplot has no cairo. Prints where the chart went; 1 if it failed."""
    result = subprocess.run([gnuplot], input=script, text=True, capture_output=True,
                            check=False)
    if result.returncode != 0 and "pngcairo" in result.stderr:
        script = script.replace(f'set terminal pngcairo size {size} font ",10"',
                                f"set terminal png size {size}")
        result = subprocess.run([gnuplot], input=script, text=True, capture_output=True,
                                check=False)
    if result.returncode != 0:
        print(f"bench.py: gnuplot failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"chart: {png_path}")
    return 0


def coldstart_plot(json_path: str, png_path: str) -> int:
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        print("bench.py: gnuplot not found; no chart", file=sys.stderr)
        return 1
    report = load_json(json_path)
    rts = report["runtimes"]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "samples.dat")
        cold = os.path.join(tmp, "cold.dat")
        with open(data, "w") as f:
            for i, rt in enumerate(rts):
                f.write(f'# {rt["label"]}\n')
                for ms in rt["samples_ms"]:
                    f.write(f"{i + 1} {ms}\n")
                f.write("\n\n")
        has_cold = False
        with open(cold, "w") as f:
            for i, rt in enumerate(rts):
                if rt.get("cold_cache_ms") is not None:
                    has_cold = True
                    f.write(f'{i + 1} {rt["cold_cache_ms"]}\n')

        def clean(label: str) -> str:  # a --runtime NAME may hold anything
            return re.sub(r'[`"\\\\]', "'", label)

        xtics = ", ".join(f'"{clean(rt["label"])}\\n(median {rt["summary"]["median_ms"]:.0f} ms)" {i + 1}'
                          for i, rt in enumerate(rts))
        h = report.get("host", {})
        title = (f'cold start: wall time of ctr run --rm, {report.get("rounds")} rounds '
                 f'interleaved\\n{report.get("date", "")[:10]}, {h.get("cpus")} CPUs, kernel '
                 f'{h.get("kernel")}, containerd {(h.get("containerd") or "? ?").split()[-1]}')
        # gnuplot runs `...` in double-quoted strings as a shell command: no backquotes.
        title = title.replace('"', "'").replace("`", "'")
        plots = [f"for [i=0:{len(rts) - 1}] '{data}' index i using (i+1):2 with boxplot "
                 "lc rgb '#4477aa' fs transparent solid 0.25 notitle",
                 f"for [i=0:{len(rts) - 1}] '{data}' index i using ($1 + (rand(0) - 0.5) * 0.25):2 "
                 "with points pt 7 ps 0.6 lc rgb '#222222' notitle"]
        if has_cold:
            plots.append(f"'{cold}' using 1:2 with points pt 9 ps 2 lc rgb '#cc3311' "
                         "title 'first run after emptying the compile cache'")
        script = f"""
set terminal pngcairo size 900,600 font ",10"
set output '{png_path}'
set title "{title}"
set ylabel "ms"
set xrange [0.4:{len(rts) + 0.6}]
set yrange [0:*]
set xtics ({xtics}) nomirror
set grid ytics
set termoption noenhanced
set bmargin 6
set key at screen 0.5, 0.04 center horizontal
set style boxplot outliers pointtype 7
set style data boxplot
set boxwidth 0.5
set samples 1000
plot {", ".join(plots)}
"""
        return run_gnuplot(gnuplot, script, "900,600", png_path)


# --- CRI ---------------------------------------------------------------------------------------

# (key, label, unit, value of one round); times in ms, memory in MiB.
CRI_FIGURES = [
    ("run_pod_ms", "RunPodSandbox", "ms", lambda r: r["run_pod_ms"]),
    ("create_ms", "CreateContainer", "ms", lambda r: r["create_ms"]),
    ("start_exited_ms", "StartContainer -> EXITED", "ms", lambda r: r["start_exited_ms"]),
    ("create_start_exited_ms", "Create + Start -> EXITED", "ms",
     lambda r: r["create_start_exited_ms"]),
    ("pod_pss_mib", "pod PSS (shim + descendants)", "MiB", lambda r: r["pod"]["pss_kib"] / MIB),
    ("pod_pss_anon_mib", "  of which anonymous", "MiB", lambda r: r["pod"]["pss_anon_kib"] / MIB),
    ("pod_pss_file_mib", "  of which file pages", "MiB", lambda r: r["pod"]["pss_file_kib"] / MIB),
    ("shim_pss_mib", "  shim", "MiB", lambda r: cri_role(r, "shim")),
    ("sandbox_pss_mib", "  sandbox (pause / Kiln's)", "MiB", lambda r: cri_role(r, "sandbox")),
    ("container_pss_mib", "  idle container", "MiB", lambda r: cri_role(r, "container")),
    ("other_pss_mib", "  other (Kiln's zygote)", "MiB", lambda r: cri_role(r, "other")),
    ("pod_uss_mib", "pod USS (private pages)", "MiB", lambda r: r["pod"]["uss_kib"] / MIB),
    ("pod_rss_mib", "pod RSS", "MiB", lambda r: r["pod"]["rss_kib"] / MIB),
    ("processes", "processes per pod", "", lambda r: len(r["processes"])),
    ("peers", "same binary outside the pod", "", lambda r: r["peers"]),
    ("pod_working_set_mib", "pod working set (PodSandboxStats)", "MiB",
     lambda r: r["pod_working_set_bytes"] / MIB / 1024),
    ("container_working_set_mib", "idle container working set", "MiB",
     lambda r: r["container_working_set_bytes"] / MIB / 1024),
]

COUNTS = ("processes", "peers")


def cri_role(r: dict, role: str) -> float:
    return sum(p["pss_kib"] for p in r["processes"] if p["role"] == role) / MIB


def spread(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "min": round(min(xs), 3), "median": round(statistics.median(xs), 3),
            "max": round(max(xs), 3)}


def cri_report(meta_path: str) -> None:
    meta = load_json(meta_path)
    raw = load_json(meta["raw"])
    runtimes = {rt["handler"]: rt for rt in raw["runtimes"]}
    summary = {}
    for handler, rt in runtimes.items():
        summary[handler] = {key: spread([f(r) for r in rt["rounds"]])
                            for key, _label, _unit, f in CRI_FIGURES}
    ratios = {}
    if "kiln" in summary and "runc" in summary:
        for key, *_ in CRI_FIGURES:
            k, r = summary["kiln"][key], summary["runc"][key]
            if k.get("n") and r.get("n") and r["median"]:
                ratios[key] = round(k["median"] / r["median"], 3)
    scan = log_scan(meta["containerd_log"])
    host_facts = end_of_run(meta["host"])
    host_facts["containerd"] = raw.get("containerd") or meta.get("containerd_version")
    report = {
        "benchmark": "cri",
        "host": host_facts,
        "method": "tests/tests/cri_kiln.rs `figures` through the CRI harness (tests/src/cri.rs): "
                  "one untimed round per handler, then ROUNDS rounds running runc and Kiln in "
                  "turn, alternating which goes first; per round a host-network pod "
                  "(RunPodSandbox timed), a short container timed from CreateContainer and from "
                  "StartContainer to EXITED (ContainerStatus polled every 2 ms), then an idle "
                  "container and, 1 s after it is RUNNING, the PSS, USS and RSS of the pod's shim "
                  "and all its descendants (/proc/PID/smaps_rollup), the processes outside the "
                  "pod running the same shim binary (they share its file pages), and the CRI "
                  "working sets",
        "rounds": raw["rounds"],
        "runtimes": {h: {"echo": rt["echo"], "idle": rt["idle"]} for h, rt in runtimes.items()},
        "summary": summary,
        "ratio_kiln_runc_medians": ratios,
        "targets": cri_targets(summary, ratios),
        "raw": raw["runtimes"],
        "containerd_log": scan,
    }
    handlers = [h for h in ("runc", "kiln") if h in summary] + \
        [h for h in summary if h not in ("runc", "kiln")]
    print()
    print(f'CRI: {host_facts["containerd"]}, {raw["rounds"]} rounds, host-network pods; '
          "min / median / max")
    for h in handlers:
        print(f'  {h}: echo {runtimes[h]["echo"]}; idle {runtimes[h]["idle"]}')
    head = f'{"figure":<36}' + "".join(f"{h:>24}" for h in handlers) + f'{"kiln/runc":>11}'
    print(head)
    for key, label, unit, _f in CRI_FIGURES:
        cells = []
        for h in handlers:
            s = summary[h][key]
            prec = 0 if key in COUNTS else (1 if unit == "ms" else 2)
            cells.append(f'{s["min"]:.{prec}f} / {s["median"]:.{prec}f} / {s["max"]:.{prec}f}'
                         if s.get("n") else "-")
        name = f"{label} ({unit})" if unit else label
        ratio = f'{ratios[key]:.2f}' if key in ratios else "-"
        print(f"{name:<36}" + "".join(f"{c:>24}" for c in cells) + f"{ratio:>11}")
    for t in report["targets"]:
        print(f'target: {t["what"]}: {"met" if t["met"] else "missed"} ({t["value"]})')
    finish_report(meta, report, scan)


def cri_targets(summary: dict, ratios: dict) -> list[dict]:
    """Issue 8's targets, reported (never judged by the script's exit status)."""
    out = []
    for key, what in (("run_pod_ms", "Kiln's RunPodSandbox at most half of runc's"),
                      ("create_start_exited_ms", "Kiln's create -> EXITED at most half of runc's")):
        if key in ratios:
            out.append({"what": what, "met": ratios[key] <= 0.5,
                        "value": f"median ratio {ratios[key]:.2f}"})
    k = summary.get("kiln", {})
    pss = k.get("pod_pss_mib", {})
    if pss.get("n"):
        out.append({"what": "a Kiln pod's PSS (shim, sandbox, one container) under 2 MiB",
                    "met": pss["median"] < 2,
                    "value": f'median {pss["median"]:.2f} MiB; anonymous '
                             f'{k["pod_pss_anon_mib"]["median"]:.2f}, USS '
                             f'{k["pod_uss_mib"]["median"]:.2f}'})
    return out


# --- command line ------------------------------------------------------------------------------

# --- the seeds' table --------------------------------------------------------------------------

def image_size(tar_path: str) -> dict:
    """The layers an image tarball (OCI layout) holds: their sizes as stored and gzipped."""
    with tarfile.open(tar_path) as t:
        def blob(digest: str) -> bytes:
            algo, _, hexd = digest.partition(":")
            f = t.extractfile(f"blobs/{algo}/{hexd}")
            if f is None:
                raise ValueError(f"{tar_path}: no blob {digest}")
            return f.read()
        index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        layers = []
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            gz = layer["mediaType"].endswith("gzip")
            layers.append({"media_type": layer["mediaType"], "bytes": len(data),
                           "gzip_bytes": len(data) if gz else len(gzip.compress(data, 6))})
    return {"tar": tar_path, "tar_bytes": os.path.getsize(tar_path), "layers": layers,
            "layers_bytes": sum(x["bytes"] for x in layers),
            "layers_gzip_bytes": sum(x["gzip_bytes"] for x in layers)}


def proc_stat_cpu() -> tuple[int, int]:
    """Busy and total jiffies of /proc/stat's `cpu` line (busy: user nice system irq softirq
    steal; idle and iowait are not busy)."""
    f = [int(x) for x in read("/proc/stat").splitlines()[0].split()[1:]]
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return busy, sum(f[:8])


def cpu_sampler(out_path: str) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(out_path, "w") as f:
        while not stop:
            busy, total = proc_stat_cpu()
            f.write(f"{time.monotonic_ns()} {busy} {total}\n")
            f.flush()
            time.sleep(0.1)


def peak_busy(cpu_path: str) -> float | None:
    """The busiest interval between two samples, as a share of the node (the sampler runs from
    just before the burst to just after it)."""
    rows = []
    for line in read(cpu_path).splitlines():
        _t, b, tot = (int(x) for x in line.split())
        rows.append((b, tot))
    best = None
    for (b0, n0), (b1, n1) in zip(rows, rows[1:]):
        if n1 > n0:
            share = (b1 - b0) / (n1 - n0)
            best = share if best is None else max(best, share)
    return best


def seeds_side(side: dict, meta: dict) -> dict:
    d = side["dir"]
    one = read_latencies(os.path.join(d, "one", "samples"))
    burst_lat = read_latencies(os.path.join(d, "burst", "samples"))
    wall = load_json(os.path.join(d, "burst", "wall.json"))
    burst_s = (wall["end_ns"] - wall["start_ns"]) / 1e9
    cpus = meta["host"].get("cpus") or os.cpu_count() or 1
    cpu_s = wall["busy_jiffies"] / meta["clk_tck"]
    failed = 0
    for sub in ("one", "burst", "idle"):
        for line in read(os.path.join(d, sub, "samples")).splitlines():
            if line.split()[1] != "0":
                failed += 1
    idle_dir = os.path.join(d, "idle")
    before, after = load_json(os.path.join(idle_dir, "before.json")), load_json(os.path.join(idle_dir, "after.json"))
    n = side["idle_running"] or meta["idle"]

    def num(name: str) -> int:
        return int(read(os.path.join(idle_dir, name)).strip())
    cd_growth = num("containerd-pss-after") - num("containerd-pss-before")
    fds_per = (num("containerd-fds-after") - num("containerd-fds-before")) / n
    pss_per_kib = (after["pss_kib"] - before["pss_kib"] + cd_growth) / n
    # Every process is at least one thread: threads are the tasks pid_max counts.
    tasks_per = (after["threads"] - before["threads"]) / n
    mem_avail_kib = load_json(os.path.join(idle_dir, "mem-before.json"))["MemAvailable"]
    bounds = {"memory (MemAvailable)": int(mem_avail_kib / pss_per_kib) if pss_per_kib > 0 else None,
              "pid_max (processes and threads)": int(meta["pid_max"] / tasks_per) if tasks_per > 0 else None}
    nofile = meta.get("containerd_nofile")
    if fds_per > 0 and str(nofile).isdigit():
        bounds["containerd's open files (RLIMIT_NOFILE)"] = int(int(nofile) / fds_per)
    known = {k: v for k, v in bounds.items() if v}
    binding = min(known, key=lambda k: known[k]) if known else None
    image = load_json(os.path.join(d, "image.json"))
    return {
        "label": side["label"], "runtime": side["runtime"], "image": side["image"],
        "program": side["program"], "failed_runs": failed,
        "image_layers_bytes": image["layers_bytes"], "image_layers_gzip_bytes": image["layers_gzip_bytes"],
        "image": image,
        "start_one": one, "burst_latency": burst_lat,
        "burst_wall_s": round(burst_s, 3), "burst_cpu_s": round(cpu_s, 2),
        "burst_cpu_share": round(cpu_s / (cpus * burst_s), 3) if burst_s > 0 else None,
        "burst_cpu_peak_share": peak_busy(os.path.join(d, "burst", "cpu")),
        "idle_running": side["idle_running"],
        "idle_processes_per_container": round((after["count"] - before["count"]) / n, 2),
        "idle_tasks_per_container": round(tasks_per, 2),
        "idle_pss_per_container_mib": round(pss_per_kib / MIB, 3),
        "containerd_pss_growth_per_container_mib": round(cd_growth / n / MIB, 3),
        "containerd_fds_per_container": round(fds_per, 2),
        "density_bounds": bounds, "density": known.get(binding) if binding else None,
        "density_binding": binding,
        "density_8gib_memory": int(8 * 1024 * 1024 / pss_per_kib) if pss_per_kib > 0 else None,
    }


# (key, row, unit, seeds' "before" (a container), seeds' "after" (Wasm), lower is better)
SEEDS_ROWS = [
    ("image", "image size (layers, gzipped)", "MB", 13.0, 0.9, True),
    ("start", "start time (one ctr run --rm, median)", "ms", 1200.0, 6.0, True),
    ("burst", "N simultaneous cold starts, wall", "s", None, None, True),
    ("memory", "memory baseline (PSS per idle container)", "MiB", 18.0, 2.1, True),
    ("density", "node density (idle containers)", "", 300.0, 3000.0, False),
    ("cpu", "cold-start CPU (CPU-s for the burst)", "CPU-s", None, None, True),
    ("cpu_share", "cold-start CPU spike (node busy, burst mean)", "%", 80.0, 3.0, True),
]


def seeds_value(side: dict, key: str) -> float | None:
    if key == "image":
        return side["image_layers_gzip_bytes"] / 1e6
    if key == "start":
        return side["start_one"]["median_ms"] if side["start_one"] and side["start_one"]["n"] else None
    if key == "burst":
        return side["burst_wall_s"]
    if key == "memory":
        return side["idle_pss_per_container_mib"]
    if key == "density":
        return side["density"]
    if key == "cpu":
        return side["burst_cpu_s"]
    if key == "cpu_share":
        return None if side["burst_cpu_share"] is None else 100 * side["burst_cpu_share"]
    raise KeyError(key)


def seeds_report(meta_path: str) -> None:
    meta = load_json(meta_path)
    sides = {s["label"]: seeds_side(s, meta) for s in meta["sides"]}
    kiln, runc = sides["kiln"], sides["runc"]
    rows = []
    for key, label, unit, before, after, lower in SEEDS_ROWS:
        k, r = seeds_value(kiln, key), seeds_value(runc, key)
        adv = None
        if k and r:
            adv = r / k if lower else k / r
        seeds_adv = (before / after if lower else after / before) if before and after else None
        rows.append({"key": key, "row": label, "unit": unit, "kiln": k, "runc": r,
                     "kiln_advantage": None if adv is None else round(adv, 2),
                     "seeds_container": before, "seeds_wasm": after,
                     "seeds_advantage": None if seeds_adv is None else round(seeds_adv, 2)})
    scan = log_scan(meta["containerd_log"])
    report = {
        "benchmark": "seeds",
        "host": end_of_run(meta["host"]),
        "method": "test-images' sleep program: wasm32-wasip1 under Kiln (kiln-test/sleep) against "
                  "the same source built static for the host under runc (an image holding only "
                  "/sleep); `ctr run --rm IMAGE ID PROG 0` one at a time (interleaved, median) "
                  "and N at once (xargs -P N: wall until all exited; node CPU from /proc/stat "
                  "over that wall time); idle = `ctr run -d IMAGE ID PROG`, PSS of the runtime's "
                  "processes plus containerd's growth; density = the smallest of MemAvailable, "
                  "pid_max and containerd's RLIMIT_NOFILE over the per-container cost",
        "concurrent": meta["concurrent"], "idle": meta["idle"], "rounds": meta["rounds"],
        "native_exe_bytes": meta["native_exe_bytes"], "wasm_module_bytes": meta["wasm_module_bytes"],
        "rows": rows, "sides": sides, "containerd_log": scan,
    }
    h = report["host"]

    def fmt(v: float | None, unit: str) -> str:
        if v is None:
            return "-"
        if unit == "" or v >= 1000:
            return f"{v:,.0f}"
        return f"{v:.2f}" if v < 10 else f"{v:.1f}"
    print()
    print(f'the seeds\' table, here: {h.get("cpus")} CPUs, {h.get("mem_total_mib")} MiB, '
          f'{(h.get("containerd") or "containerd ?").split()[-1]}, cgroup {h.get("cgroup")}; '
          f'N = {meta["concurrent"]} simultaneous cold starts, {meta["idle"]} idle containers')
    print(f'{"row":<46} {"runc":>9} {"Kiln":>9} {"Kiln ahead":>10}   {"seeds":>15} {"seeds ahead":>11}')
    for r in rows:
        seeds = (f'{fmt(r["seeds_container"], r["unit"])} -> {fmt(r["seeds_wasm"], r["unit"])}'
                 if r["seeds_container"] else "-")
        adv = f'{r["kiln_advantage"]:.2f}x' if r["kiln_advantage"] else "-"
        sadv = f'{r["seeds_advantage"]:.1f}x' if r["seeds_advantage"] else "-"
        label = r["row"].replace("N simultaneous", f'{meta["concurrent"]} simultaneous')
        unit = f' ({r["unit"]})' if r["unit"] else ""
        print(f'{label + unit:<46} {fmt(r["runc"], r["unit"]):>9} {fmt(r["kiln"], r["unit"]):>9} '
              f'{adv:>10}   {seeds:>15} {sadv:>11}')
    for s in (kiln, runc):
        print(f'{s["label"]}: density bounds {", ".join(f"{k} {v:,}" for k, v in s["density_bounds"].items() if v)}'
              f' -> {s["density_binding"]} binds; busiest 100 ms of the burst '
              f'{100 * (s["burst_cpu_peak_share"] or 0):.0f} %; {s["idle_processes_per_container"]} '
              f'processes and {s["idle_tasks_per_container"]} tasks per idle container; '
              f'{s["failed_runs"]} failed runs')
    finish_report(meta, report, scan)


def seeds_plot(json_path: str, png_path: str) -> int:
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        print("bench.py: gnuplot not found; no chart", file=sys.stderr)
        return 1
    report = load_json(json_path)
    rows = [r for r in report["rows"] if r["kiln_advantage"]]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "rows.dat")
        with open(data, "w") as f:
            for i, r in enumerate(rows):
                label = re.sub(r'[`"\\\\]', "'", r["row"].split(" (")[0])
                f.write(f'{i} "{label}" {r["kiln_advantage"]} {r["seeds_advantage"] or "NaN"}\n')
        script = f"""
set terminal pngcairo size 1000,600 font ",10"
set output '{png_path}'
set title "How far Wasm is ahead of a native container: Kiln against runc here, and the seeds' claims"
set ylabel "times ahead (log scale)"
set logscale y
set yrange [0.5:*]
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set xtics rotate by -20 noenhanced
set termoption noenhanced
set grid ytics
plot '{data}' using 3:xtic(2) title 'Kiln vs runc, measured here' lc rgb '#4477aa', \\
     '' using 4 title "the seeds' claim" lc rgb '#cc3311'
"""
        return run_gnuplot(gnuplot, script, "1000,600", png_path)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "host":
        print(json.dumps(host()))
    elif cmd == "procs" and len(args) == 2:
        print(json.dumps(runtime_procs(args[0], args[1])))
    elif cmd == "pss" and len(args) == 1:
        print(smaps_rollup(int(args[0]))["pss_kib"])
    elif cmd == "meminfo":
        print(json.dumps(meminfo()))
    elif cmd == "running" and len(args) == 2:
        print(running(args[0], args[1]))
    elif cmd == "log-scan" and len(args) in (1, 2):
        print(json.dumps(log_scan(args[0], int(args[1]) if len(args) == 2 else 0), indent=2))
    elif cmd == "throughput-report" and len(args) == 1:
        throughput_report(args[0])
    elif cmd == "http-report" and len(args) == 1:
        http_report(args[0])
    elif cmd == "density-report" and len(args) == 1:
        density_report(args[0])
    elif cmd == "scale-report" and len(args) == 1:
        scale_report(args[0])
    elif cmd == "cri-report" and len(args) == 1:
        cri_report(args[0])
    elif cmd == "coldstart-plot" and len(args) == 2:
        return coldstart_plot(args[0], args[1])
    elif cmd == "image-size" and len(args) == 1:
        print(json.dumps(image_size(args[0])))
    elif cmd == "cpu-sampler" and len(args) == 1:
        cpu_sampler(args[0])
    elif cmd == "seeds-report" and len(args) == 1:
        seeds_report(args[0])
    elif cmd == "seeds-plot" and len(args) == 2:
        return seeds_plot(args[0], args[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
