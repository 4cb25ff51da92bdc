"""python -m kd.config: the reference table of docs/config.md."""

from kd.config.reference import table

if __name__ == "__main__":
    print(table())
