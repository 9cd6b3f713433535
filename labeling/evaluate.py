"""`python -m labeling.evaluate`: score a labeled folder against ground truth.

The command's home; the scoring itself is `labeling/quality/report.py`.
"""

import sys

from labeling.quality.report import main

if __name__ == "__main__":
    sys.exit(main())
