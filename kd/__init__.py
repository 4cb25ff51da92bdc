"""kd: logit-level knowledge distillation of Hugging Face causal LMs (layout: docs/layout.md).

Importing the package loads nothing; each module is imported where it is used."""
