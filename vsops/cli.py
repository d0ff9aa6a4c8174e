"""The ``vsops`` command: ``vsops demo``, ``vsops show``, ``vsops info``, ``vsops bench``, ``vsops eval`` and
``vsops train``."""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import torch

# glibc returns every freed buffer over 32 MiB to the kernel, so each fresh large output
# (dx, a weight gradient, a baseline's Q and K) costs one page fault per 4 KiB page: ~20 ms
# per 58 MB on small VMs, for PyTorch's own ops as much as ours. The benchmarks run with
# glibc told to keep freed memory, so that they time the kernels and not the VM's kernel.
BENCH_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def _method_name(name: str) -> str:
    from vsops.methods import method_class

    try:
        method_class(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def _method_list(text: str) -> list[str]:
    return [_method_name(name) for name in _name_list(text)]


def _fractions(text: str) -> list[float]:
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.1,0.2,0.3, got {text!r}") from None
    if not budgets:
        raise argparse.ArgumentTypeError(f"give at least one budget, got {text!r}")
    return budgets


def _budget_list(text: str) -> list[float]:
    budgets = _fractions(text)
    if any(not 0 < b < 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"each budget must be in (0, 1) (1.0 is always added), got {text!r}")
    return budgets


def _grid_budgets(text: str) -> list[float]:
    budgets = _fractions(text)
    if any(not 0 < b <= 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"each budget must be in (0, 1] (1.0: the unpatched model), got {text!r}")
    return budgets


def _budget(text: str) -> float:
    from vsops.budget import check_budget

    try:
        return check_budget(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _Tee:
    """A text stream writing to several."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _with_malloc_tunables(argv) -> None:
    """Runs this command again with glibc keeping freed memory (see BENCH_MALLOC_TUNABLES), once."""
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = BENCH_MALLOC_TUNABLES
        command = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, "-m", "vsops.cli", *command])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="which tokens each method keeps, the accuracy and prefill that survive: pictures and tables"
    )
    demo.add_argument("--output-dir", default="vsops-demo", help="where the pictures and reports go (default: vsops-demo)")
    demo.add_argument("--budgets", type=_budget_list, default=[0.1, 0.2, 0.3], metavar="B,B,...",
                      help="fractions of visual tokens kept (default: 0.1,0.2,0.3; 1.0 is added)")
    demo.add_argument("--retrain", action="store_true",
                      help="train the tiny backbone and scorer from scratch instead of loading the shipped ones")
    demo.add_argument("--boards", type=_positive_int, default=3, help="held-out boards drawn (default: 3)")
    demo.add_argument("--examples", type=_positive_int, default=1024,
                      help="held-out examples the accuracy is measured on (default: 1024)")
    demo.add_argument("--no-timing", action="store_true", help="skip the prefill and operator benchmarks")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    show = commands.add_parser("show", help="the tokens a model keeps of your image, over the image")
    show.add_argument("--model", required=True, help="a model directory of a supported family (with its tokenizer "
                      "and image processor), e.g. a published VisionSelector checkpoint")
    show.add_argument("--image", required=True, help="the image file")
    show.add_argument("--budget", type=_budget, default=0.2, help="fraction of visual tokens kept (default 0.2)")
    show.add_argument("--method", default="visionselector", type=_method_name, help="the selection method")
    show.add_argument("--out", default="show.png", help="the PNG written (default show.png)")
    show.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    commands.add_parser("info", help="versions, compiled and importable backends, backend per device")
    from vsops.benchmarks.prefill import MODELS as PREFILL_MODELS

    bench = commands.add_parser(
        "bench", help="benchmark summaries against the published methods and the bandwidth bound"
    )
    bench.add_argument(
        "--op", default="all", choices=["all", "difftopk", "lis", "varlen", "methods", "prefill", "vllm"],
        help="which table (a module of vsops.benchmarks; default: all)"
    )
    bench.add_argument(
        "--no-dense", action="store_true", help="lis: skip baseline (a), the N x N matrix (slow on CPU)"
    )
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    bench.add_argument(
        "--model", default="qwen2_5_vl", choices=list(PREFILL_MODELS),
        help="prefill: the model family of the end-to-end table (default: qwen2_5_vl)",
    )
    bench.add_argument("--plot", metavar="DIR", help="also write each table as a PNG into DIR")
    bench.add_argument("--from-json", metavar="FILE",
                       help="with --plot: plot a pytest-benchmark JSON file (--benchmark-json) instead of running")
    bench.add_argument(
        "--method", default="visionselector", type=_method_name,
        help="prefill: the selection method of the patched rows (default: visionselector; see vsops.methods)",
    )
    evaluation = commands.add_parser(
        "eval", help="a grid of task x method x budget through lmms-eval, resumable, with a summary"
    )
    evaluation.add_argument("--model", required=True, help="a model directory (a supported family, or a synthetic-task "
                            "model such as the demo's: vsops/demo/model)")
    evaluation.add_argument("--tasks", required=True, type=_name_list, metavar="T,T", help="lmms-eval task names")
    evaluation.add_argument("--methods", default=["visionselector"], type=_method_list, metavar="M,M",
                            help="selection methods (default: visionselector)")
    evaluation.add_argument("--budgets", default=[0.1, 0.2, 0.3, 1.0], type=_grid_budgets, metavar="B,B",
                            help="budgets (default: 0.1,0.2,0.3,1.0; 1.0 is the unpatched model)")
    evaluation.add_argument("--limit", type=_positive_int, help="samples per task (default: all)")
    evaluation.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generation (default: 8)")
    evaluation.add_argument("--scope", default="sample", choices=["sample", "image"], help="budget per sample or image")
    evaluation.add_argument("--output-dir", required=True, help="one directory per cell, and the summary")
    evaluation.add_argument("--min-pixels", type=_positive_int, help="the image processor's least pixels per image")
    evaluation.add_argument("--max-pixels", type=_positive_int, help="the image processor's most pixels per image")
    evaluation.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluation.add_argument("--dry-run", action="store_true",
                            help="check the tasks, methods and budgets and list the cells, loading no model")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bars")
    from vsops.training.run import add_arguments

    add_arguments(commands.add_parser("train", help="train a VisionSelector scorer (synthetic task or JSONL data)"))
    args = parser.parse_args(argv)

    if args.command in ("demo", "show"):
        import importlib.util

        missing = [m for m in ("transformers", "matplotlib", "PIL") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"vsops {args.command} needs {', '.join(missing)}: pip install --no-build-isolation -e \".[demo]\"",
                  file=sys.stderr)
            return 1
    if args.command == "eval":
        import importlib.util

        if importlib.util.find_spec("lmms_eval") is None:
            print("vsops eval needs lmms-eval: pip install --no-deps lmms-eval==0.7.3 && "
                  "pip install --no-build-isolation -e \".[eval]\"", file=sys.stderr)
            return 1
        from vsops.eval.grid import run_grid

        model_args = {"dtype": args.dtype, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
        try:
            done = run_grid(args.model, args.tasks, args.methods, args.budgets, args.output_dir, limit=args.limit,
                            batch_size=args.batch_size, scope=args.scope, progress=not args.no_progress,
                            model_args=model_args, dry_run=args.dry_run)
        except ValueError as error:
            parser.error(str(error))
        if args.dry_run:
            print("\n".join(cell.name for cell in done))
        else:
            print(Path(args.output_dir, "summary.md").read_text())
        return 0
    if args.command == "demo":
        if not args.no_timing:
            _with_malloc_tunables(argv)
        from vsops.demo import run_demo
        from vsops.demo.report import summary

        results = run_demo(args.output_dir, budgets=args.budgets, retrain=args.retrain, boards=args.boards,
                           examples=args.examples, timing=not args.no_timing, progress=not args.no_progress)
        summary(results, args.output_dir)
    elif args.command == "show":
        from vsops.demo.plots import save
        from vsops.demo.show import select_on_image, show_figure

        if not os.path.isdir(args.model):
            parser.error(f"--model: {args.model} is not a directory")
        if not os.path.isfile(args.image):
            parser.error(f"--image: {args.image} is not a file")
        try:
            shown = select_on_image(args.model, args.image, budget=args.budget, method=args.method,
                                    trust_remote_code=args.trust_remote_code)
        except ValueError as e:
            option = "--image" if "image" in str(e) else "--model"
            parser.error(f"{option}: {e}")
        save(show_figure(shown), args.out)
        print(f"{int(shown.keep.sum())} of {shown.keep.numel()} visual tokens kept ({args.method}, budget "
              f"{args.budget}); the picture is {os.path.abspath(args.out)}")
    elif args.command == "train":
        from vsops.training.run import run

        try:
            run(args)
        except ValueError as e:  # bad settings or data: a usage error, not a traceback
            parser.error(f"train: {e}")
    elif args.command == "info":
        from vsops.info import info

        info()
    else:
        if args.from_json is not None:
            if args.plot is None:
                parser.error("--from-json needs --plot DIR")
            from vsops.benchmarks.plot import plot_tables, pytest_benchmark_table

            try:
                table = pytest_benchmark_table(args.from_json)
            except (OSError, ValueError, KeyError) as e:
                parser.error(f"--from-json: {e}")
            for path in plot_tables([table], args.plot, "pytest-benchmark"):
                print(path)
            return 0
        if args.op in ("all", "prefill"):
            from vsops.benchmarks.prefill import transformers_available, unavailable_reason

            # Without transformers the prefill table says it is skipped; with it, a model the
            # installed version cannot build is the option's error.
            if transformers_available() and unavailable_reason(args.model):
                parser.error(f"--model {args.model}: {unavailable_reason(args.model)}")
        _with_malloc_tunables(argv)
        dtype = getattr(torch, args.dtype)
        from vsops import benchmarks

        printed = io.StringIO()
        out = _Tee(sys.stdout, printed)
        for op in benchmarks.OPS if args.op == "all" else (args.op,):
            benchmarks.module(op).cli_summary(args, dtype, by_name=args.op == op, file=out)
        if args.plot is not None:
            from vsops.benchmarks.plot import markdown_tables, plot_tables

            for path in plot_tables(markdown_tables(printed.getvalue()), args.plot, args.op):
                print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
