"""The results table printed at the end of a run or an evaluation."""
from __future__ import annotations


def results_table(results: dict) -> str:
  """Groups "evaluator/metric" keys into one row per evaluator."""
  rows: dict[str, dict[str, float]] = {}
  for key, value in results.items():
    evaluator, _, metric = key.partition("/")
    rows.setdefault(evaluator, {})[metric] = value
  lines = []
  width = max((len(name) for name in rows), default=10)
  for name, metrics in rows.items():
    cells = "  ".join(f"{metric}={value:.3f}" for metric, value in metrics.items())
    lines.append(f"{name:<{width}}  {cells}")
  return "\n".join(lines)
