"""`python -m kd.plan`: the command name users type; the tool lives in kd/tools/plan.py."""

from kd.tools.plan import main

if __name__ == "__main__":
    main()
