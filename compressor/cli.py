"""The ``compress`` command line.

    compress MODEL --method METHOD --data SPEC --out OUT.onnx [options]
    compress compare A.report.json B.report.json [...]
    compress report MODEL.onnx --data SPEC [--out PATH.report.json]
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from exporters import report as reporting

from .errors import CompressError
from .methods import FINETUNE_SCHEDULES, NEURON_CRITERIA
from .train import LR_SCHEDULES, TrainConfig

METHODS = ("lobster", "serene", "sensitivity", "magnitude", "none")


class _ModelFirstGroup(click.Group):
    """A group whose default command is ``run``: ``compress MODEL ...`` == ``compress run MODEL ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage("compress", "MODEL --method METHOD --data SPEC --out OUT.onnx [OPTIONS]\n"
                              "       compress COMMAND [ARGS]...")


@click.group(cls=_ModelFirstGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compress-toolchain", prog_name="compress")
def cli() -> None:
    """Prune a PyTorch model, make it small for real, export verified ONNX, and report its footprint.

    Run `compress run --help` (or `compress MODEL --help`) for the options of the main job.
    """


@cli.command("run")
@click.argument("model")
@click.option("--method", type=click.Choice(METHODS), default="lobster", show_default=True,
              help="Pruning method; `none` trains (if asked) and exports dense: the baseline.")
@click.option("--data", "data_spec", default="digits", show_default=True, metavar="SPEC",
              help="digits | mnist[:DIR] | fashion-mnist[:DIR] | cifar10[:DIR] | npz:FILE")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .onnx file.")
@click.option("--epochs", type=int, default=None,
              help="Training epochs. Default: 100 for pruning methods, 20 for `none` "
                   "(0 for `none` on an already trained checkpoint: export only).")
@click.option("--lr", type=float, default=None, help="SGD learning rate. Default: 0.1 for pruning methods, 0.05 for `none`.")
@click.option("--momentum", type=float, default=None, help="Default: 0 for pruning methods (as in the papers), 0.9 for `none`.")
@click.option("--nesterov", is_flag=True, help="Use Nesterov momentum.")
@click.option("--weight-decay", type=float, default=None, help="L2 weight decay. Default: 1e-4 for `magnitude` (Han et al.), else 0.")
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=None,
              help="plateau: ReduceLROnPlateau on validation loss (x0.1 after --lr-patience epochs), the default "
                   "for pruning methods; cosine: the default for `none`; constant.")
@click.option("--lr-patience", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for initialisation, data split and batch order.")
@click.option("--shift", type=click.IntRange(min=0), default=0, show_default=True,
              help="Augment training images with random translations of up to N pixels (edges replicated); 0: off.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Share of the training set held out for validation.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where checkpoints go (last.pt every epoch, best.pt). Default: OUT's name + .work/")
@click.option("--resume", is_flag=True, help="Continue from WORKDIR/last.pt.")
@click.option("--finetune-again", is_flag=True,
              help="Go back to WORKDIR/pruned.pt (kept when fine-tuning began) and fine-tune anew with the "
                   "--finetune-* options given now; the pruning is not repeated.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Report path. Default: OUT with .report.json (and .report.md, .report.html beside it).")
@click.option("--save-checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save the final model as a checkpoint that `compress` accepts as MODEL.")
@click.option("--baseline-report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A dense run's .report.json (same --data): its accuracy and file bytes are copied into this report.")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="Allow MODEL to be a whole pickled nn.Module. Unpickling can run arbitrary code: only for files you trust.")
@click.option("--lambda", "lmbda", type=float, default=1e-4, show_default=True,
              help="Regularizer strength: p <- p - lambda * p * max(0, 1 - S) every step (not scaled by --lr).")
@click.option("--pwe", type=int, default=5, show_default=True,
              help="Plateau waiting epochs: prune after this many epochs without a 1 % validation-loss improvement.")
@click.option("--twt", type=float, default=0.05, show_default=True,
              help="Threshold worsening tolerance: a prune may raise the validation loss by this factor.")
@click.option("--max-error-increase", type=float, default=None,
              help="Validation error may exceed the first plateau's by at most this much (0.005 = 0.5 points). "
                   "Default: 0.005, or two validation samples' worth on small validation sets.")
@click.option("--target-sparsity", type=float, default=None, help="Stop once this share of prunable parameters is zero (e.g. 0.98).")
@click.option("--exact-sensitivity", is_flag=True,
              help="sensitivity/serene: exact per-class output sensitivity (C backward passes) instead of the one-pass bound.")
@click.option("--anneals", type=int, default=None,
              help="When pruning stalls, divide the learning rate and lambda by 10 up to this many times before "
                   "stopping. Default: 2 for serene, 0 for the others.")
@click.option("--anneal-after", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --anneals: plateaus in a row that pruned nothing before each cut.")
@click.option("--stall-limit", type=click.IntRange(min=1), default=5, show_default=True,
              help="Stop after this many plateaus in a row that pruned nothing (after any --anneals).")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Once pruning stops (its own rule or the --epochs/time budget), train the selected model this many "
                   "more epochs at --finetune-lr with the pruned entries fixed at zero.")
@click.option("--finetune-lr", type=float, default=None,
              help="The fine-tuning learning rate [default: a tenth of --lr; not of the current rate, which anneals "
                   "may have made too small to train].")
@click.option("--finetune-momentum", type=float, default=None,
              help="The fine-tuning momentum [default: --momentum].")
@click.option("--finetune-schedule", type=click.Choice(list(FINETUNE_SCHEDULES)), default="plateau", show_default=True,
              help="The fine-tuning learning-rate schedule: the run's plateau schedule, restarted, or cosine from "
                   "--finetune-lr down to zero over the fine-tuning epochs.")
@click.option("--finetune-distill", type=float, default=0.0, show_default=True, metavar="WEIGHT",
              help="Knowledge distillation while fine-tuning: this share of the loss (0-1) makes the pruned model "
                   "match the softened outputs of MODEL as given (which must be trained); 0: labels only.")
@click.option("--finetune-temperature", type=float, default=4.0, show_default=True,
              help="With --finetune-distill or --prune-distill: the softmax temperature of the teacher's and the "
                   "model's outputs.")
@click.option("--prune-distill", type=float, default=0.0, show_default=True, metavar="WEIGHT",
              help="The same distillation while pruning: this share of the loss (0-1) goes to matching MODEL as "
                   "given (which must be trained); the regularizer then reads the blended loss's gradient.")
@click.option("--min-width", type=int, default=1, show_default=True, help="serene: neurons every layer keeps.")
@click.option("--neuron-criterion", type=click.Choice(list(NEURON_CRITERIA)), default="norm", show_default=True,
              help="serene: prune the neurons with the smallest parameter norm, the smallest sensitivity (favours "
                   "conv channels, which cost the most MACs), or both: a search by each at every plateau.")
@click.option("--rank-per-mac", is_flag=True,
              help="serene: rank neurons by criterion per multiply-accumulate their removal saves, so expensive conv "
                   "channels go before cheap neurons of the same importance (for FLOPs and latency targets).")
@click.option("--width-multiple", type=click.IntRange(min=1), default=1, show_default=True,
              help="serene: at every plateau also try to bring each layer's width down to a multiple of N (8 for AVX2, "
                   "16 for AVX-512), pruning its weakest neurons if validation allows, else shrinking them faster until "
                   "it does: blocked CPU kernels compute a width rounded up to the block, so the last few channels "
                   "above a multiple cost a whole block.")
@click.option("--rescale-sensitivity", is_flag=True,
              help="serene: shrink by sensitivity relative to the most sensitive live neuron of the layer, so the "
                   "regularizer tells neurons apart instead of shrinking all of them alike.")
@click.option("--keep-inputs", is_flag=True,
              help="serene: do not prune input features (by default, where the input goes straight into a Linear, "
                   "its features are units too and unused ones are skipped after physical removal).")
@click.option("--no-physical-removal", is_flag=True,
              help="Export the pruned model as it is, without removing dead neurons/channels.")
@click.option("--round-channels", type=click.IntRange(min=1), default=1, show_default=True,
              help="Physical removal keeps layer widths at multiples of N (8 for AVX2, 16 for AVX-512): CPU runtimes "
                   "run such widths faster, at the cost of a few zero channels.")
@click.option("--fuse-bn", is_flag=True, help="Fold BatchNorm into the preceding Conv/Linear before export.")
@click.option("--format", "encoding", type=click.Choice(["auto", "dense", "bitmask", "csr", "rel", "relb", "coo"]), default="auto",
              show_default=True,
              help="Storage of sparse weights in the ONNX file: auto picks the smallest per tensor, decode graph included; bitmask/csr/rel/relb are "
                   "decoded by standard ops that onnxruntime folds at load; coo is ONNX's own sparse tensor (for .ort/minimal builds).")
@click.option("--runtime-sparse", is_flag=True,
              help="Execute sparse Linear layers (>= 90 % zeros) sparsely in onnxruntime: less memory, faster at small batch.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def run_command(ctx: click.Context, model: str, method: str, data_spec: str, out: Path, epochs: int | None, lr: float, momentum: float,
                nesterov: bool, weight_decay: float, batch_size: int, lr_schedule: str, lr_patience: int, seed: int, shift: int,
                val_fraction: float, device: str, workdir: Path | None, resume: bool, finetune_again: bool, report_path: Path | None,
                save_checkpoint: Path | None, baseline_report: Path | None, allow_unsafe_pickle: bool, lmbda: float, pwe: int, twt: float,
                max_error_increase: float | None, target_sparsity: float | None, exact_sensitivity: bool,
                anneals: int | None, anneal_after: int, stall_limit: int, finetune_epochs: int, finetune_lr: float | None, finetune_momentum: float | None, finetune_schedule: str, finetune_distill: float, finetune_temperature: float, prune_distill: float, min_width: int, neuron_criterion: str, rank_per_mac: bool, width_multiple: int, rescale_sensitivity: bool, keep_inputs: bool, no_physical_removal: bool, round_channels: int, fuse_bn: bool,
                encoding: str, runtime_sparse: bool, opset: int, quiet: bool) -> None:
    """Train or prune MODEL (a zoo name or a checkpoint file), export OUT.onnx and its report."""
    if resume and finetune_again:
        raise click.UsageError("--resume continues a run, --finetune-again redoes its fine-tuning: choose one")
    from .methods import PruningConfig
    from .pipeline import Job, run  # heavy imports only when there is work to do

    recipe = default_recipe(method)
    pruning = PruningConfig(lmbda=lmbda, pwe=pwe, twt=twt, max_error_increase=max_error_increase,
                            target_sparsity=target_sparsity, exact=exact_sensitivity,
                            anneals=recipe.get("anneals", 0) if anneals is None else anneals,
                            anneal_after=anneal_after, stall_limit=stall_limit, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, finetune_momentum=finetune_momentum, finetune_schedule=finetune_schedule,
                            finetune_distill=finetune_distill, finetune_temperature=finetune_temperature, prune_distill=prune_distill, min_width=min_width, neuron_criterion=neuron_criterion, rank_per_mac=rank_per_mac,
                            width_multiple=width_multiple, rescale_sensitivity=rescale_sensitivity,
                            prune_inputs=not keep_inputs)
    config = TrainConfig(
        epochs=recipe["epochs"] if epochs is None else epochs,
        lr=recipe["lr"] if lr is None else lr,
        momentum=recipe["momentum"] if momentum is None else momentum,
        nesterov=nesterov,
        weight_decay=recipe["weight_decay"] if weight_decay is None else weight_decay,
        batch_size=batch_size,
        lr_schedule=recipe["lr_schedule"] if lr_schedule is None else lr_schedule,
        plateau_patience=lr_patience,
        seed=seed,
        shift=shift,
        device=device,
    )
    job = Job(model=model, out=out, method=method, data=data_spec, train=config, pruning=pruning, epochs_given=epochs is not None,
              val_fraction=val_fraction, workdir=workdir, resume=resume, finetune_again=finetune_again, report=report_path, baseline_report=baseline_report,
              save_checkpoint=save_checkpoint, allow_unsafe_pickle=allow_unsafe_pickle, opset=opset,
              physical_removal=not no_physical_removal, fuse_bn=fuse_bn, round_channels=round_channels, encoding=encoding, runtime_sparse=runtime_sparse,
              progress=not quiet and sys.stderr.isatty(), command=_command_line(ctx))
    run(job, log=lambda msg: click.echo(msg, err=True))


@cli.command("compare")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "md", "json"]), default="text", show_default=True)
def compare_command(reports: tuple[Path, ...], fmt: str) -> None:
    """Side-by-side table of REPORTS (.report.json files), with ratios against the first."""
    header, rows, data = reporting.compare_table(reports)
    click.echo(reporting.render_table(header, rows, fmt, data=data if fmt == "json" else None), nl=False)


@cli.command("report")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_spec", default="digits", show_default=True, metavar="SPEC",
              help="Whose test split to measure accuracy on: digits | mnist[:DIR] | fashion-mnist[:DIR] | cifar10[:DIR] | npz:FILE. "
                   "The model must take the data's normalized inputs [N, *shape] float32.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Report path. Default: MODEL with .report.json (and .report.md, .report.html).")
@click.option("--baseline-report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A dense run's .report.json (same --data): its accuracy and file bytes are copied into this report.")
@click.pass_context
def report_command(ctx: click.Context, model: Path, data_spec: str, out: Path | None, baseline_report: Path | None) -> None:
    """Measure any ONNX classifier MODEL (made by this tool or not): file, gzip and zstd bytes, parameters in
    the graph, MACs, session memory and latency in a fresh process, and test accuracy in onnxruntime."""
    from compressor.atomic import check_writable

    out = out or reporting.default_path(model)
    if not str(out).endswith(".json"):
        raise CompressError(f"--out must end in .json (the .md and .html go beside it), got {out}")
    if model.exists() and not model.is_file():
        raise CompressError(f"{model} is a directory, not an ONNX file")
    check_writable(out)
    rep = reporting.external_report(model, data_spec, command=_command_line(ctx), baseline_path=baseline_report)
    paths = reporting.write(rep, out)
    click.echo(f"wrote {', '.join(str(p) for p in paths)}", err=True)
    header, rows, _ = reporting.compare_table([out])
    click.echo(reporting.render_table(header, rows), nl=False)


def default_recipe(method: str) -> dict[str, float | int | str]:
    """Training defaults per method: a fast dense recipe, and the papers' pruning recipe."""
    if method == "none":
        return {"epochs": 20, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "lr_schedule": "cosine"}
    # Annealing on stall helped serene on LeNet-300 (9.97x fewer MACs at 1.78 % instead of 7.5x at
    # 1.94 %) and hurt lobster (36x instead of 60x): docs/results.md.
    return {"epochs": 100, "lr": 0.1, "momentum": 0.0, "weight_decay": 1e-4 if method == "magnitude" else 0.0,
            "lr_schedule": "plateau", "anneals": 2 if method == "serene" else 0}


def _command_line(ctx: click.Context) -> str:
    argv = (ctx.find_root().obj or {}).get("argv", sys.argv[1:])
    return shlex.join(["compress", *argv])


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=argv, prog_name="compress", standalone_mode=False, obj={"argv": argv})
    except CompressError as exc:
        click.echo(f"compress: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("compress: interrupted; rerun with --resume to continue from the last checkpoint", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("compress: interrupted; rerun with --resume to continue from the last checkpoint", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
