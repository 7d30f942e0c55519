"""`python -m extractor.train`, the documented command: the detector's training CLI (extractor.detector.train)."""
import sys

from extractor.detector.train import main

if __name__ == "__main__":
    sys.exit(main())
