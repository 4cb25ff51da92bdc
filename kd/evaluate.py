"""`python -m kd.evaluate`: the command name users type; the tool lives in kd/tools/evaluate.py."""

from kd.tools.evaluate import main

if __name__ == "__main__":
    main()
