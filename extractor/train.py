"""`python -m extractor.train`: the older name of `python -m extractor.detector.train`, kept working."""
from extractor.detector.train import main

if __name__ == "__main__":
    raise SystemExit(main())
