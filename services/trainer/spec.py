"""What a training run is asked to do: datasets and their mix, base model, method, hyper-parameters.

``RunSpec`` is plain data (JSON round trip for the run record); ``build_spec`` fills the defaults
(zero means the default, as in the API) and validates, raising InvalidArgument that names the field.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum

from dreamframe.errors import InvalidArgument
from dreamframe.keys import validate_id
from dreamframe.storage.base import validate_bucket, validate_key


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"


# Reference learning rate for full fine-tuning (the paper, LLaVA-1.5); LoRA needs about 10x more.
DEFAULT_LR = {Method.FULL: 2e-5, Method.LORA: 2e-4}


@dataclass(frozen=True)
class DatasetSource:
    """One conversation JSON (or a qa-generator manifest) in storage and its share of the mix."""

    key: str
    bucket: str = ""
    size: int = 0
    sha256: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = 1
    # Optimizer steps to run (0: ``epochs`` full epochs); when set it wins over epochs.
    max_steps: int = 0
    # 0: DEFAULT_LR for the method.
    learning_rate: float = 0.0
    warmup_ratio: float = 0.03
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    # Tokens per sample, visual tokens included (0: 2048 text tokens + the frames' visual tokens, capped by
    # the model's context; the reference's 2048 was for ~2 visual tokens a frame).
    max_length: int = 0
    num_frames: int = 4
    lora_rank: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    seed: int = 0
    # 0: about ten checkpoints over the run.
    save_every_steps: int = 0
    num_processes: int = 1
    gradient_checkpointing: bool = False
    max_bad_sample_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


# Fields whose zero means "use the default" (the API's proto3 scalars cannot say "unset" otherwise).
_ZERO_IS_DEFAULT = {
    "epochs",
    "warmup_ratio",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "num_frames",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "num_processes",
    "max_bad_sample_fraction",
    "max_grad_norm",
}

# (lowest, highest) allowed after defaults; None: unbounded on that side.
_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "epochs": (1, 1000),
    "max_steps": (0, 10**9),
    "learning_rate": (1e-12, 1.0),
    "warmup_ratio": (0.0, 0.99),
    "per_device_batch_size": (1, 4096),
    "gradient_accumulation_steps": (1, 4096),
    "max_length": (0, 1 << 20),
    "num_frames": (1, 256),
    "lora_rank": (1, 8192),
    "lora_alpha": (1, 1 << 20),
    "lora_dropout": (0.0, 0.9),
    "seed": (0, 2**63 - 1),
    "save_every_steps": (0, 10**9),
    "num_processes": (1, 64),
    "max_bad_sample_fraction": (0.0, 1.0),
    "weight_decay": (0.0, 10.0),
    "max_grad_norm": (1e-6, 1e6),
}


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    datasets: tuple[DatasetSource, ...]
    base_model: str
    method: Method
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    job_id: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["method"] = str(self.method)
        data["datasets"] = [asdict(d) for d in self.datasets]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        known = {f.name for f in fields(Hyperparameters)}
        return cls(
            run_id=data["run_id"],
            job_id=data.get("job_id", ""),
            datasets=tuple(DatasetSource(**d) for d in data["datasets"]),
            base_model=data["base_model"],
            method=Method(data["method"]),
            hyperparameters=Hyperparameters(
                **{k: v for k, v in data["hyperparameters"].items() if k in known}
            ),
        )

    @property
    def learning_rate(self) -> float:
        return self.hyperparameters.learning_rate or DEFAULT_LR[self.method]


def new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def fill_hyperparameters(given: dict) -> Hyperparameters:
    """Hyper-parameters from a mapping of the API's values: unknown names rejected, zeros → defaults,
    then every value checked against its range (InvalidArgument naming ``hyperparameters.<name>``)."""
    defaults = Hyperparameters()
    known = {f.name: f for f in fields(Hyperparameters)}
    values = {}
    for name, value in given.items():
        if name not in known:
            raise InvalidArgument("unknown hyper-parameter", field=f"hyperparameters.{name}")
        if name in _ZERO_IS_DEFAULT and not value:
            continue
        values[name] = value
    hp = replace(defaults, **values)
    for name, (low, high) in _BOUNDS.items():
        value = getattr(hp, name)
        where = f"hyperparameters.{name}"
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"must be a finite number, got {value}", field=where)
        if low is not None and value < low and not (name == "learning_rate" and value == 0):
            raise InvalidArgument(f"must be >= {low}, got {value}", field=where)
        if high is not None and value > high:
            raise InvalidArgument(f"must be <= {high}, got {value}", field=where)
    return hp


def validate_base_model(name: str) -> str:
    if not name or not name.strip():
        raise InvalidArgument(
            "required: a preset ('tiny', 'llava-1.5-7b'), a local path or a hub id", field="base_model"
        )
    if any(ch.isspace() or ord(ch) < 32 for ch in name):
        raise InvalidArgument(f"{name!r} contains whitespace or control characters", field="base_model")
    return name


def build_spec(
    *,
    run_id: str,
    datasets: list[DatasetSource],
    base_model: str,
    method: Method | str | None,
    hyperparameters: dict | Hyperparameters | None = None,
    job_id: str = "",
) -> RunSpec:
    """A validated RunSpec (defaults filled). ``method`` None means LoRA, the cheaper of the two."""
    validate_id(run_id, field="run_id")
    if job_id:
        validate_id(job_id, field="job_id")
    if not datasets:
        raise InvalidArgument("at least one dataset is required", field="datasets")
    checked = []
    for i, source in enumerate(datasets):
        where = f"datasets[{i}]"
        validate_key(source.key, field=f"{where}.dataset.key")
        if source.bucket:
            validate_bucket(source.bucket, field=f"{where}.dataset.bucket")
        weight = source.weight or 1.0
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgument(f"must be a positive number, got {source.weight}", field=f"{where}.weight")
        checked.append(replace(source, weight=float(weight)))
    try:
        resolved_method = Method(method) if method else Method.LORA
    except ValueError:
        raise InvalidArgument(f"unknown method {method!r}; use 'full' or 'lora'", field="method") from None
    if isinstance(hyperparameters, Hyperparameters):
        hyperparameters = asdict(hyperparameters)
    hp = fill_hyperparameters(hyperparameters or {})
    return RunSpec(
        run_id=run_id,
        job_id=job_id,
        datasets=tuple(checked),
        base_model=validate_base_model(base_model),
        method=resolved_method,
        hyperparameters=hp,
    )
