"""`python -m pretraining.evaluate COMMAND`: downstream evaluation of an exported encoder.

The command's home; the protocols live in `pretraining/evaluation/` (`cli.py` parses and runs).
"""

from pretraining.evaluation.cli import main

if __name__ == "__main__":
    main()
