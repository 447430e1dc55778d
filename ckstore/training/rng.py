"""Random number generator state as tensors and JSON: :class:`RNGState`.

A resumed run draws the same random numbers as the uninterrupted one only if
every generator it uses continues from where it was at the checkpoint. Put an
``RNGState()`` in the saved state and ckstore captures, without pickle:

* Python's ``random`` module: ``random.getstate()`` is ``(version, 625 ints,
  gauss_next)``; the ints go into an int64 tensor;
* NumPy's global generator (``np.random.*``, MT19937): its 624-word key as a
  uint32 array, plus ``pos``, ``has_gauss`` and the cached gaussian;
* torch's CPU generator (a uint8 tensor) and, when CUDA has been initialised,
  every CUDA device's generator;
* any ``torch.Generator`` registered by name (a loader's generator, a
  generator used for augmentation, ...).

Restoring checks that the checkpoint holds what this object expects; a
registered generator missing from the checkpoint is a :class:`StateError`
rather than a silent fresh start.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError, StateError

_PY_WORDS = 625  # MT19937: 624 words of state plus the position


class RNGState:
    """A stateful object (``state_dict``/``load_state_dict``) holding every RNG a training step may use.

    >>> rng = ckstore.RNGState()
    >>> rng.register("loader", loader_generator)
    >>> state = {"model": model, "optimizer": opt, "rng": rng}

    ``python``, ``numpy``, ``torch`` and ``cuda`` switch the global generators
    on or off (all on by default). CUDA state is captured only once CUDA is
    initialised, so a CPU-only run never touches the driver.
    """

    def __init__(
        self,
        *,
        python: bool = True,
        numpy: bool = True,
        torch: bool = True,
        cuda: bool = True,
        generators: Mapping[str, Any] | None = None,
    ) -> None:
        self.python = bool(python)
        self.numpy = bool(numpy)
        self.torch = bool(torch)
        self.cuda = bool(cuda)
        self._generators: dict[str, Any] = {}
        for name, generator in (generators or {}).items():
            self.register(name, generator)

    def register(self, name: str, generator: Any) -> None:
        """Capture ``generator`` (a ``torch.Generator``) under ``name`` too."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"generator name must be a non-empty string, got {name!r}")
        if not isinstance(generator, torch.Generator):
            raise InvalidArgumentError(f"generator {name!r} must be a torch.Generator, got {type(generator).__name__}")
        if name in self._generators and self._generators[name] is not generator:
            raise InvalidArgumentError(f"a different generator is already registered as {name!r}")
        self._generators[name] = generator

    @property
    def generators(self) -> dict[str, Any]:
        """The registered generators by name (a copy)."""
        return dict(self._generators)

    # ------------------------------------------------------------ capture

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of every enabled generator: tensors, arrays and plain numbers only."""
        out: dict[str, Any] = {}
        if self.python:
            version, words, gauss = random.getstate()
            out["python"] = {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss}
        if self.numpy:
            st = np.random.get_state(legacy=False)
            if st["bit_generator"] != "MT19937":  # pragma: no cover - the legacy global generator is always MT19937
                raise StateError(f"NumPy's global generator is {st['bit_generator']}; only MT19937 is supported", key="rng.numpy")
            out["numpy"] = {
                "bit_generator": "MT19937",
                "key": np.array(st["state"]["key"], dtype=np.uint32),
                "pos": int(st["state"]["pos"]),
                "has_gauss": int(st["has_gauss"]),
                "gauss": float(st["gauss"]),
            }
        if self.torch:
            out["torch"] = torch.get_rng_state()
        if self.cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = [state.clone() for state in torch.cuda.get_rng_state_all()]
        if self._generators:
            out["generators"] = {name: gen.get_state() for name, gen in sorted(self._generators.items())}
        return out

    # ------------------------------------------------------------ restore

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put every enabled generator back where the snapshot left it."""
        if not isinstance(state, Mapping):
            raise StateError(f"RNG state must be a mapping, got {type(state).__name__}", key="rng")
        if self.python:
            self._load_python(_need(state, "python"))
        if self.numpy:
            self._load_numpy(_need(state, "numpy"))
        if self.torch:
            torch.set_rng_state(_byte_tensor(_need(state, "torch"), "rng.torch"))
        if self.cuda and "cuda" in state:
            self._load_cuda(state["cuda"])
        saved = state.get("generators") or {}
        if not isinstance(saved, Mapping):
            raise StateError("rng.generators must be a mapping", key="rng.generators")
        missing = sorted(set(self._generators) - set(saved))
        if missing:
            raise StateError(f"the checkpoint holds no state for registered generator(s) {missing}", key="rng.generators")
        for name, generator in self._generators.items():
            value = _byte_tensor(saved[name], f"rng.generators.{name}")
            try:
                generator.set_state(value)
            except RuntimeError as exc:
                raise StateError(f"rng.generators.{name}: {exc}", key=f"rng.generators.{name}") from exc

    @staticmethod
    def _load_python(node: Any) -> None:
        try:
            words = node["state"]
            words = words.tolist() if isinstance(words, (torch.Tensor, np.ndarray)) else list(words)
            gauss = node.get("gauss_next")
            if len(words) != _PY_WORDS:
                raise ValueError(f"expected {_PY_WORDS} words, got {len(words)}")
            random.setstate((int(node["version"]), tuple(int(w) for w in words), None if gauss is None else float(gauss)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"rng.python: not a Python random state ({exc})", key="rng.python") from None

    @staticmethod
    def _load_numpy(node: Any) -> None:
        try:
            key = node["key"]
            key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
            np.random.set_state(
                {
                    "bit_generator": str(node["bit_generator"]),
                    "state": {"key": np.asarray(key, dtype=np.uint32), "pos": int(node["pos"])},
                    "has_gauss": int(node["has_gauss"]),
                    "gauss": float(node["gauss"]),
                }
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"rng.numpy: not a NumPy MT19937 state ({exc})", key="rng.numpy") from None

    @staticmethod
    def _load_cuda(states: Any) -> None:
        if not isinstance(states, (list, tuple)):
            raise StateError("rng.cuda must be a list of per-device states", key="rng.cuda")
        if not torch.cuda.is_available():
            warnings.warn("the checkpoint holds CUDA RNG state but CUDA is not available; it is not restored", stacklevel=3)
            return
        count = torch.cuda.device_count()
        if count != len(states):
            warnings.warn(
                f"the checkpoint holds RNG state for {len(states)} CUDA device(s), this machine has {count}; "
                "restoring the first min(...) only, so random draws on GPU will differ from the saved run",
                stacklevel=3,
            )
        for index, value in enumerate(states[:count]):
            torch.cuda.set_rng_state(_byte_tensor(value, f"rng.cuda[{index}]"), device=index)


def _need(state: Mapping[str, Any], key: str) -> Any:
    if key not in state:
        raise StateError(f"the checkpoint holds no {key} RNG state; construct RNGState({key}=False) to skip it", key=f"rng.{key}")
    return state[key]


def _byte_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise StateError(f"{key}: expected a 1-d uint8 tensor", key=key)
    return value.cpu().contiguous()
