"""`python -m kd.accuracy`: the command name users type; the demo tool lives in kd/demo/accuracy.py."""

from kd.demo.accuracy import main

if __name__ == "__main__":
    main()
