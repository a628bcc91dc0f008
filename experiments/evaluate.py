"""`./launch.sh eval`: evaluate a checkpoint.

  ./launch.sh eval --workdir DIR [--split 'train[:2000]']
      re-runs the run's own evaluators on its latest checkpoint (--split: each
      on that split instead of its own, e.g. to compare train and test).
  ./launch.sh eval (--workdir DIR | --hf PATH) --benchmarks LIST [--tasks LIST]
      the zero-shot benchmark suite (multimodal/benchmarks): every dataset of
      LIST (comma-separated: TFDS names, folder:PATH, captions:PATH,
      shapes_world/shape|colour|retrieval) in one go, one printed table, and
      CLIP_benchmark-style JSON files plus results.csv and results.md in --out.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from experiments import flags_cli
from experiments.common import define_model_flags, fail, user_errors

WORKDIR, HF = define_model_flags()
BENCHMARKS = flags.DEFINE_list("benchmarks", None, "Datasets to evaluate on.")
TASKS = flags.DEFINE_list(
    "tasks", ["auto"], "zeroshot_classification, zeroshot_retrieval, linear_probe, or "
    "auto (each dataset's zero-shot task).")
OUT = flags.DEFINE_string("out", None, "Where result files go (default: WORKDIR/benchmarks, "
                          "or benchmark_results/<model>).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")
SPLIT = flags.DEFINE_string("split", None, "Evaluate on this split instead of each "
                            "dataset's test split, or of each of the run's evaluators' "
                            "own (TFDS slicing works: 'train[:10000]').")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR).")
CLASSNAMES = flags.DEFINE_string("classnames", None, "A file of class names (JSON list or "
                                 "one per line) replacing the dataset's own.")
TEMPLATES = flags.DEFINE_string("templates", None, "A prompt template set by name (e.g. "
                                "imagenet, simple) instead of each dataset's own.")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Cache of text classifiers (default: "
                                "$MULTIMODAL_CACHE or ~/.cache/multimodal).")


def on_split(evals, split: str):
  """The run's evaluators, each on `split` and named for it ("vqa_test" ->
  "vqa_test@train[:2000]"), so that its metrics do not pass for its own
  split's. Those that differed only in their split (vqa_test, vqa_test_novel)
  become one."""
  from ml_collections import config_dict
  out = config_dict.ConfigDict()
  for name, evaluator in evals.items():
    evaluator = config_dict.ConfigDict(evaluator.to_dict())
    if "split" in evaluator:
      evaluator.split = split
      name = f"{name}@{split}"
    if all(evaluator.to_dict() != kept.to_dict() for kept in out.values()):
      out[name] = evaluator
  return out


def run_own_evaluators(workdir: str) -> None:
  from multimodal import tasks
  from multimodal.config import config_lib
  from multimodal.train import report, trainer
  config = config_lib.load_workdir_config(workdir)
  if SPLIT.value:
    with config.unlocked():
      config.evals = on_split(config.evals, SPLIT.value)
  task = tasks.get(config.task)(config)
  summary = trainer.evaluate(task, config, workdir)
  print(f"Results at step {summary['step']}, saved to {workdir}/eval_results.json:")
  print(report.results_table(summary["metrics"]))


def run_benchmarks() -> None:
  import jax

  from multimodal.config import config_lib
  from multimodal.data import templates as templates_lib
  from multimodal.eval_suite import datasets, encoders, results, suite
  encoder = encoders.load(workdir=WORKDIR.value, hf=HF.value)
  shapes_world = None
  if WORKDIR.value:  # Its own world, for shapes_world/* benchmarks.
    shapes_world = config_lib.load_workdir_config(WORKDIR.value).input.get("shapes_world")
  class_names = (templates_lib.read_classnames_file(CLASSNAMES.value)
                 if CLASSNAMES.value else None)
  templates = templates_lib.get(TEMPLATES.value) if TEMPLATES.value else None
  cache_dir = CACHE_DIR.value or suite.default_cache_dir()
  out_dir = OUT.value or (os.path.join(WORKDIR.value, "benchmarks") if WORKDIR.value
                          else os.path.join("benchmark_results", results.slug(encoder.model)))
  records = []
  for name in BENCHMARKS.value:
    bench = datasets.resolve(name, data_dir=DATA_DIR.value, shapes_world=shapes_world,
                             class_names=class_names)
    tasks = suite.tasks_for(bench, TASKS.value)
    if not tasks:
      print(f"{name}: skipped; it is a {bench.kind} dataset, which supports "
            f"{', '.join(suite.TASKS_OF_KIND[bench.kind])}.")
    split = SPLIT.value or bench.test_split
    memo = {}  # This dataset's embedded splits, shared by its tasks.
    for task in tasks:
      metrics, timings = suite.RUNNERS[task](
          encoder, bench, split=split, batch_size=BATCH_SIZE.value,
          cache_dir=cache_dir, templates=templates, memo=memo)
      for timing in timings:
        print(timing.line(f"{name} {task}"))
      records.append(results.record(name, encoder.model, encoder.pretrained, task, metrics))
  if not records:
    fail("no benchmark ran: none of the datasets supports the requested --tasks.")
  print()
  print(results.markdown(records))
  if jax.process_index() == 0:
    paths = results.write(records, out_dir)
    print(f"Wrote {len(records)} JSON files, {paths['csv']} and {paths['markdown']}.")


def main(argv: list[str]) -> None:
  flags_cli.parse(argv, __doc__)
  if not BENCHMARKS.value:
    if HF.value or not WORKDIR.value:
      fail("give --benchmarks LIST (e.g. --benchmarks cifar10,folder:/data/pets), or "
            "--workdir DIR alone to re-run a run's own evaluators.")
  try:
    if BENCHMARKS.value:
      run_benchmarks()
    else:
      run_own_evaluators(WORKDIR.value)
  except user_errors() as e:
    fail(str(e))


if __name__ == "__main__":
  main(sys.argv)
