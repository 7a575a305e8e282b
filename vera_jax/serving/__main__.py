"""`python -m vera_jax.serving --checkpoint DIR --adapter NAME=DIR [...] --host 127.0.0.1 --port P`

Loads the base (an HF checkpoint directory, a Hub id or a `.gguf` file) once, every `--adapter`
into the bank (a refused adapter stops the start with its reason), and serves the
OpenAI-compatible API (`server.py`).
"""

from __future__ import annotations

import argparse
import sys

from vera_jax.models import hub
from vera_jax.serving.bank import AdapterBank
from vera_jax.serving.engine import Engine
from vera_jax.serving.server import create_app, serve


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vera_jax.serving", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory, Hub id, or .gguf file")
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
    model, params, tokenizer = hub.from_pretrained(args.checkpoint)
    hf_config = hub.read_config(args.checkpoint if str(args.checkpoint).endswith(".gguf")
                                else hub.resolve(args.checkpoint))
    bank = AdapterBank(params, hf_config)
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
    engine = Engine(model, bank, slots=args.slots, max_length=max_length, tokenizer=tokenizer)
    return create_app(engine, bank, default_max_tokens=args.max_tokens), engine, bank


def main(argv=None) -> None:
    args = parse_args(argv)
    app, _, _ = build(args)
    serve(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
