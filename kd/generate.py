"""`python -m kd.generate`: the command name users type; the tool lives in kd/tools/generate.py."""

from kd.tools.generate import main

if __name__ == "__main__":
    main()
