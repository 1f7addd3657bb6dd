"""``PeftConfig``: the base of every method's config, and its ``adapter_config.json`` round trip.

Field names, defaults and validation follow ``peft`` (``peft/config.py``). Keys
written by a newer ``peft`` that this version does not know are kept in
``unknown_fields``, reported with an ``UnknownConfigFieldsWarning``, and written
back on save; they are never dropped silently.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from peftcore._files import atomic_write_text
from peftcore.constants import CONFIG_NAME
from peftcore.errors import AdapterFileError, AdapterNotFoundError, ConfigError, UnknownPeftTypeError

__all__ = [
    "CONFIG_NAME",
    "PEFT_FORMAT_VERSION",
    "PeftConfig",
    "PeftType",
    "TaskType",
    "UnknownConfigFieldsWarning",
]

# The ``peft`` release whose file format peftcore reads and writes; written as
# ``peft_version`` so that ``peft``'s version-gated checks see a current file.
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """``peft``'s ``PeftType`` values (``utils/peft_types.py``, 0.21.2)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """``peft``'s ``TaskType`` values."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


class UnknownConfigFieldsWarning(UserWarning):
    """A config file holds keys this version of peftcore does not know (kept and written back)."""


def _json_ready(value: Any) -> Any:
    """Plain JSON values: sets become sorted lists (``peft`` writes set order, which varies by process)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_json_ready(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class PeftConfig:
    """Fields every ``peft`` config has (``PeftConfigMixin`` + ``PeftConfig``).

    ``unknown_fields`` holds keys read from a file that this class does not define.
    """

    task_type: str | TaskType | None = None
    peft_type: str | PeftType | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    unknown_fields: dict[str, Any] = dataclasses.field(
        default_factory=dict, repr=False, compare=False, metadata={"serialize": False}
    )

    #: ``peft_type`` this class configures; set by each method's subclass.
    PEFT_TYPE: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(getattr(self.task_type, "value", self.task_type))
            except ValueError:
                raise ConfigError(
                    f"Invalid task type: {self.task_type!r}. Must be one of: {', '.join(t.value for t in TaskType)}."
                ) from None
        if self.PEFT_TYPE is not None:
            given = getattr(self.peft_type, "value", self.peft_type)
            if given is not None and str(given).upper() != self.PEFT_TYPE:
                raise ConfigError(f"{type(self).__name__} configures peft_type {self.PEFT_TYPE!r}, got {given!r}")
            self.peft_type = PeftType(self.PEFT_TYPE)
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        if not isinstance(self.unknown_fields, dict):
            raise ConfigError("unknown_fields must be a dict")

    # -- dict / JSON -------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of the fields written to ``adapter_config.json``."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("serialize", True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field plus ``unknown_fields`` (``peft``'s ``to_dict`` + set->list)."""
        out = {name: _json_ready(getattr(self, name)) for name in self.field_names()}
        for key, value in self.unknown_fields.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], *, source: str | None = None) -> PeftConfig:
        """Build a config from a dict such as a parsed ``adapter_config.json``.

        Called on ``PeftConfig`` itself it dispatches on ``peft_type`` through the
        registry. Unknown keys are kept in ``unknown_fields`` and reported with an
        ``UnknownConfigFieldsWarning``; a ``runtime_config`` key is ignored, as ``peft`` does.
        """
        where = f" in {source}" if source else ""
        if not isinstance(config_dict, Mapping):
            raise ConfigError(f"config{where} must be a JSON object, got {type(config_dict).__name__}")
        data = dict(config_dict)
        if cls.PEFT_TYPE is None:
            from peftcore.mapping import get_config_class

            if "peft_type" not in data:
                raise ConfigError(f"config{where} has no 'peft_type'; cannot tell which method it configures")
            try:
                target = get_config_class(data["peft_type"])
            except UnknownPeftTypeError as exc:
                raise UnknownPeftTypeError(f"{exc}{where}") from None
            return target.from_dict(data, source=source)
        data.pop("runtime_config", None)
        known = set(cls.field_names())
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            warnings.warn(
                f"{cls.__name__}: unknown config keys{where} {sorted(unknown)} (probably written by a newer peft); "
                "they are kept and written back on save but have no effect here",
                UnknownConfigFieldsWarning,
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            config = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None
        except TypeError as exc:
            raise ConfigError(f"invalid config{where}: {exc}") from None
        config.unknown_fields = unknown
        return config

    def to_json_string(self, *, inference_mode: bool | None = None) -> str:
        """``adapter_config.json`` text: sorted keys, indent 2, as ``peft`` writes it."""
        data = self.to_dict()
        if inference_mode is not None:
            data["inference_mode"] = inference_mode
        return json.dumps(data, indent=2, sort_keys=True)

    # -- files -------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, inference_mode: bool | None = None) -> Path:
        """Write ``<dir>/adapter_config.json`` atomically, byte for byte as ``peft``'s ``save_pretrained``.

        ``inference_mode=True`` is what ``PeftModel.save_pretrained`` writes for a saved
        adapter; ``None`` keeps the config's own value, as ``PeftConfig.save_pretrained`` does.
        """
        directory = Path(save_directory)
        if directory.is_file():
            raise AdapterFileError(f"{directory} is a file; save_pretrained needs a directory")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        atomic_write_text(path, self.to_json_string(inference_mode=inference_mode))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, subfolder: str | None = None) -> PeftConfig:
        """Read ``<dir>[/<subfolder>]/adapter_config.json`` (local only; peftcore never downloads)."""
        path = Path(directory)
        if subfolder:
            path = path / subfolder
        config_file = path if path.is_file() else path / CONFIG_NAME
        if not config_file.is_file():
            raise AdapterNotFoundError(f"no {CONFIG_NAME} at {path}")
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AdapterFileError(f"{config_file}: malformed JSON ({exc})") from None
        except UnicodeDecodeError as exc:
            raise AdapterFileError(f"{config_file}: not UTF-8 text ({exc})") from None
        if not isinstance(data, dict):
            raise AdapterFileError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
        if cls.PEFT_TYPE is not None and "peft_type" in data:
            if str(data["peft_type"]).upper() != cls.PEFT_TYPE:
                raise ConfigError(
                    f"{config_file}: peft_type is {data['peft_type']!r}, but {cls.__name__} reads {cls.PEFT_TYPE!r}"
                )
        return cls.from_dict(data, source=str(config_file))

    @property
    def is_prompt_learning(self) -> bool:
        return False
