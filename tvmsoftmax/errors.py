"""User-facing errors: one clear line that names the node, input or file and what was expected."""


class TvmSoftmaxError(Exception):
    """Base class of every error tvmsoftmax reports to a user (the CLI prints it as one line)."""


class ModelError(TvmSoftmaxError):
    """The ONNX model cannot be read, is invalid, or uses something we cannot compile."""


class UnsupportedOperatorError(ModelError):
    """A node's operator has no lowering (neither ours nor TVM's importer)."""


class InputError(TvmSoftmaxError):
    """Feeds given to a compiled model do not match its inputs (names, dtypes, ranks, dims)."""


class ArtifactError(TvmSoftmaxError):
    """A saved artifact is missing, corrupted, of another format version or of another target."""


class ReferenceRunError(TvmSoftmaxError):
    """onnxruntime, the reference `check` compares with, cannot load or run the model."""
