"""Many VeRA adapters on one base model: groups of adapters that share A/B, their vectors stacked.

An `AdapterBank` holds the base params once and any number of adapters, read from our adapter
directories (`save_adapter`) or PEFT VeRA directories. Adapters whose projections have the same
fingerprint (same seed, rank, init and A/B shapes; for PEFT files, the same stored A/B) form one
*group*: the group keeps A and B once and, per adapted layer, d stacked as (capacity, r) and b as
(capacity, out). Row 0 of every group is all zeros, so a batch row that does not use the group
gathers a zero term; the batched forward (`batched.BankDecoder`) then costs the same two shared
matmuls per layer for every row, whatever the mix of adapters. Layers of a group are the union
of its adapters' layers; an adapter has zero vectors on the layers it does not adapt.

Supported: methods whose registry record has a `bank` hook (VeRA) with shared projections (the
default: one pair sliced per layer) or per-shape projections (`projections="per_shape"`: one pair
per kernel shape, which the group keeps once as the adapter file rebuilds it); each distinct
fingerprint is its own group. Refused, with the reason naming the method or field: LoRA, DVoRA,
head-only, full fine-tuning and registered methods without `bank` (per-adapter matrices or scales,
not two vectors), adapters that train base leaves (`trainable_extra`: a per-adapter head would need
a per-row base), per-layer projections (`share_projections=False`: a pair per layer and adapter,
nothing for a group to share), and anything
`load_adapter` / `load_peft_adapter` refuses (other layers or shapes than the base, a projection
fingerprint that differs from the file's).

A load reads and checks the whole adapter before it becomes visible; a name is visible only once
its vectors are on device. `unload` hides the name at once and frees its row when the last
request using it (`pin` / `unpin`) ends, so in-flight requests keep their adapter.
Thread-safe: one lock guards every change; `snapshot()` returns immutable arrays.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.adapters import directory as adapter_dir
from vera_jax.adapters.core import Adapted
from vera_jax.adapters.files import load_adapter
from vera_jax.adapters.methods import registry
from vera_jax.adapters.projections import fingerprint
from vera_jax.adapters.targets import LayerSpec
from vera_jax.tree import get_path

BASE = "base"  # the model name that means "no adapter"
MIN_CAPACITY = 8


class AdapterRefused(ValueError):
    """An adapter cannot join the bank; the message says why."""


class AdapterUnloaded(KeyError):
    """The adapter version a request was bound to has been unloaded (args[0] is the message)."""


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What `AdapterBank.load` reports: where the adapter lives and what it costs."""

    name: str
    source: str          # the directory it was read from ("" when added from memory)
    format: str          # "vera_jax" or "peft"
    group: str           # the projections' fingerprint (first 12 hex digits name the group)
    r: int
    layers: tuple[str, ...]
    bytes: int           # device bytes of its d and b vectors (its rows in the group's stacks)
    version: int = 0     # distinct for every load, so a reload under the same name is a new version

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


@dataclasses.dataclass
class _Group:
    key: str
    r: int
    projections: dict            # the adapters' A/B, float32 on device: {"A", "B"} or {"<in>x<out>": {"A", "B"}}
    layers: tuple[LayerSpec, ...]
    d: dict                      # layer name -> (capacity, r)
    b: dict                      # layer name -> (capacity, out)
    rows: dict                   # adapter name -> row (>= 1)
    pins: dict                   # row -> number of requests using it
    retired: set                 # rows of unloaded adapters still pinned

    @property
    def capacity(self) -> int:
        return next(iter(self.d.values())).shape[0]

    def free_rows(self) -> list[int]:
        used = set(self.rows.values()) | self.retired
        return [i for i in range(1, self.capacity) if i not in used]


def _read_format(directory: Path) -> str:
    config = adapter_dir.read_config(directory, AdapterRefused, "adapter")
    if "peft_type" in config:
        return "peft"
    if config.get("format") == "vera_jax.adapter":
        return "vera_jax"
    raise AdapterRefused(f"{directory}: adapter_config.json is neither a vera_jax adapter (format) nor a PEFT "
                         "adapter (peft_type)")


def check_servable(adapted: Adapted, where: str) -> None:
    """Raises AdapterRefused unless the batched forward can serve `adapted`: its method has a
    registry `bank` hook (two vectors per layer on projections the group shares: VeRA)."""
    method = registry.get(adapted.method)
    if method.bank is None:
        servable = [n for n in registry.names() if registry.get(n).bank is not None]
        raise AdapterRefused(f"{where}: method {adapted.method!r} is refused; the bank serves {servable} adapters "
                             "(two vectors per layer on projections the group shares)")
    if adapted.extra:
        extra = list(adapted.config.trainable_extra)
        raise AdapterRefused(f"{where}: it trains base leaves (trainable_extra {extra}); a per-adapter head "
                             "cannot share the one base")
    why = method.bank_refuse(adapted)
    if why is not None:
        raise AdapterRefused(f"{where}: {why}")


class AdapterBank:
    """Adapters on one base (see the module docstring). `hf_config`: the base's config.json
    (dict or path), needed only to read PEFT directories."""

    def __init__(self, params, hf_config: Any = None):
        self.params = params
        self.hf_config = hf_config
        self._groups: dict[str, _Group] = {}
        self._where: dict[str, str] = {}            # adapter name -> group key
        self._info: dict[str, AdapterInfo] = {}
        self._lock = threading.RLock()
        self.version = 0                             # bumped on every visible change
        self._loads = 0                              # numbers each load: AdapterInfo.version

    # ------------------------------------------------------------------------------ reading
    def read(self, path: str | os.PathLike) -> tuple[Adapted, str]:
        """(Adapted, format) for an adapter directory, fully checked against the base; raises
        AdapterRefused (or AdapterFileError for a corrupt file) naming the problem."""
        directory = Path(path)
        if not directory.is_dir():
            raise AdapterRefused(f"{directory}: not an adapter directory")
        kind = _read_format(directory)
        if kind == "peft":
            if self.hf_config is None:
                raise AdapterRefused(f"{directory}: a PEFT adapter needs the base model's config (hf_config)")
            from vera_jax.interop.peft import load_peft_adapter

            adapted = load_peft_adapter(directory, self.params, self.hf_config)
        else:
            adapted = load_adapter(directory, self.params)
        check_servable(adapted, str(directory))
        return adapted, kind

    def load(self, name: str, path: str | os.PathLike) -> AdapterInfo:
        """Reads the adapter at `path` and makes it visible as `name`."""
        return self.load_many({name: path})[0]

    def load_many(self, paths: Mapping[str, str | os.PathLike]) -> list[AdapterInfo]:
        """Reads every {name: path}; all become visible together, or none (the first problem raises)."""
        for name in paths:
            self._check_name(name)
        read = {name: self.read(path) for name, path in paths.items()}
        return self.add_many({n: a for n, (a, _) in read.items()},
                             sources={n: str(paths[n]) for n in read}, formats={n: k for n, (_, k) in read.items()})

    # ------------------------------------------------------------------------------ changes
    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name == BASE or "/" in name:
            raise AdapterRefused(f"name: {name!r} is not allowed; use a non-empty name without '/', not {BASE!r}")
        with self._lock:
            if name in self._info:
                raise AdapterRefused(f"name: {name!r} is already loaded; unload it first")

    def add(self, name: str, adapted: Adapted, source: str = "", fmt: str = "vera_jax") -> AdapterInfo:
        """Adds an in-memory `Adapted` (checked as `read` checks files) as `name`."""
        return self.add_many({name: adapted}, sources={name: source}, formats={name: fmt})[0]

    def add_many(self, adapters: Mapping[str, Adapted], sources: Mapping[str, str] | None = None,
                 formats: Mapping[str, str] | None = None) -> list[AdapterInfo]:
        """Adds {name: Adapted} with one device update per stacked layer and group (adding N one
        by one would copy each stack N times); all are checked before any becomes visible."""
        prepared, memo = [], {}
        for name, adapted in adapters.items():
            self._check_name(name)
            check_servable(adapted, f"adapter {name!r}")
            pair = tuple(map(id, jax.tree.leaves(adapted.projections)))
            key = memo[pair] if pair in memo else memo.setdefault(pair, fingerprint(adapted.projections))
            bank = registry.get(adapted.method).bank
            vectors = {s.name: tuple(np.asarray(v, np.float32)
                                     for v in bank(adapted, s, get_path(adapted.adapter, s.path)))
                       for s in adapted.layers}
            _check_finite(name, vectors)
            info = AdapterInfo(name, (sources or {}).get(name, ""), (formats or {}).get(name, "vera_jax"), key,
                               adapted.config.r, tuple(s.name for s in adapted.layers),
                               sum(d.nbytes + b.nbytes for d, b in vectors.values()))
            prepared.append((name, key, adapted, vectors, info))
        by_key: dict[str, list] = {}
        for item in prepared:
            by_key.setdefault(item[1], []).append(item)
        with self._lock:
            for name in adapters:
                self._check_name(name)
            for key, items in by_key.items():
                self._groups[key] = self._insert(self._groups.get(key), key, items)
            for name, key, _, _, info in prepared:
                self._loads += 1
                self._where[name] = key
                self._info[name] = dataclasses.replace(info, version=self._loads)
            self.version += 1
        return [self._info[name] for name, *_ in prepared]

    def _insert(self, group: _Group | None, key: str, items: list) -> _Group:
        """`group` (or a new one) with the items' vectors written into free rows."""
        if group is None:
            adapted = items[0][2]
            projections = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), adapted.projections)
            group = _Group(key, adapted.config.r, projections, (), {}, {}, {}, {}, set())
        group = self._with_layers(group, [s for item in items for s in item[2].layers])
        while len(group.free_rows()) < len(items):
            group = self._grown(group)
        rows = np.asarray(group.free_rows()[: len(items)])
        for layer in group.layers:
            zeros = (np.zeros(group.r, np.float32), np.zeros(layer.out_features, np.float32))
            vecs = [item[3].get(layer.name, zeros) for item in items]
            group.d[layer.name] = group.d[layer.name].at[rows].set(np.stack([d for d, _ in vecs]))
            group.b[layer.name] = group.b[layer.name].at[rows].set(np.stack([b for _, b in vecs]))
        for (name, *_), row in zip(items, rows):
            group.rows[name] = int(row)
        return group

    @staticmethod
    def _with_layers(group: _Group, layers) -> _Group:
        """The group with `layers` added to its union (new layers zero for existing rows)."""
        capacity = group.capacity if group.d else MIN_CAPACITY
        known = {s.name for s in group.layers}
        new = tuple({s.name: s for s in layers if s.name not in known}.values())
        if not new:
            return group
        d, b = dict(group.d), dict(group.b)
        for s in new:
            d[s.name] = jnp.zeros((capacity, group.r), jnp.float32)
            b[s.name] = jnp.zeros((capacity, s.out_features), jnp.float32)
        return dataclasses.replace(group, layers=group.layers + new, d=d, b=b)

    @staticmethod
    def _grown(group: _Group) -> _Group:
        """Twice the capacity: the stacks' shapes change (one recompile per doubling, not per load)."""
        pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)])  # noqa: E731
        return dataclasses.replace(group, d={k: pad(v) for k, v in group.d.items()},
                                   b={k: pad(v) for k, v in group.b.items()})

    def unload(self, name: str) -> int:
        """Hides `name`; its row is zeroed now, or when its last pinned request ends. Returns the
        version unloaded."""
        with self._lock:
            if name not in self._info:
                raise KeyError(self.unknown(name))
            group = self._groups[self._where.pop(name)]
            version = self._info.pop(name).version
            row = group.rows.pop(name)
            if group.pins.get(row):
                group.retired.add(row)
            else:
                self._release(group, row)
            self.version += 1
            return version

    def _release(self, group: _Group, row: int) -> None:
        group.retired.discard(row)
        group.pins.pop(row, None)
        if not group.rows and not group.retired:
            del self._groups[group.key]
            return
        for k in group.d:
            group.d[k] = group.d[k].at[row].set(0.0)
            group.b[k] = group.b[k].at[row].set(0.0)

    def pin(self, name: str, version: int | None = None) -> tuple[str, int] | None:
        """(group key, row) for a request to `name` (None for the base), held until `unpin`.
        version: the one the request was admitted with; AdapterUnloaded if it is gone."""
        if name == BASE:
            return None
        with self._lock:
            if version is not None and (name not in self._info or self._info[name].version != version):
                raise AdapterUnloaded(f"model {name!r} was unloaded")
            if name not in self._info:
                raise KeyError(self.unknown(name))
            group = self._groups[self._where[name]]
            row = group.rows[name]
            group.pins[row] = group.pins.get(row, 0) + 1
            return group.key, row

    def unpin(self, ref: tuple[str, int] | None) -> None:
        if ref is None:
            return
        with self._lock:
            group = self._groups[ref[0]]
            group.pins[ref[1]] -= 1
            if group.pins[ref[1]] == 0 and ref[1] in group.retired:
                self._release(group, ref[1])
                self.version += 1

    # ------------------------------------------------------------------------------ reading state
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._info)

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            if name not in self._info:
                raise KeyError(self.unknown(name))
            return self._info[name]

    def unknown(self, name: str) -> str:
        return f"model: {name!r} is not loaded; known: {[BASE] + self.names()}"

    def snapshot(self) -> tuple[tuple, dict]:
        """(structure, arrays) of the current groups, in a fixed order: structure is a tuple of
        (group key, layers) for `BankDecoder`; arrays is {"base": params, "groups": [{"projections",
        "d", "b"}, ...]}, the decoder's params."""
        with self._lock:
            groups = [self._groups[k] for k in sorted(self._groups)]
            structure = tuple((g.key, g.layers) for g in groups)
            arrays = {"base": self.params,
                      "groups": [{"projections": g.projections, "d": dict(g.d), "b": dict(g.b)} for g in groups]}
            return structure, arrays

    def stats(self) -> dict:
        """Counts and bytes: per adapter (its vectors), per group (shared A/B and stacks)."""
        with self._lock:
            groups = []
            for g in self._groups.values():
                stacked = sum(x.nbytes for x in (*g.d.values(), *g.b.values()))
                shared = sum(x.nbytes for x in jax.tree.leaves(g.projections))
                groups.append({"group": g.key[:12], "r": g.r, "adapters": len(g.rows), "capacity": g.capacity,
                               "layers": len(g.layers), "projection_bytes": int(shared), "stacked_bytes": int(stacked)})
            return {"adapters": len(self._info), "groups": groups,
                    "bytes_per_adapter": {n: i.bytes for n, i in self._info.items()}}


def _check_finite(name: str, vectors: dict) -> None:
    """AdapterRefused naming the first vector with NaN or inf (it would decode garbage for ever)."""
    for layer, pair in vectors.items():
        for field, v in zip(("lambda_d", "lambda_b"), pair):
            if not np.isfinite(v).all():
                raise AdapterRefused(f"adapter {name!r}: {layer}.{field} has NaN or inf values")


def rows_for(structure: tuple, refs: list[tuple[str, int] | None]) -> np.ndarray:
    """Per-row indices (batch, groups) int32 for `BankDecoder`: row i's column g is its row in
    group g, 0 (the zero row) for the other groups and for base-model rows."""
    column = {key: g for g, (key, _) in enumerate(structure)}
    out = np.zeros((len(refs), len(structure)), np.int32)
    for i, ref in enumerate(refs):
        if ref is not None:
            out[i, column[ref[0]]] = ref[1]
    return out

