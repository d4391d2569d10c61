"""`analyze` and `optimize` through the CLI on every model in ../shared/models and onnx's light models.

    python benchmarks/model_table.py [--only SUBSTRING] [--timeout SECONDS]

Each command runs in its own subprocess (``python -m onnx_lincomp ...``); the table records its exit code,
wall seconds, peak RSS (``os.wait4``), the one-line error when it fails and, for optimize runs that wrote
a model, ``onnx.checker.check_model(full_check=True)``, parameters before/after and the relative output
change (held out, else on the calibration data). The models of ../shared/models are calibrated as
tests/real_models.py prepares their data; onnx's ``light_*.onnx`` with ``random:32``. When optimize is
refused by a verification gate (exit 4) it runs again with ``--max-output-change off --allow-larger``
(plus ``--min-samples`` when the data is too small for the default) and that run is the "loosened" row.
An exit 1 is rerun with ``--debug`` to keep its traceback. Prints a markdown table and writes
benchmarks/results/model_table.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED  # noqa: E402
from real_models import REAL_MODELS, calibration_file  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LOOSE = ["--max-output-change", "off", "--allow-larger"]


def run(cmd: list[str], timeout: float, cwd: Path) -> dict:
    """Run ``cmd``; wall seconds, peak RSS of the child (MiB), exit code, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code  # reaped by wait4: tell Popen so it does not wait again
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return {"exit": "timeout" if timed_out.is_set() else code, "seconds": seconds,
            "peak_mib": usage.ru_maxrss / 1024, "stderr": stderr}


def one_line_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors[-1] if errors else lines[-1] if lines else "")[:400]


def check(path: Path) -> tuple[bool, str]:
    """``onnx.checker.check_model(full_check=True)`` in a subprocess (a crash there must not end the table)."""
    code = "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True)"
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    return p.returncode == 0, one_line_error(p.stderr) if p.returncode else ""


def number(v):
    """Report floats may be written as "inf"/"nan" strings."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def execute(model: str, command: str, label: str, cmd: list[str], out_json: Path, out_onnx: Path | None,
            timeout: float, cwd: Path) -> dict:
    for p in (out_json, out_onnx):
        if p is not None and p.exists():
            p.unlink()
    print(f"[{model}] {label}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    r = run(cmd, timeout, cwd)
    argv = ["python", *cmd[1:]]
    row = {"model": model, "command": label, "argv": [a.replace(str(cwd), "$TMP") for a in argv],
           "exit": r["exit"], "seconds": round(r["seconds"], 2),
           "peak_mib": round(r["peak_mib"], 1), "error": None, "checker": None, "checker_error": None,
           "params_before": None, "params_after": None, "output_change_rel": None, "output_change_on": None,
           "traceback": None}
    stderr = r["stderr"]
    if r["exit"] != 0:
        row["error"] = one_line_error(stderr) if r["exit"] != "timeout" else f"killed after {timeout:.0f} s"
    crashed = r["exit"] == 1 or "Traceback (most recent call last)" in stderr
    if crashed:
        if "Traceback (most recent call last)" not in stderr:  # rerun with --debug to keep the traceback
            stderr = run([cmd[0], "-m", "onnx_lincomp", "--debug", *cmd[3:]], timeout, cwd)["stderr"]
        tb = stderr[stderr.find("Traceback (most recent call last)"):] if "Traceback" in stderr else stderr
        row["traceback"] = tb[-4000:]
    if r["exit"] == 0 and out_json.exists():
        report = json.loads(out_json.read_text())
        if command == "optimize":
            row["params_before"] = report.get("before", {}).get("params")
            row["params_after"] = report.get("after", {}).get("params")
            for key in ("verification_heldout", "verification_calibration"):
                if report.get(key):
                    row["output_change_rel"] = number(report[key].get("rel_max"))
                    row["output_change_on"] = key.split("_")[1]
                    break
            if any(m.startswith("no pass changed the graph") for m in report.get("messages", [])):
                row["note"] = "no pass changed the graph (spot check only)"
    if out_onnx is not None and r["exit"] == 0 and out_onnx.exists():
        row["checker"], row["checker_error"] = check(out_onnx)
    return row


def models(tmp: Path) -> list[tuple[str, Path, str, list[str]]]:
    """(name, model path, --calib value, --input-shape arguments) of every model."""
    found = []
    for spec in REAL_MODELS:
        shapes = [a for k, v in spec.input_shapes.items() for a in ("--input-shape", f"{k}={','.join(map(str, v))}")]
        found.append((spec.path, SHARED / "models" / spec.path, calibration_file(spec, tmp), shapes))
    for path in sorted(LIGHT.glob("light_*.onnx")):
        found.append((f"onnx/{path.name}", path, "random:32", []))
    return found


def fmt_change(row: dict) -> str:
    v = row["output_change_rel"]
    if v is None:
        return "-"
    text = f"{v:.2e}" if isinstance(v, float) else str(v)
    return text + (" (calib)" if row["output_change_on"] == "calibration" else "")


def table(rows: list[dict]) -> str:
    lines = ["| model | command | exit | seconds | peak MiB | params before → after | output change (rel) | checker "
             "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = "-" if r["params_before"] is None else f"{r['params_before']:,} → {r['params_after']:,}"
        checker = "-" if r["checker"] is None else str(r["checker"])
        note = r["error"] or r.get("note") or ""
        if r["checker_error"]:
            note = f"{note} checker: {r['checker_error']}".strip()
        if r["traceback"]:
            note = f"CRASH {note}"
        note = note.replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['command']} | {r['exit']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} "
                     f"| {params} | {fmt_change(r)} | {checker} | {note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="only models whose name contains this")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per command before it is killed")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: this benchmark needs ../shared/models")
    rows: list[dict] = []
    py = sys.executable
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, path, calib, shapes in models(tmp):
            if args.only and args.only not in name:
                continue
            stem = path.stem
            base = [str(path), "--calib", calib, *shapes]
            aj = tmp / f"{stem}.analyze.json"
            rows.append(execute(name, "analyze", "analyze",
                                [py, "-m", "onnx_lincomp", "analyze", *base, "--json", str(aj)],
                                aj, None, args.timeout, tmp))
            oj, oo = tmp / f"{stem}.optimize.json", tmp / f"{stem}.small.onnx"
            opt = [py, "-m", "onnx_lincomp", "optimize", *base, "-o", str(oo), "--no-latency", "--json", str(oj)]
            row = execute(name, "optimize", "optimize", opt, oj, oo, args.timeout, tmp)
            rows.append(row)
            if row["exit"] == 4:
                loose = list(LOOSE)
                if "min-samples" in (row["error"] or ""):
                    loose += ["--min-samples", "1"]
                loosened = execute(name, "optimize", "loosened", [*opt, *loose], oj, oo, args.timeout, tmp)
                loosened["note"] = " ".join([*loose, loosened.get("note", "")]).strip()
                rows.append(loosened)
    print(table(rows))
    crashes = [r for r in rows if r["traceback"]]
    if crashes:
        print("\ncrashes (exit 1 or a traceback):")
        for r in crashes:
            print(f"- {r['model']} {r['command']}: exit {r['exit']}: {' '.join(r['argv'])}")
            print("  " + r["traceback"].strip().splitlines()[-1])
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "model_table.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
