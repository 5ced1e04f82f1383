"""Typed errors raised by the runtime. Library code raises these with actionable messages and never prints;
the CLI maps them to one line on stderr and an exit code."""


class ModelError(Exception):
    """Base class for every error the runtime raises on purpose."""


class ConfigError(ModelError):
    """config.json is missing, malformed, or asks for something the runtime does not support."""


class WeightsError(ModelError):
    """The safetensors files are missing, unreadable, or do not match the model built from the config."""


class TokenizerError(ModelError):
    """The tokenizer files are missing or lack the special tokens DeepSeek-VL2 needs."""


class ModelNotFoundError(ModelError):
    """A model argument names neither a local directory nor a reachable / cached Hugging Face repo."""


class DeviceError(ModelError):
    """The device or dtype asked for is not available here (no CUDA, float16 on a CPU)."""


class InputError(ModelError):
    """A conversation or image the processor cannot turn into model inputs."""
