"""`python -m kd.report`: the command name users type; the tool lives in kd/tools/report.py."""

from kd.tools.report import main

if __name__ == "__main__":
    main()
