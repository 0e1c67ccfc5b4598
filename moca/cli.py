"""``moca`` command line.

    moca train                                  # the embedded default: tiny model, generated data, CPU
    moca train --stage cpt --model PATH --data PATH --out DIR [--max-steps N] [key=value ...]
    moca train --stage cl --init CPT_RUN --data PAIRS --out DIR  # stage 2 from a stage-1 run
    moca train --resume DIR                     # continue DIR from its latest checkpoint
"""
from __future__ import annotations

import argparse
import json
import sys

from .train import TrainConfig, saved_config, train


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"settings are key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moca", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train stage 1 (cpt) or stage 2 (cl)")
    t.add_argument("--stage", default="cpt", choices=["cpt", "cl"],
                   help="cpt: MLM + MAE continual pre-training; cl: contrastive fine-tuning on pairs")
    t.add_argument("--init", metavar="DIR", help="stage 2: start from this stage-1 run's latest checkpoint")
    t.add_argument("--preset", help="model preset with random weights (default tiny)")
    t.add_argument("--model", help="a local Qwen2.5-VL checkpoint folder")
    t.add_argument("--data", help="a .jsonl file or a folder of them: CPT documents, or pairs for --stage cl "
                   "(default: the embedded dataset)")
    t.add_argument("--out", help="run directory (default runs/moca-tiny)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    t.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    t.add_argument("--profile-steps", metavar="A:B", help="capture steps A..B for Nsight Systems "
                   "(nsys profile --capture-range=cudaProfilerApi)")
    t.add_argument("settings", nargs="*", metavar="key=value", help="any TrainConfig field, e.g. lr=1e-4")
    args = parser.parse_args(argv)
    try:
        given = {k: v for k, v in dict(stage=args.stage, preset=args.preset, model=args.model, data=args.data,
                                       out=args.out, max_steps=args.max_steps, save_every=args.save_every,
                                       profile_steps=args.profile_steps, init=args.init).items() if v is not None}
        if args.strict:
            given["strict"] = True
        given.update(_overrides(args.settings))
        if args.resume:
            given.pop("stage", None)
            config = saved_config(args.resume, given)
        else:
            config = TrainConfig().update(given)
        final = train(config, resume=bool(args.resume))
    except (ValueError, FloatingPointError) as exc:
        print(f"moca train: {exc}", file=sys.stderr)
        return 2
    if final.get("mlm_accuracy") is not None:
        print(f"MLM accuracy {final['mlm_accuracy']:.3f} on the last logged micro-batch "
              f"(chance {final['mlm_chance']:.4f}); MLM loss {final['mlm_loss']:.3f}, MAE loss {final['mae_loss']:.3f}")
    if final.get("accuracy") is not None:
        print(f"in-batch accuracy {final['accuracy']:.3f} on the last logged batch (chance "
              f"{final['accuracy_chance']:.3f}); loss {final['loss']:.3f}, temperature {final['temperature']:.4f}")
    print(f"done: {json.dumps(final)}\nrun directory: {config.out} (config.json, metrics.jsonl, checkpoints/, loss.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
