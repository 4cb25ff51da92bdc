"""Everything that exists for the demo and the evidence, apart from the library.

builtin.py     `builtin:` tiny models and the shipped tokenizer/teacher (a kd.model_sources plugin)
tasks.py       the seeded strategy task: problems, instructions, traces, answer checking
tokenizer.py   builds the shipped byte-level BPE tokenizer (assets/tokenizer)
accuracy.py    the task's exact-match and right-strategy metrics (python -m kd.accuracy)
experiment.py  the CE vs KD vs no-erasure experiment behind docs/results*.md (python -m kd.experiment)
assets/        the shipped tokenizer and trained demo teacher

The library never imports this package; `builtin:` names reach it through an entry point.
"""
