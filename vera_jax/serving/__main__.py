"""`python -m vera_jax.serving --checkpoint DIR --adapter NAME=DIR [...] --host 127.0.0.1 --port P`

Loads the base (an HF checkpoint directory, a Hub id or a `.gguf` file) once through the model
loader (`vera_jax.models.loader`: `--quantize` keeps its linear kernels 4-bit or int8 in device
memory, `--dtype` sets its precision, `--scan-layers` runs its blocks under one nn.scan with a
stacked KV cache), every `--adapter` into the bank (a refused adapter stops the
start with its reason), and serves the OpenAI-compatible API (`server.py`). Chat requests use the
tokenizer's chat template, or `--chat-template` (a Jinja file or a shipped name, e.g. `gemma`, for a
checkpoint that carries none); rows stop on the ids `chat.stop_ids` gives (the config's and
generation config's eos ids, the tokenizer's eos, the template's end-of-turn token), printed at start.
"""

from __future__ import annotations

import argparse
import os
import sys

from vera_jax.models import hub, loader
from vera_jax.serving import chat, routes
from vera_jax.serving.bank import AdapterBank
from vera_jax.serving.engine import Engine
from vera_jax.serving.server import create_app, serve


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit 2 (argparse's own errors, and `check`'s)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m vera_jax.serving", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory, Hub id, or .gguf file")
    p.add_argument("--quantize", default="", choices=loader.QUANTIZE, metavar="{nf4,int8,gguf}",
                   help="keep the base's linear kernels quantized: nf4 or int8 (quantized while read), gguf (a "
                        ".gguf file's Q4_0/Q4_1 blocks as stored); default: as stored, dequantized")
    p.add_argument("--dtype", default="float32", choices=loader.DTYPES, help="the base's params and compute")
    p.add_argument("--scan-layers", "--scan_layers", action="store_true",
                   help="run the base's blocks under one nn.scan (params stacked on a layer axis; compile time flat "
                        "in depth)")
    p.add_argument("--network-timeout", type=float, default=5.0,
                   help="seconds to wait for the Hugging Face Hub before failing with advice")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter directory (ours or PEFT VeRA) served as model NAME; repeatable")
    p.add_argument("--chat-template", default=None, metavar="NAME_OR_FILE",
                   help="the chat template of /v1/chat/completions instead of the tokenizer's own: a Jinja file, or a "
                        f"shipped one ({', '.join(sorted(chat.TEMPLATES))}); for checkpoints that carry none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="rows decoded together (continuous batching)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context per slot (prompt + new tokens); default min(model positions, 2048)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens when a request gives none")
    p.add_argument("--api-key", default=os.environ.get("VERA_API_KEY"),
                   help="require Authorization: Bearer KEY on every /v1 route (default: $VERA_API_KEY)")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="allow loading adapters at run time, only from directories inside DIR (default: off)")
    p.add_argument("--max-body-bytes", type=int, default=routes.MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument("--max-prompt-chars", type=int, default=routes.MAX_PROMPT_CHARS,
                   help="prompt characters per request, counted before tokenizing")
    p.add_argument("--max-prompts", type=int, default=routes.MAX_PROMPTS, help="prompts per request")
    args = p.parse_args(argv)
    check(p, args)
    return args


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that parse but cannot work end the start with one line and exit 2."""
    for flag, value, least in (("--slots", args.slots, 1), ("--max-tokens", args.max_tokens, 1),
                               ("--max-body-bytes", args.max_body_bytes, 1),
                               ("--max-prompt-chars", args.max_prompt_chars, 1),
                               ("--max-prompts", args.max_prompts, 1), ("--port", args.port, 0)):
        if value < least:
            p.error(f"{flag}: {value}; expected an integer >= {least}")
    if args.port > 65535:
        p.error(f"--port: {args.port}; expected at most 65535")
    if args.max_length is not None and args.max_length < 2:
        p.error(f"--max-length: {args.max_length}; expected an integer >= 2")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key: empty; give a key or leave the flag (and VERA_API_KEY) out")
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        p.error(f"--adapter-root: {args.adapter_root!r} is not a directory")
    if args.chat_template is not None:
        try:
            chat.load_template(args.chat_template)
        except ValueError as e:
            p.error(str(e))
    local = args.checkpoint.startswith((".", "/", "~")) or args.checkpoint.endswith(".gguf")
    if local and not os.path.exists(os.path.expanduser(args.checkpoint)):
        p.error(f"--checkpoint: {args.checkpoint!r} does not exist")


def build(args: argparse.Namespace):
    """(app, engine, bank) from parsed arguments."""
    try:
        model = loader.load_model(loader.ModelSpec(args.checkpoint, quantize=args.quantize, dtype=args.dtype,
                                                   scan_layers=args.scan_layers,
                                                   network_timeout=args.network_timeout))
    except (loader.ConfigError, loader.CheckpointUnavailableError, FileNotFoundError) as e:
        raise SystemExit(f"--checkpoint: {e}") from None
    hf_config = model.hf_config
    tokenizer = model.tokenizer
    if args.chat_template is not None:
        if tokenizer is None:
            raise SystemExit(f"--chat-template: {args.checkpoint!r} has no tokenizer to render it with")
        tokenizer.chat_template = chat.load_template(args.chat_template)
    stop = chat.stop_ids(tokenizer, hub.eos_token_ids(hf_config, model.path))
    print(f"stop token ids: {list(stop)}", file=sys.stderr)
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
    engine = Engine(model.module, bank, slots=args.slots, max_length=max_length, tokenizer=tokenizer,
                    eos_ids=stop)
    app = create_app(engine, bank, default_max_tokens=args.max_tokens, api_key=args.api_key,
                     adapter_root=args.adapter_root, max_body_bytes=args.max_body_bytes,
                     max_prompt_chars=args.max_prompt_chars, max_prompts=args.max_prompts)
    return app, engine, bank


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        app, _, _ = build(args)
    except (OSError, ValueError, SystemExit) as e:  # an unreadable checkpoint or a refused adapter
        message = e.code if isinstance(e, SystemExit) else str(e)
        if not isinstance(message, str):            # a SystemExit with a status is passed on
            raise
        print(f"python -m vera_jax.serving: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)
    serve(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
