"""The product's front door: `luigi --module pipeline.tasks <Task>` (settings: luigi.cfg over its profile)."""
from pipeline.data import BuildGQAData, BuildNLVR2Data, BuildPretrainCorpus, BuildTaskData, BuildVQAData
from pipeline.detector import TrainDetector
from pipeline.features import ExtractFeatures, ExtractFeaturesShard, ImportTSVFeatures, ValidateFeatures
from pipeline.grounding import MeasurePointing
from pipeline.report import Report, RunAll
from pipeline.sources import GenerateDemoWorld
from pipeline.training import (
    EvaluateGQA,
    EvaluateNLVR2,
    EvaluateVQA,
    FinetuneGQA,
    FinetuneNLVR2,
    FinetuneVQA,
    PretrainLXMERT,
)

__all__ = ["BuildGQAData", "BuildNLVR2Data", "BuildPretrainCorpus", "BuildTaskData", "BuildVQAData",
           "EvaluateGQA", "EvaluateNLVR2", "EvaluateVQA", "ExtractFeatures", "ExtractFeaturesShard",
           "FinetuneGQA", "FinetuneNLVR2", "FinetuneVQA", "GenerateDemoWorld", "ImportTSVFeatures",
           "MeasurePointing", "PretrainLXMERT", "Report", "RunAll", "TrainDetector", "ValidateFeatures"]
