"""``moca`` command line.

    moca train                                  # the embedded default (recipe tiny): both stages, the evaluation
    moca train --stage cpt --model PATH --data DOCS --out DIR [key=value ...]   # recipe moca: the paper's settings
    moca train ... --print-config               # the settings a command would run with, as JSON; runs nothing
    moca train --stage cl --init CPT_RUN --data PAIRS --out DIR   # stage 2 from a stage-1 run
    moca train --config run.toml [key=value ...]                  # settings from a TOML file
    moca train --resume DIR                     # continue DIR from its newest sound checkpoint
    moca ablate [--out DIR] [--seeds N] [--data DOCS pairs=PAIRS evaluation=EVAL] [key=value ...]
                                                # cl, cl-causal, mlm+cl, mae+cl, cpt+cl over seeds -> ablation.json
    moca eval --model DIR --data PATH [--out DIR] [--query-prompt TEXT] [--document-prompt TEXT]
                                                # MMEB-style / retrieval scores -> eval.json
    moca encode --model DIR --input IN.jsonl --output OUT.npy [--prompt TEXT | --prompt-name query|document]
    moca encode --model DIR --export DIR [--query-prompt TEXT] [--document-prompt TEXT]
                                                # for transformers, sentence-transformers, MTEB (docs/export.md)
    moca data convert INPUT... --output OUT.jsonl [--image-root DIR]   # MMEB / BEIR (ViDoRe) files -> moca's

Every command takes --quiet (warnings and errors only) or --verbose (debug messages too).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shlex
import sys
from types import SimpleNamespace

from .config import Config, describe, targets, toml_settings
from .data.convert import FORMATS, convert, refuse_unconverted
from .files import atomic_write, data_files, regular_or_absent
from .logs import LEVELS, bars_shown, console

log = logging.getLogger(__name__)

# torch, transformers and the model load on first use (inside the commands that need them), so
# that --help and --print-config answer in a moment.


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"settings are key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def _verbosity() -> argparse.ArgumentParser:
    """The options every command takes (``parents=`` of each command's parser): how much it says."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only: no progress lines or "
                       "bars")
    group.add_argument("--verbose", "-v", action="store_true", help="debug messages too (each metrics.jsonl row as "
                       "it is written, each checkpoint as it is saved)")
    return common


def _level(args) -> int:
    """The level of the ``moca`` logger for a command: ``--quiet``'s or ``--verbose``'s, else INFO;
    under torchrun, ranks other than 0 say warnings and errors only unless ``--verbose``."""
    if args.verbose:
        return LEVELS["verbose"]
    if args.quiet or int(os.environ.get("RANK", "0")) != 0:
        return LEVELS["quiet"]
    return LEVELS["default"]


def _train_parser(commands, common) -> argparse.ArgumentParser:
    t = commands.add_parser("train", help="train stage 1 (cpt), stage 2 (cl), or both", parents=[common],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="settings (key=value, or section.key=value; a bare name shared by cpt and cl "
                                   "sets both):\n" + describe())
    t.add_argument("--config", metavar="FILE", help="settings from a TOML file ([run], [data], [model], [cpt], [cl], "
                   "[parallel] tables); key=value settings override it")
    t.add_argument("--stage", choices=["cpt", "cl", "both"],
                   help="cpt: MLM + MAE continual pre-training; cl: contrastive fine-tuning on pairs; both "
                   "(default): cpt, then cl from it (pairs=PAIRS), then the evaluation (evaluation=PATH)")
    t.add_argument("--init", metavar="DIR", help="stage 2: start from this stage-1 run's newest checkpoint")
    t.add_argument("--preset", help="model shape with random weights (default tiny)")
    t.add_argument("--model", help="a local Qwen2.5-VL checkpoint folder")
    t.add_argument("--data", help="stage-1 documents, or pairs with --stage cl: comma-separated sources, each a "
                   ".jsonl file, Parquet shards, a save_to_disk folder or a folder of them, optionally =N records "
                   "or =Wx (docs/training.md) (default: the embedded dataset)")
    t.add_argument("--out", help="run directory (default runs/moca-tiny)")
    t.add_argument("--max-steps", type=int, help="optimizer steps of every stage that runs")
    t.add_argument("--save-every", type=int)
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest sound checkpoint")
    t.add_argument("--force", action="store_true", help="resume even with settings that change the run's results")
    t.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    t.add_argument("--profile-steps", metavar="A:B", help="capture steps A..B for Nsight Systems "
                   "(nsys profile --capture-range=cudaProfilerApi)")
    t.add_argument("--recipe", help="the values the settings start from: tiny (default without --model) or moca "
                   "(the paper's; default with --model)")
    t.add_argument("--print-config", action="store_true", help="print the settings as JSON and exit (no model or "
                   "data is loaded)")
    t.add_argument("settings", nargs="*", metavar="key=value", help="any setting listed below, e.g. cpt.lr=1e-4")
    return t


def train_config(args) -> Config:
    """The run's settings: the resumed run's (its recipe and every value, from its config.json),
    or a recipe (``Config.resolve``) with the TOML file over it; then the options and ``key=value``
    settings. Settings of a stage that does not run are refused. A run stopped before it wrote its
    config.json (killed in its first seconds) has no checkpoint either: ``--resume`` starts it at
    step 0 from the settings given, as a new run would."""
    saved = bool(args.resume) and os.path.isfile(os.path.join(args.resume, "config.json"))
    if args.resume and not os.path.isdir(args.resume):
        raise ValueError(f"--resume {args.resume}: no such directory; start a new run with --out {args.resume}")
    if args.resume and not saved:
        from .checkpoint import checkpoints
        if checkpoints(args.resume):
            raise ValueError(f"--resume {args.resume}: checkpoints without the config.json that says how they were "
                             "made")
    if saved and (args.config or getattr(args, "recipe", None)):
        raise ValueError("--config or --recipe with --resume: a resumed run keeps its settings; change some with "
                         "key=value")
    base = Config.read(args.resume) if saved else None
    given = _overrides(args.settings)
    stage = args.stage or given.get("stage") or given.get("run.stage") or (base.run.stage if base else "both")
    named = {"run.recipe": getattr(args, "recipe", None), "run.stage": args.stage,
             "run.out": args.resume or args.out, "model.path": args.model,
             "model.preset": args.preset, "cl.init": args.init, "run.save_every": args.save_every,
             "run.profile_steps": args.profile_steps, "run.strict": True if args.strict else None,
             ("data.pairs" if stage == "cl" else "data.documents"): args.data}
    if args.max_steps is not None:
        named.update({f"{s}.max_steps": args.max_steps for s in (("cpt", "cl") if stage == "both" else (stage,))})
    given = {**{k: v for k, v in named.items() if v is not None}, **given}
    if stage != "both":
        other = "cl" if stage == "cpt" else "cpt"
        unused = [k for k in given if {section for section, _ in targets(k)} == {other}]
        if unused:
            raise ValueError(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} stage {other}, which "
                             f"--stage {stage} does not run")
    config = (base.update(given) if base else
              Config.resolve({**(toml_settings(args.config) if args.config else {}), **given})).validate()
    if stage == "both" and config.data.documents and not config.data.pairs:
        raise ValueError("--stage both with --data (stage-1 documents) needs pairs=PAIRS for stage 2; or run one "
                         "stage with --stage cpt / --stage cl")
    return config


def parse(argv=None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The command line's arguments (``key=value`` settings of ``train`` in ``settings``) and its parser."""
    parser = argparse.ArgumentParser(prog="moca", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = _verbosity()
    _train_parser(commands, common)
    a = commands.add_parser("ablate", parents=[common], help="the paper's ablation: stage 2 alone (bidirectional or "
                            "causal) against stage 1 (MLM, MAE, both) then stage 2, over seeds, on the held-out "
                            "evaluation; on the tiny preset every row starts from a causal base trained first "
                            "(out/base)")
    a.add_argument("--out", default="runs/ablation", help="where the runs, ablation.json, ablation.md and "
                   "ablation.png go (default runs/ablation)")
    a.add_argument("--seeds", type=int, default=5, help="seeds per row (default 5); a row's lead over stage 2 "
                   "alone counts when it exceeds the spread across them")
    a.add_argument("--data", help="stage-1 documents (with pairs=PAIRS and evaluation=EVAL; default: the embedded "
                   "dataset and its held-out split)")
    a.add_argument("--rows", help="comma-separated subset of the rows: cl,cl-causal,mlm+cl,mae+cl,cpt+cl")
    a.add_argument("settings", nargs="*", metavar="key=value", help="settings for every row, as for moca train")
    e = commands.add_parser("eval", parents=[common], help="score a trained model on MMEB-style or retrieval files")
    e.add_argument("--model", required=True, help="a run directory (of both stages: its last) or an exported model "
                   "folder")
    e.add_argument("--data", required=True, nargs="+", help="evaluation .jsonl files or folders of them")
    e.add_argument("--out", help="where eval.json goes (default: the model's folder)")
    e.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    e.add_argument("--query-prompt", help="an instruction put before each query's text (default: the model's "
                   "own query prompt; \"\" for none)")
    e.add_argument("--document-prompt", help="an instruction put before each candidate's text (default: the "
                   "model's own document prompt: none for the tiny recipe, MoCa's for the moca recipe, "
                   "\"Represent the given document image.\" and a new line; \"\" for none)")
    n = commands.add_parser("encode", parents=[common], help="embed inputs (texts, images, both) into a .npy file")
    n.add_argument("--model", required=True, help="a run directory (of both stages: its last) or an exported model "
                   "folder")
    n.add_argument("--input", help="a .jsonl file, one side a line: {\"text\": ...} and/or {\"image\": path}")
    n.add_argument("--output", help="the .npy file to write (float32, one normalized row per input line; a line "
                   "that cannot be embedded gets a row of NaN, named on stderr)")
    n.add_argument("--strict", action="store_true", help="stop at the first bad input line, writing nothing")
    prompt = n.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="an instruction put before each input's text (after its image when the "
                        "image comes first), e.g. \"Find an image that matches the caption: \"")
    prompt.add_argument("--prompt-name", help="the model's own prompt of this name: query or document (the moca "
                        "recipe's document prompt: \"Represent the given document image.\")")
    n.add_argument("--export", metavar="DIR", help="also write the model to DIR in the form transformers, "
                   "sentence-transformers and MTEB load (docs/export.md)")
    n.add_argument("--query-prompt", help="the export's query prompt (default: the model's; MoCa's is none)")
    n.add_argument("--document-prompt", help="the export's document prompt (default: the model's; MoCa's is "
                   "\"Represent the given document image.\" and a new line)")
    _data_parser(commands, common)
    # key=value settings may stand anywhere among the options, not only in one run at the end
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if args.command not in ("train", "ablate") or r.startswith("-") or "=" not in r]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command in ("train", "ablate"):
        args.settings += rest
    return args, parser


def _data_parser(commands, common) -> None:
    data = commands.add_parser("data", help="data tools: convert published benchmark files into moca's formats")
    c = data.add_subparsers(dest="data_command", required=True).add_parser(
        "convert", parents=[common], help="MMEB evaluation rows -> evaluation records, MMEB training rows -> pairs, a "
        "BEIR-style retrieval set (ViDoRe) -> retrieval records with graded relevance")
    c.add_argument("inputs", nargs="+", help="MMEB .parquet/.jsonl files or folders of them (a file's task: its "
                   "subset folder, or its name), or BEIR folders (corpus, queries, qrels)")
    c.add_argument("--output", "-o", required=True, help="the .jsonl file to write; embedded images go to "
                   "<its stem>_images/")
    c.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="the inputs' layout (default: "
                   "told by their fields)")
    c.add_argument("--image-root", help="what image paths are relative to (MMEB: the unzipped images folder; "
                   "default: each file's folder)")
    c.add_argument("--task", help="the task name of every record (default: from each file or folder)")
    c.add_argument("--split", default="test", help="BEIR: the split of the files to read (default test)")
    c.add_argument("--query-prompt", default="", help="BEIR: text put before each query (its instruction)")
    c.add_argument("--document-prompt", default="", help="BEIR: text put with each document")
    c.add_argument("--language", help="BEIR: keep only the queries of this language (multilingual ViDoRe sets)")
    c.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")


def _convert(args, parser) -> int:
    done = convert(args.inputs, args.output, args.format, args.image_root, args.task, args.split,
                   args.query_prompt, args.document_prompt, args.language, args.strict)
    done.bad.report(logging.WARNING)
    tasks = ", ".join(f"{task} {count}" for task, count in sorted(done.tasks.items()))
    kind = "pairs" if done.format == "mmeb-train" else "evaluation records"
    log.info(f"{done.records} {kind} ({done.format}; {tasks}) -> {done.output}")
    if done.images_written:
        log.info(f"{done.images_written} embedded images written beside it")
    if done.unjudged:
        log.info(f"{done.unjudged} queries without a relevant document left out")
    if done.stray_image_tokens:
        log.info(f"{done.stray_image_tokens} image tokens naming an image their row lacks dropped (their text kept)")
    return 0


# What a user's files, settings or machine can cause: one line and exit code 2 (RuntimeError: a
# run directory in use, a rank that stopped answering, a card out of memory). Anything else, and
# the RuntimeErrors that only a bug raises, keeps its traceback; MOCA_DEBUG=1 shows it for all.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)
BUGS = (NotImplementedError, RecursionError)


def main(argv=None) -> int:
    """Run one ``moca`` command: the one place where its errors become a line on stderr, and
    where moca's messages are printed (``moca.logs.console``: info on stdout, warnings and errors
    on stderr, at the level of ``--quiet`` / ``--verbose``)."""
    args, parser = parse(argv)
    command = {"data": _convert, "ablate": _ablate, "eval": _eval, "encode": _encode, "train": _train}[args.command]
    name = "data convert" if args.command == "data" else args.command
    with console(_level(args)):
        try:
            return command(args, parser)
        except USER_ERRORS as exc:  # DataError (strict) is a ValueError
            if os.environ.get("MOCA_DEBUG") == "1" or isinstance(exc, BUGS):
                raise
            log.error(f"moca {name}: {one_line(exc)}")
            return 2
        finally:
            if "moca.parallel" in sys.modules:  # where a process group can have been set up
                sys.modules["moca.parallel"].leave()


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (a library's message may span several)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _train(args, parser) -> int:
    config = train_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    from .train import Preempted, train
    if config.data.evaluation:  # refused before training, not after it (documents and pairs read many layouts)
        refuse_unconverted(config.data.evaluation, "moca train's evaluation")
    if int(os.environ.get("RANK", "0")) == 0:
        changed = config.recipe_differences()
        log.info(f"recipe {config.run.recipe}" + (f"; settings that differ from it: {'; '.join(changed)}" if changed
                                                  else ", unchanged"))
    try:
        final = train(config, resume=bool(args.resume), force=args.force)
    except Preempted as exc:
        log.error(f"moca train: {exc}")
        return Preempted.EXIT_CODE
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 prints the summary
        return 0
    both = config.run.stage == "both"
    _summary(final["cpt"] if both else final, "stage 1: " if both else "")
    if both:
        _summary(final["cl"], "stage 2: ")
        _scores(final.get("eval", {}), "evaluation, ")
        log.info(f"run directory: {config.run.out} (loss.png: both stages and the evaluation; cpt/ and cl/: "
                 "config.json, metrics.jsonl, checkpoints/, loss.png; cl/eval.json)")
    else:
        log.info(f"done: {json.dumps(final)}\nrun directory: {config.run.out} (config.json, metrics.jsonl, "
                 "checkpoints/, loss.png)")
    log.info("\n".join(next_commands(config)))
    return 0


def next_commands(config: Config) -> list[str]:
    """The ``moca eval`` and ``moca encode`` command lines that use the model a run just trained
    (of both stages: the last stage's, which ``--model`` takes from the run directory)."""
    d, out = config.data, shlex.quote(config.run.out)
    if d.evaluation:
        evaluation = shlex.quote(d.evaluation)
    elif config.run.stage == "both" and d.documents is None and d.pairs is None:  # the embedded held-out split
        evaluation = shlex.quote(os.path.join(config.run.out, "eval-data"))
    else:
        evaluation = "EVAL.jsonl"
    return [f"evaluate it: moca eval --model {out} --data {evaluation}",
            f"embed with it: moca encode --model {out} --input INPUTS.jsonl --output vectors.npy   (INPUTS.jsonl: "
            '{"text": ...} and/or {"image": path}, one a line)']


def _ablate(args, parser) -> int:
    from .ablate import ablate, table
    from .train import Preempted
    given = _overrides(args.settings)
    if args.data:
        given["data.documents"] = args.data
    try:
        result = ablate(Config.resolve(given).validate(), args.out, args.seeds,
                        args.rows.split(",") if args.rows else None)
    except Preempted as exc:  # the row's run: moca ablate with the same arguments continues every row
        log.error(f"moca ablate: {exc}")
        return Preempted.EXIT_CODE
    log.info(table(result))
    log.info(f"ablation.json, ablation.md, ablation.png: {args.out}")
    return 0


def _summary(final: dict, prefix: str) -> None:
    def chance(key, digits):
        return f" (chance {final[key]:.{digits}f})" if key in final else ""
    if final.get("mlm_accuracy") is not None:
        log.info(f"{prefix}MLM accuracy {final['mlm_accuracy']:.3f} on the last logged step"
                 f"{chance('mlm_chance', 4)}; MLM loss {final['mlm_loss']:.3f}, MAE loss {final['mae_loss']:.3f} "
                 "(means since the line before)")
    if final.get("accuracy") is not None:
        log.info(f"{prefix}in-batch accuracy {final['accuracy']:.3f}{chance('accuracy_chance', 3)}, loss "
                 f"{final['loss']:.3f} (means over the last logged steps); temperature {final['temperature']:.4f}")


def _scores(result: dict, prefix: str = "") -> None:
    """Each task's main metric of an evaluation (``moca.eval.evaluate``) over its own candidates,
    and Recall@1, Recall@10 and nDCG@10 over the task's whole pool, each beside its chance level."""
    from .eval import POOL
    for task, scores in result.get("tasks", {}).items():
        main = "precision_at_1" if "precision_at_1" in scores else "ndcg_at_5"
        log.info(f"{prefix}{task}: {main} {scores[main]:.3f} (chance {scores['chance']:.3f}, {scores['n']} "
                 "queries, each over its own candidates)")
        if "pool_size" in scores:
            pooled = ", ".join(f"{name[5:]} {scores[name]:.3f} (chance {scores['chance_' + name]:.3f})"
                               for name in POOL)
            log.info(f"{prefix}{task}: {pooled}, each query over {scores['pool_size']:g} candidates (the task's pool)")
    for meta, scores in result.get("meta_tasks", {}).items():
        log.info(f"{prefix}MMEB {meta}: precision_at_1 {scores['precision_at_1']:.3f} (chance "
                 f"{scores['chance']:.3f}, mean of {len(scores['tasks'])} tasks)")


def _load_encoder(path: str):
    """``Encoder.from_pretrained(path)``, saying in a warning which stage of a run of both stages it took."""
    from .encoder import Encoder, model_folder
    folder, note = model_folder(path)
    if note:
        log.warning(f"model: {note}")
    return Encoder.from_pretrained(folder)


def _eval(args, parser) -> int:
    from .eval import evaluate
    for path in args.data:
        refuse_unconverted(path, "moca eval")
    files = [f for path in args.data for f in data_files(path)]
    encoder = _load_encoder(args.model)
    out = args.out or encoder.folder
    target = os.path.join(out, "eval.json")
    os.makedirs(out, exist_ok=True)  # refused before the evaluation, not after it
    regular_or_absent(target)
    if not os.access(out, os.W_OK):
        raise ValueError(f"{out} is not writable, so eval.json cannot go there: give --out DIR")
    prompts = {role: given if given is not None else encoder.prompts.get(role, "")
               for role, given in (("query", args.query_prompt), ("document", args.document_prompt))}
    result = evaluate(encoder, files, strict=args.strict, query_prompt=prompts["query"],
                      document_prompt=prompts["document"], show_progress_bar=bars_shown())
    _scores(result)  # before the write: a failing disk loses no score
    atomic_write(target, json.dumps(result, indent=1).encode())
    log.info(f"eval.json: {target}")
    return 0


def _encode(args, parser) -> int:
    if not args.export and not (args.input and args.output):
        parser.error("encode needs --input and --output (or --export DIR)")
    import numpy as np

    from .eval import embed_file
    output = None
    if args.input:  # refused before the work, not after it
        output = args.output if args.output.endswith(".npy") else args.output + ".npy"  # as np.save names it
        regular_or_absent(output)
    encoder = _load_encoder(args.model)
    prompt = encoder.prompt_text(args.prompt, args.prompt_name)
    if args.export:
        prompts = dict(encoder.prompts)
        for name, value in (("query", args.query_prompt), ("document", args.document_prompt)):
            if value is not None:
                prompts[name] = value
        encoder.save_pretrained(args.export, prompts=prompts)
        log.info(f"exported to {args.export}")
    if args.input:
        prompted = SimpleNamespace(encode=lambda inputs, **options: encoder.encode(inputs, prompt=prompt, **options))
        vectors = embed_file(prompted, args.input, args.strict, show_progress_bar=bars_shown())
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write(output, buffer.getvalue())
        log.info(f"{vectors.shape[0]} embeddings of {vectors.shape[1]} values -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
