"""Command-line tools around the trainer; each parses its arguments and calls the library.

plan.py      per-device memory plan from model configs (python -m kd.plan)
sweep.py     offline temperature/alpha sweeps from W&B sweep YAMLs with Optuna (python -m kd.sweep)
report.py    plots of training curves and sweep results (python -m kd.report)
generate.py  a distillation set from a teacher's responses (python -m kd.generate)
"""
