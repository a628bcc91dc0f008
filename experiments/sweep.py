"""`./launch.sh sweep CONFIG[:ARGS] [--config.KEY=VALUE ...] [flags]`: runs every
point of the config's `get_sweep(arg)` sweep, then collects the results.

Each point trains as `python -m experiments.train CONFIG --workdir
SWEEP_DIR/NAME --config.KEY=VALUE ...` (the given --config.* overrides apply
to every point), its output in NAME/train.log. Points whose results.json
exists are skipped, so a rerun finishes an interrupted sweep; a failing point
is reported and the others still run (exit status 1 at the end).

  --parallel K   up to K points at once, each on its own devices: GPUs split by
                 CUDA_VISIBLE_DEVICES, TPU chips by TPU_VISIBLE_CHIPS; on CPU
                 the K processes simply share the cores.
  --slurm        an sbatch array job, one task per unfinished point (at most K
                 at once with --parallel K); --dry_run prints the script instead
                 of submitting it; --sbatch partition=gpu --sbatch time=4:00:00
                 adds #SBATCH lines.
  --collect      only (re)write sweep.csv, sweep.md and plots/*.png.
  --point N      run point N only (what each SLURM task does), then collect.
  --metric M     rank by M (default the first .../acc1, else the first metric);
  --mode         max | min | auto (min for loss/error-like names).
  --sweep_args   the argument string of get_sweep(arg), e.g. lrs=1e-3/3e-3.
  --sweep_dir    default runs/CONFIG-sweep.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import flags

from experiments import cli
from experiments.common import fail

SWEEP_DIR = flags.DEFINE_string("sweep_dir", None,
                                "Where the points' workdirs go; default runs/CONFIG-sweep.")
SWEEP_ARGS = flags.DEFINE_string("sweep_args", None,
                                 "The argument string of get_sweep(arg), e.g. lrs=1e-3/3e-3.")
PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run at once (on disjoint devices).")
SLURM = flags.DEFINE_boolean("slurm", False, "Submit the points as a SLURM array job.")
DRY_RUN = flags.DEFINE_boolean("dry_run", False, "With --slurm: print the script only.")
SBATCH = flags.DEFINE_multi_string("sbatch", [],
                                   "With --slurm: an #SBATCH option, e.g. partition=gpu.")
POINT = flags.DEFINE_integer("point", None, "Run only this point (0-based), then collect.")
COLLECT = flags.DEFINE_boolean("collect", False, "Only collect the finished points' results.")
METRIC = flags.DEFINE_string("metric", None,
                             "Metric to rank by; default the first .../acc1, else the first.")
MODE = flags.DEFINE_enum("mode", "auto", ["auto", "max", "min"],
                         "Is higher or lower better? auto: min for loss/error-like names.")


def main(argv: list[str]) -> None:
  argv = cli.parse_flags(argv, __doc__)
  from multimodal.config import config_lib
  from multimodal.sweep import devices as sweep_devices, points as sweep
  if cli.WORKDIR.value:
    fail("a sweep has one workdir per point; give --sweep_dir instead of --workdir.")
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  base = _config_overrides(argv[1:])
  sweep_dir = os.path.abspath(SWEEP_DIR.value or os.path.join(
      "runs", f"{cli.config_name()}-sweep"))
  try:
    raw = sweep.load_sweep(spec, SWEEP_ARGS.value)
  except (sweep.SweepError, config_lib.ConfigError) as e:
    fail(str(e))
  except Exception as e:  # noqa: BLE001 -- any failure of get_sweep.
    fail(f"get_sweep({SWEEP_ARGS.value or ''}) of {spec.partition(':')[0]} failed: "
         f"{type(e).__name__}: {e}")
  try:
    overrides = sweep.expand(raw)
    sweep.check_keys(overrides, cli.CONFIG.value, base)
    sweep.check_points(spec, overrides, base)
  except sweep.SweepError as e:
    fail(str(e))
  points = sweep.make_points(overrides, sweep_dir)

  if COLLECT.value:
    _collect(points, sweep_dir)
    return
  if POINT.value is not None:
    if not 0 <= POINT.value < len(points):
      fail(f"--point {POINT.value}: the sweep has points 0 to {len(points) - 1}.")
    ok = _run_points([points[POINT.value]], spec, base, [{}], len(points))
    _collect(points, sweep_dir)
    sys.exit(0 if ok else 1)
  if SLURM.value:
    sys.exit(_submit_slurm(points, spec, base, sweep_dir))
  if DRY_RUN.value:
    fail("--dry-run goes with --slurm.")

  try:
    platform, devices = sweep_devices.detect_accelerators()
    envs = sweep_devices.device_envs(platform, devices, PARALLEL.value)
  except sweep.SweepError as e:
    fail(str(e))
  os.makedirs(sweep_dir, exist_ok=True)
  sweep.write_sweep_json(os.path.join(sweep_dir, "sweep.json"), spec,
                         SWEEP_ARGS.value, base, points)
  print(f"Sweep of {len(points)} points in {sweep_dir}"
        + (f", {PARALLEL.value} at once ({platform})" if PARALLEL.value > 1 else "") + ".")
  ok = _run_points(points, spec, base, envs, len(points))
  _collect(points, sweep_dir)
  sys.exit(0 if ok else 1)


def _config_overrides(args: list[str]) -> list[str]:
  """The --config.KEY=VALUE overrides (`--config.KEY VALUE` joined), which
  every point's training gets too."""
  out = []
  for i, arg in enumerate(args):
    if arg.startswith(("--config.", "--noconfig.")):
      if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
        arg = f"{arg}={args[i + 1]}"
      out.append(arg)
  return out


def _train_command(spec: str, base: list[str], point) -> list[str]:
  return [sys.executable, "-m", "experiments.train", spec,
          f"--workdir={point.workdir}", *base, *point.args()]


def _run_points(points, spec, base, envs, total) -> bool:
  """Runs the unfinished points, len(envs) at a time; True if none failed."""
  from multimodal.sweep import points as sweep
  todo = []
  for point in points:
    if sweep.status(point) == "done":
      print(f"[{point.index + 1}/{total}] {point.name}: finished already, skipped.")
    else:
      todo.append(point)
  free = list(range(len(envs)))
  running = {}  # slot -> (point, process, log file, start time)
  failed = []
  try:
    while todo or running:
      while todo and free:
        point, slot = todo.pop(0), free.pop(0)
        os.makedirs(point.workdir, exist_ok=True)
        marker = os.path.join(point.workdir, sweep.FAILED_MARKER)
        if os.path.exists(marker):
          os.remove(marker)
        command = _train_command(spec, base, point)
        log_path = os.path.join(point.workdir, sweep.LOG_NAME)
        log = open(log_path, "a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"{' '.join(command)}\n")
        log.flush()
        env = {**os.environ, **envs[slot]}
        where = "".join(f" {k}={v}" for k, v in envs[slot].items()
                        if k in ("CUDA_VISIBLE_DEVICES", "TPU_VISIBLE_CHIPS"))
        print(f"[{point.index + 1}/{total}] {point.name}: training{where}, "
              f"log in {log_path}", flush=True)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env)
        running[slot] = (point, process, log, time.time())
      for slot, (point, process, log, start) in list(running.items()):
        code = process.poll()
        if code is None:
          continue
        log.close()
        del running[slot]
        free.append(slot)
        seconds = time.time() - start
        if code == 0 and sweep.status(point) == "done":
          print(f"[{point.index + 1}/{total}] {point.name}: done in {seconds:.0f} s.",
                flush=True)
          continue
        failed.append(point)
        with open(os.path.join(point.workdir, sweep.FAILED_MARKER), "w") as f:
          f.write(f"exit status {code}\n")
        print(f"[{point.index + 1}/{total}] {point.name}: FAILED (exit status "
              f"{code}) after {seconds:.0f} s; the end of its log:\n"
              + _tail(log.name), flush=True)
      if running:
        time.sleep(0.5)
  except KeyboardInterrupt:
    for point, process, log, _ in running.values():
      process.terminate()
    for point, process, log, _ in running.values():
      process.wait()
      log.close()
    print("\nInterrupted; rerun the same command to finish the sweep.", file=sys.stderr)
    sys.exit(130)
  if failed:
    print(f"{len(failed)} of {total} points failed: "
          f"{', '.join(p.name for p in failed)}.", file=sys.stderr)
  return not failed


def _tail(path: str, lines: int = 15) -> str:
  with open(path, errors="replace") as f:
    text = f.read().splitlines()[-lines:]
  return "\n".join("    " + line[-300:] for line in text)


def _collect(points, sweep_dir) -> None:
  """Writes sweep.csv, sweep.md and the plots; prints the table."""
  from multimodal.sweep import points as sweep, report as sweep_report
  try:
    result = sweep_report.collect(points, sweep_dir, METRIC.value, MODE.value)
  except sweep.SweepError as e:
    fail(str(e))
  print()
  print(result["markdown"])
  print(f"Wrote {result['csv']}, {result['md']} and {len(result['plots'])} plots in "
        f"{os.path.join(sweep_dir, 'plots')}.")


def _submit_slurm(points, spec, base, sweep_dir) -> int:
  from multimodal.sweep import devices as sweep_devices, points as sweep
  todo = [p.index for p in points if sweep.status(p) != "done"]
  if not todo:
    print("Every point has finished already; nothing to submit.", file=sys.stderr)
    _collect(points, sweep_dir)
    return 0
  command = [sys.executable, "-m", "experiments.sweep", spec,
             f"--sweep_dir={sweep_dir}"]
  if SWEEP_ARGS.value:
    command.append(f"--sweep_args={SWEEP_ARGS.value}")
  if METRIC.value:
    command.append(f"--metric={METRIC.value}")
  if MODE.value != "auto":
    command.append(f"--mode={MODE.value}")
  command += base
  script = sweep_devices.slurm_script(
      job_name=f"{os.path.basename(sweep_dir)}", indices=todo, sweep_dir=sweep_dir,
      cwd=os.getcwd(), command=command, sbatch=SBATCH.value, parallel=PARALLEL.value)
  if DRY_RUN.value:
    sys.stdout.write(script)
    return 0
  os.makedirs(sweep_dir, exist_ok=True)
  sweep.write_sweep_json(os.path.join(sweep_dir, "sweep.json"), spec,
                         SWEEP_ARGS.value, base, points)
  path = os.path.join(sweep_dir, "sweep.sbatch")
  with open(path, "w") as f:
    f.write(script)
  try:
    submitted = subprocess.run(["sbatch", path], capture_output=True, text=True)
  except FileNotFoundError:
    fail(f"sbatch is not on PATH; the script is in {path} (or use --dry-run).")
  if submitted.returncode:
    fail(f"sbatch {path} failed: {submitted.stderr.strip() or submitted.stdout.strip()}")
  print(submitted.stdout.strip())
  print(f"Submitted {len(todo)} points ({path}); each task collects when it ends, or "
        f"run the same command with --collect.")
  return 0


if __name__ == "__main__":
  main(sys.argv)
