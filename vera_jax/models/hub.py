"""Load Hugging Face checkpoints (config.json + safetensors) into the Flax models.

`from_pretrained` dispatches on `config.json`'s `model_type` to a family module (imported
lazily from `FAMILIES`), which exposes `build`, `params_from_hf`, `params_to_hf`,
`HF_MODULE_NAMES` and `dummy_inputs`. Only safetensors are read: pickled `.bin`
checkpoints can run arbitrary code when loaded and are refused.
A path ending in `.gguf` is read by `vera_jax.models.gguf` (config and tokenizer from its metadata).

Streamed loading (`from_pretrained(..., quantize="nf4" | "int8", mesh=...)`), for checkpoints
larger than host memory in full precision (LLaMA 7B/13B is 27/52 GB in float32): the shards'
headers are read first (`stored_tensors`), then each tensor is read from disk when its leaf is
converted, cast, quantized if `quant.quantize_params` would quantize it, placed on its device(s)
and its float copy dropped before the next tensor is read. Host memory then peaks near one
tensor in float32 (plus the quantized model and a second copy of the tensor on a CPU backend,
whose device memory is host memory), instead of the float checkpoint plus its float32 copy
(`experiments/load_memory.py` measures both). The tensors are read with plain file reads, not
`safetensors.safe_open`, which memory-maps the shard: every page it touches counts in the
process's resident memory until the shard is closed (measured: a 240 MiB shard read tensor by
tensor raised RSS by 263 MiB, against 23 MiB, its largest tensor, here).
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import math
import os
from types import ModuleType
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

from vera_jax import sharding as sharding_lib
from vera_jax.models import common

FAMILIES = {
    "bert": "vera_jax.models.roberta",
    "roberta": "vera_jax.models.roberta",
    "vit": "vera_jax.models.vit",
    "gpt2": "vera_jax.models.gpt2",
    "llama": "vera_jax.models.llama",
    "mistral": "vera_jax.models.llama",
    "qwen2": "vera_jax.models.llama",
    "qwen3": "vera_jax.models.llama",
    "gemma": "vera_jax.models.llama",
    "gemma2": "vera_jax.models.llama",
    "gemma3_text": "vera_jax.models.llama",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")
_DOWNLOAD_PATTERNS = ["config.json", "*.safetensors", "*.json", "*.txt", "*.model"]
# safetensors dtype names (the format's spec) -> numpy dtypes
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def family(model_type: str) -> ModuleType:
    """The family module for an HF `model_type`."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def bundled_configs() -> list[str]:
    """Names of the config.json files shipped in vera_jax/models/configs (the paper's models)."""
    files = importlib.resources.files("vera_jax.models") / "configs"
    return sorted(f.name[: -len(".json")] for f in files.iterdir() if f.name.endswith(".json"))


def bundled_config(name: str) -> dict:
    """A shipped config.json (e.g. "roberta-large"): enough to build the model, no weights."""
    if name not in bundled_configs():
        raise ValueError(f"no bundled config {name!r}; available: {bundled_configs()}")
    return json.loads((importlib.resources.files("vera_jax.models") / "configs" / f"{name}.json").read_text())


def resolve(name_or_dir: str) -> str:
    """A local directory as is; otherwise a Hub id, downloaded (config, safetensors, tokenizer)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir.startswith((".", "/", "~")) or os.path.exists(name_or_dir):
        raise FileNotFoundError(f"{name_or_dir}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_dir, allow_patterns=_DOWNLOAD_PATTERNS)


def read_config(path: str) -> dict:
    """The HF config of a checkpoint directory (config.json) or of a `.gguf` file (its metadata)."""
    if str(path).endswith(".gguf"):
        from vera_jax.models import gguf

        return gguf.read_config(str(path))
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(config_file) as f:
        return json.load(f)


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: `model.safetensors`, or the shards named in
    `model.safetensors.index.json`."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, shard) for shard in shards]
    pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickled:
        raise ValueError(
            f"{path}: only pickle checkpoints found ({', '.join(sorted(pickled))}); safetensors are required "
            "(pickle is never loaded). Convert with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)."
        )
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(safetensors are required)")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    tensors: dict[str, np.ndarray] = {}
    for file in safetensors_files(path):
        tensors.update(load_file(file))
    return tensors


class StoredTensor:
    """One tensor of a safetensors file, read (a plain read of its bytes into a fresh array) only
    when converted with `np.asarray`; `shape` and `dtype` come from the file's header."""

    __slots__ = ("file", "name", "shape", "dtype", "start", "stop")

    def __init__(self, file: str, name: str, shape: tuple, dtype: np.dtype, start: int, stop: int):
        self.file, self.name, self.shape, self.dtype, self.start, self.stop = file, name, shape, dtype, start, stop

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, self.dtype)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            read = f.readinto(out.reshape(-1).view(np.uint8))
        if read != self.stop - self.start:
            raise ValueError(f"{self.file}: tensor {self.name} is truncated ({read} of {self.stop - self.start} "
                             "bytes)")
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self):
        return f"StoredTensor({self.name!r}, {self.shape}, {self.dtype}, {os.path.basename(self.file)})"


def _safetensors_header(file: str) -> dict[str, StoredTensor]:
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"{file}: not a safetensors file (header length {length}, file size {size})")
        header = json.loads(f.read(length))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']!r}; supported: "
                             f"{sorted(SAFETENSORS_DTYPES)}")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        start, stop = (8 + length + int(o) for o in info["data_offsets"])
        if stop - start != math.prod(shape) * dtype.itemsize or stop > size:
            raise ValueError(f"{file}: tensor {name} ({info['dtype']} {list(shape)}) has data offsets "
                             f"{info['data_offsets']} that do not fit its shape or the file ({size} bytes)")
        out[name] = StoredTensor(file, name, shape, dtype, start, stop)
    return out


def stored_tensors(path: str) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint directory `path` (one file or shards, as `read_safetensors`),
    from the files' headers only: each reads itself when converted, so a loader that converts and
    drops one at a time never holds more than one in host memory."""
    tensors: dict[str, StoredTensor] = {}
    for file in safetensors_files(path):
        tensors.update(_safetensors_header(file))
    return tensors


def eos_token_ids(hf_config: dict, path: str | None = None) -> tuple[int, ...]:
    """The ids that end generation for a checkpoint: `eos_token_id` (an int or a list) of its
    config, then of the `generation_config.json` in `path` when it is a directory holding one
    (transformers' `generate` stops on the latter: Gemma 3's lists <eos> and <end_of_turn>, [1, 106]);
    each once, in that order. A `.gguf` file's config already lists its eos/eot/eom ids."""
    values = [hf_config.get("eos_token_id")]
    generation = os.path.join(path, "generation_config.json") if path and os.path.isdir(path) else None
    if generation is not None and os.path.isfile(generation):
        with open(generation) as f:
            values.append(json.load(f).get("eos_token_id"))
    ids = [v for value in values if value is not None for v in ([value] if isinstance(value, int) else value)]
    return tuple(dict.fromkeys(int(i) for i in ids))


def load_tokenizer(path: str):
    """`transformers.AutoTokenizer` for the directory, or None when it has no tokenizer files."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def task_config(hf_config: dict, num_labels: int | None = None, architecture: str | None = None) -> dict:
    """`hf_config` set up for the requested head.

    `num_labels` without `architecture` picks the family's classification architecture
    (e.g. RobertaForSequenceClassification for a RobertaForMaskedLM checkpoint) and drops
    the checkpoint's label names.
    """
    hf_config = dict(hf_config)
    if num_labels is not None:
        hf_config["num_labels"] = num_labels
        hf_config.pop("id2label", None)
        hf_config.pop("label2id", None)
        if architecture is None:
            model_type = hf_config["model_type"]
            heads = getattr(family(model_type), "CLASSIFICATION_ARCHITECTURE", {})
            if model_type not in heads:
                raise ValueError(f"num_labels given, but model_type {model_type!r} has no classification head")
            architecture = heads[model_type]
    if architecture is not None:
        hf_config["architectures"] = [architecture]
    return hf_config


def from_pretrained(
    name_or_dir: str,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    num_labels: int | None = None,
    architecture: str | None = None,
    *,
    quantize: str | None = None,
    quantize_skip: Iterable[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Iterable[tuple] | None = None,
    scan_layers: bool = False,
) -> tuple[Any, dict, Any]:
    """(model, params, tokenizer or None) for a local checkpoint directory, a Hub id, or a local
    `.gguf` file (LLaMA architecture; dequantized to float, see `vera_jax.models.gguf`).

    The architecture is `architecture`, else the family's classification architecture when
    `num_labels` is given, else `config.json`'s `architectures[0]`. A head the checkpoint
    lacks (base weights loaded for classification) is freshly initialised from seed 0 (see
    the family's `params_from_hf`); any other missing, unexpected or misshapen tensor raises
    `common.CheckpointError` naming it. Params are cast to `param_dtype`.

    `quantize` ("nf4" | "int8") or `mesh` load streamed (see the module docstring): the result is
    the plain load's params, bit for bit, quantized as `quant.quantize_params(params, quantize,
    skip=quantize_skip)` would when `quantize` is given (`quantize_skip` defaults to
    `quant.DEFAULT_SKIP`: lm_head and classifier stay as they are), every leaf computed on the
    default device and, given `mesh`, sharded as the trainer shards it
    (`vera_jax.sharding.param_shardings` of the logical axes, `quant.quantized_axes` for quantized kernels,
    by `rules`, e.g. the trainer's `config.mesh.rules`). A `.gguf` file is read whole first.

    `scan_layers`: the model runs its blocks under one nn.scan and the checkpoint's per-layer
    tensors are stacked into its `layer` subtree (`common.stack_layers`); `params_to_hf` writes
    them back per layer. Not with `quantize` (a stacked quantized base belongs to the adapters'
    per-slice handling).
    """
    if quantize is not None:
        from vera_jax import quant

        if quantize not in quant.METHODS:
            raise ValueError(f"from_pretrained: quantize {quantize!r} is not one of {[None, *quant.METHODS]}")
    elif quantize_skip is not None:
        raise ValueError("from_pretrained: quantize_skip is given but quantize is None; pass quantize='nf4' or "
                         "'int8' too")
    if scan_layers and quantize is not None:
        raise ValueError(f"from_pretrained: scan_layers=True with quantize {quantize!r} is not supported; load the "
                         "scanned model in float, or unrolled (scan_layers=False) to quantize while reading")
    if rules is not None and mesh is None:
        raise ValueError("from_pretrained: rules is given but mesh is None; rules map logical axes onto a mesh")
    if mesh is not None and rules is None:
        raise ValueError("from_pretrained: mesh is given but rules is None; pass the logical-axis rules, e.g. "
                         "vera_jax.train.default_config().mesh.rules")
    if str(name_or_dir).endswith(".gguf"):
        from vera_jax.models import gguf

        reader = gguf.open_gguf(str(name_or_dir))
        hf_config = gguf.read_config(reader)
        tensors = gguf.read_tensors(reader, hf_config)
        tokenizer = gguf.load_tokenizer(reader)
    else:
        path = resolve(name_or_dir)
        hf_config = read_config(path)
        if "model_type" not in hf_config:
            raise ValueError(f"{path}/config.json has no model_type")
        streamed = quantize is not None or mesh is not None
        tensors = stored_tensors(path) if streamed else read_safetensors(path)
        tokenizer = load_tokenizer(path)
    hf_config = task_config(hf_config, num_labels, architecture)
    fam = family(hf_config["model_type"])
    chosen = hf_config["architectures"][0] if num_labels is not None or architecture is not None else None
    model = fam.build(hf_config, dtype=dtype, param_dtype=param_dtype, architecture=chosen)
    if quantize is None and mesh is None:
        params = fam.params_from_hf(tensors, hf_config)
        if scan_layers:
            params = common.stack_layers(params)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), params)
        return model.clone(scan_layers=scan_layers), params, tokenizer
    finish = _leaf_finisher(model, fam.dummy_inputs(hf_config), param_dtype, quantize, quantize_skip,
                            None if scan_layers else mesh, rules)
    params = fam.params_from_hf(tensors, hf_config, finish=finish)
    if scan_layers:  # read and cast one leaf at a time, then stacked and placed as the scanned model is sharded
        model = model.clone(scan_layers=True)
        params = common.stack_layers(params)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *fam.dummy_inputs(hf_config)))
        params = _place(params, sharding_lib.param_shardings(params, nn.get_partition_spec(boxed)["params"], mesh,
                                                             rules))
    # the plain load's tree.map rebuilds every dict with sorted keys; the same here, nothing copied
    return model, jax.tree.map(lambda x: x, params, is_leaf=_is_quantized), tokenizer


def _is_quantized(x) -> bool:
    from vera_jax import quant

    return quant.is_quantized(x)


def _leaf_finisher(model, dummy_inputs: tuple, param_dtype, quantize: str | None, quantize_skip, mesh,
                   rules) -> Callable[[tuple, Any], Any]:
    """`finish(path, host array)` for `params_from_hf`: the leaf cast to `param_dtype`, quantized
    when `quant.quantize_params` would quantize it (`quant.linear_paths` of the model's abstract
    params), placed (default device, or its sharding on `mesh`), and computed before it returns,
    so asynchronous dispatch cannot pile up float tensors waiting to be quantized."""
    from vera_jax import quant
    from vera_jax.tree import get_path, path_str, set_path

    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), nn.unbox(boxed)["params"])
    skip = tuple(quant.DEFAULT_SKIP if quantize_skip is None else quantize_skip)
    targets = set(quant.linear_paths(abstract, None, skip)) if quantize else set()
    if quantize and not targets:
        raise ValueError(f"from_pretrained: quantize {quantize!r} with quantize_skip {list(skip)} matched no linear "
                         "module")
    shardings = None
    if mesh is not None:
        axes = nn.get_partition_spec(boxed)["params"]
        if quantize:
            def quantized(params):
                for path in targets:
                    kernel = quant.quantize_kernel(get_path(params, path + ("kernel",)), quantize, name=path_str(path))
                    set_path(params, path + ("kernel",), kernel)
                return params

            abstract = jax.eval_shape(quantized, abstract)
            axes = quant.quantized_axes(abstract, axes)
        shardings = sharding_lib.param_shardings(abstract, axes, mesh, rules)

    def finish(path: tuple, value):
        leaf = jnp.asarray(value, dtype=param_dtype)
        if path[-1] == "kernel" and path[:-1] in targets:
            leaf = quant.quantize_kernel(leaf, quantize, name=path_str(path[:-1]))
        if shardings is not None:
            leaf = _place(leaf, get_path(shardings, path))
        return jax.block_until_ready(leaf)

    return finish


def _place(leaf, sharding):
    """`leaf` (a single-device array or quantized kernel) on `sharding` (a matching tree); across
    processes each one builds only the shards its devices hold."""
    if all(s.is_fully_addressable for s in jax.tree.leaves(sharding)):
        return jax.device_put(leaf, sharding)
    return sharding_lib.put(leaf, sharding)
