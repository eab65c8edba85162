"""lm-eval helper modules, copied next to the task YAMLs that dpoflow.benchmarks.write_local_tasks writes."""
