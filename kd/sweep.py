"""`python -m kd.sweep`: the command name users type; the tool lives in kd/tools/sweep.py."""

from kd.tools.sweep import main

if __name__ == "__main__":
    main()
