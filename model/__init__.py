"""The LXMERT cross-modality network, state-dict compatible with transformers."""
from .checkpoint import LoadingInfo
from .config import LxmertConfig
from .modeling import (
    LxmertForNLVR2,
    LxmertForNLVR2Output,
    LxmertForPreTraining,
    LxmertForPreTrainingOutput,
    LxmertForQuestionAnswering,
    LxmertForQuestionAnsweringOutput,
    LxmertModel,
    LxmertModelOutput,
)

__all__ = [
    "LoadingInfo",
    "LxmertConfig",
    "LxmertForNLVR2",
    "LxmertForNLVR2Output",
    "LxmertForPreTraining",
    "LxmertForPreTrainingOutput",
    "LxmertForQuestionAnswering",
    "LxmertForQuestionAnsweringOutput",
    "LxmertModel",
    "LxmertModelOutput",
]
