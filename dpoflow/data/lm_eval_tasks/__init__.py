"""lm-eval helper modules, copied next to the task YAMLs that dpoflow.data.benchmark_tasks.write_local_tasks writes."""
