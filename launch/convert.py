"""Import Hugging Face checkpoints of Kimi K2.5 (KimiK25ForConditionalGeneration: LM, MoonViT,
projector) and of the DeepseekV3 architecture (Kimi K2, DeepSeek-V3 sizes: the LM) into our
checkpoint format, and export ours back (trainer/hf_checkpoint.py does the work).

    python -m launch.convert import --from hf HF_DIR --to CKPT_DIR [--vision-preset k25]
    python -m launch.convert export --from CKPT_DIR --to hf HF_DIR [--dtype bf16] [--lm-only]

A run then starts from the imported weights with `--init_from CKPT_DIR` (its model
config is the checkpoint's). Both directions stream one tensor at a time.
"""
from __future__ import annotations

import argparse
import sys

from model.config import PRESETS, ConfigError
from trainer.hf_checkpoint import DTYPES, export_hf, import_hf


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face checkpoint -> our checkpoint")
    imp.add_argument("--from", dest="src", nargs=2, metavar=("hf", "DIR"), required=True,
                     help="'hf' and the Hugging Face checkpoint directory (config.json, *.safetensors)")
    imp.add_argument("--to", dest="dst", required=True, help="the new checkpoint directory")
    imp.add_argument("--vision-preset", default="k25", choices=sorted(PRESETS),
                     help="DeepseekV3 (LM-only) checkpoints: the vision encoder sizes the run initialises "
                          "fresh (default k25: MoonViT)")
    imp.add_argument("--media-token-id", type=int, default=None,
                     help="the LM's media placeholder token (K2.5: its image_token_id; "
                          "Kimi K2's tokenizer reserves 163605)")
    imp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="store floating weights in this dtype (default: as stored; FP8 -> bf16)")
    exp = sub.add_parser("export", help="our checkpoint -> Hugging Face checkpoint")
    exp.add_argument("--from", dest="src", required=True, help="our checkpoint directory")
    exp.add_argument("--to", dest="dst", nargs=2, metavar=("hf", "DIR"), required=True,
                     help="'hf' and the new Hugging Face checkpoint directory")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="write floating weights in this dtype (default: as stored)")
    exp.add_argument("--shard-gib", type=float, default=5.0, help="largest safetensors file")
    exp.add_argument("--lm-only", action="store_true",
                     help="write the LM alone as DeepseekV3ForCausalLM (default: Kimi K2.5 with "
                          "the vision tower and projector when the checkpoint holds them)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fmt = args.src[0] if args.command == "import" else args.dst[0]
    try:
        if fmt != "hf":
            raise ConfigError(f"format {fmt!r}: only 'hf' (Hugging Face safetensors) is supported")
        if args.command == "import":
            import_hf(args.src[1], args.dst, args.vision_preset, args.media_token_id, args.dtype)
        else:
            export_hf(args.src, args.dst[1], args.dtype, int(args.shard_gib * (1 << 30)),
                      args.lm_only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
