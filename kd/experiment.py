"""`python -m kd.experiment`: the command name users type; the demo tool lives in kd/demo/experiment.py."""

from kd.demo.experiment import main

if __name__ == "__main__":
    main()
