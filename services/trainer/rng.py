"""The run's random state: seeding before the model is built, and every generator's state captured
into a checkpoint and restored from it.

In a checkpoint the states are data, never pickles: ``rng.json`` holds each rank's Python and NumPy
generator states as numbers, ``rng.safetensors`` each rank's torch (and CUDA) generator state as uint8
tensors (``torch.<rank>``, ``cuda.<rank>``). Reading checks every field before any generator is set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

RNG_JSON = "rng.json"
RNG_TENSORS = "rng.safetensors"
RNG_FORMAT = 1


class RngStateError(ValueError):
    """A checkpoint's RNG files are not what ``save_rng_states`` writes."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng_states(states: list[dict], folder: Path) -> None:
    """Every rank's ``rng_state()`` into ``folder``'s rng.json and rng.safetensors."""
    from safetensors.torch import save_file

    ranks, tensors = [], {}
    for rank, state in enumerate(states):
        version, internal, gauss_next = state["python"]
        kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
        ranks.append(
            {
                "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
                "numpy": {
                    "kind": kind,
                    "keys": [int(k) for k in keys],
                    "pos": int(pos),
                    "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached_gaussian),
                },
            }
        )
        tensors[f"torch.{rank}"] = state["torch"].contiguous()
        if "cuda" in state:
            tensors[f"cuda.{rank}"] = state["cuda"].cpu().contiguous()
    (folder / RNG_JSON).write_text(json.dumps({"format": RNG_FORMAT, "ranks": ranks}))
    save_file(tensors, str(folder / RNG_TENSORS))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RngStateError(f"{RNG_JSON}: {what}")


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value < high


def load_rng_state(folder: Path, rank: int) -> dict:
    """Rank ``rank``'s state as ``set_rng_state`` takes it, every field checked (RngStateError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = json.loads((folder / RNG_JSON).read_bytes())
    except (OSError, ValueError):
        raise RngStateError(f"{RNG_JSON} is missing or not JSON") from None
    _check(isinstance(data, dict) and data.get("format") == RNG_FORMAT, f"format is not {RNG_FORMAT}")
    ranks = data.get("ranks")
    _check(isinstance(ranks, list) and 0 <= rank < len(ranks), f"has no state for rank {rank}")
    entry = ranks[rank]
    _check(isinstance(entry, dict), "a rank's entry is not an object")
    py, npy = entry.get("python"), entry.get("numpy")
    _check(isinstance(py, dict) and isinstance(npy, dict), "python and numpy states are required")
    internal = py.get("state")
    _check(
        _is_int(py.get("version"), 0, 100)
        and isinstance(internal, list)
        and len(internal) == 625
        and all(_is_int(v, 0, 2**32) for v in internal)
        and (py.get("gauss_next") is None or type(py.get("gauss_next")) is float),
        "the python state is not a Mersenne Twister state",
    )
    keys = npy.get("keys")
    _check(
        npy.get("kind") == "MT19937"
        and isinstance(keys, list)
        and len(keys) == 624
        and all(_is_int(v, 0, 2**32) for v in keys)
        and _is_int(npy.get("pos"), 0, 625)
        and _is_int(npy.get("has_gauss"), 0, 2)
        and type(npy.get("cached_gaussian")) is float,
        "the numpy state is not an MT19937 state",
    )
    try:
        tensors = load_file(str(folder / RNG_TENSORS))
    except (OSError, SafetensorError):
        raise RngStateError(f"{RNG_TENSORS} is missing or not safetensors") from None
    state = {
        "python": (py["version"], tuple(internal), py["gauss_next"]),
        "numpy": (
            "MT19937",
            np.array(keys, dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        ),
        "torch": tensors.get(f"torch.{rank}"),
    }
    if f"cuda.{rank}" in tensors:
        state["cuda"] = tensors[f"cuda.{rank}"]
    for name in ("torch", "cuda"):
        tensor = state.get(name)
        if name in state and not (
            isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8 and tensor.dim() == 1
        ):
            raise RngStateError(f"{RNG_TENSORS}: the {name} state of rank {rank} is not a uint8 vector")
    return state
