"""`python -m vera_jax.serving --checkpoint DIR --adapter NAME=DIR [...] --host 127.0.0.1 --port P`

Loads the base (an HF checkpoint directory, a Hub id or a `.gguf` file) once through the model
loader (`vera_jax.models.loader`: `--quantize` keeps its linear kernels 4-bit or int8 in device
memory, `--dtype` sets its precision), every `--adapter` into the bank (a refused adapter stops the
start with its reason), and serves the OpenAI-compatible API (`server.py`).
"""

from __future__ import annotations

import argparse
import sys

from vera_jax.models import loader
from vera_jax.serving.bank import AdapterBank
from vera_jax.serving.engine import Engine
from vera_jax.serving.server import create_app, serve


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vera_jax.serving", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory, Hub id, or .gguf file")
    p.add_argument("--quantize", default="", choices=loader.QUANTIZE, metavar="{nf4,int8,gguf}",
                   help="keep the base's linear kernels quantized: nf4 or int8 (quantized while read), gguf (a "
                        ".gguf file's Q4_0/Q4_1 blocks as stored); default: as stored, dequantized")
    p.add_argument("--dtype", default="float32", choices=loader.DTYPES, help="the base's params and compute")
    p.add_argument("--network-timeout", type=float, default=5.0,
                   help="seconds to wait for the Hugging Face Hub before failing with advice")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter directory (ours or PEFT VeRA) served as model NAME; repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="rows decoded together (continuous batching)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context per slot (prompt + new tokens); default min(model positions, 2048)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens when a request gives none")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(app, engine, bank) from parsed arguments."""
    try:
        model = loader.load_model(loader.ModelSpec(args.checkpoint, quantize=args.quantize, dtype=args.dtype,
                                                   network_timeout=args.network_timeout))
    except (loader.ConfigError, loader.CheckpointUnavailableError, FileNotFoundError) as e:
        raise SystemExit(f"--checkpoint: {e}") from None
    hf_config = model.hf_config
    bank = AdapterBank(model.params, hf_config)
    paths = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in paths:
            raise SystemExit(f"--adapter: {spec!r} is not NAME=DIR with a new NAME")
        paths[name] = path
    try:
        infos = bank.load_many(paths)
    except (ValueError, OSError) as e:
        raise SystemExit(f"--adapter: refused: {e}") from None
    for info in infos:
        print(f"adapter {info.name}: group {info.group[:12]}, r={info.r}, {len(info.layers)} layers, "
              f"{info.bytes} bytes", file=sys.stderr)
    positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or 2048
    max_length = args.max_length or min(int(positions), 2048)
    engine = Engine(model.module, bank, slots=args.slots, max_length=max_length, tokenizer=model.tokenizer)
    return create_app(engine, bank, default_max_tokens=args.max_tokens), engine, bank


def main(argv=None) -> None:
    args = parse_args(argv)
    app, _, _ = build(args)
    serve(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
