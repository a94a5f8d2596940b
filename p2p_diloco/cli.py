"""`p2p-diloco`: one command, one sub-command per role."""

from __future__ import annotations

import logging
import os
import sys

import click

from .config import ConfigError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Decentralized training with Streaming DiLoCo: simulate it, or run peers."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--workers", default=4, show_default=True, help="Simulated workers M.")
@click.option("--steps", default=3000, show_default=True, help="Inner steps per worker (the token budget).")
@click.option("--methods", default=None, help="Comma-separated methods [default: data_parallel,diloco,"
              "streaming_diloco,streaming_diloco_ef]; also streaming_diloco_fp32.")
@click.option("--model", default="small", show_default=True, help="Model preset: tiny, small (0.2M), base (0.8M), large (4.8M).")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per worker per inner step.")
@click.option("--outer-period", "-H", default=None, type=int, help="H, inner steps between syncs of a fragment [default: 60].")
@click.option("--fragments", default=None, type=int, help="P, block fragments for streaming methods [default: 2].")
@click.option("--tau", default=None, type=int, help="Overlap delay in inner steps [default: 1].")
@click.option("--alpha", default=None, type=float, help="Merge weight of the local parameters [default: 0.5].")
@click.option("--outer-lr", default=None, type=float, help="Outer Nesterov learning rate [default: 0.7].")
@click.option("--outer-momentum", default=None, type=float, help="Outer Nesterov momentum [default: 0.9].")
@click.option("--warmup", "warmup_steps", default=None, type=int, help="Inner warmup steps [default: 100].")
@click.option("--inner-lr", default=None, help="Inner AdamW lr for every method [default: each method's best of "
              "the README sweep], or a comma list to sweep: each method runs with each value and reports its best.")
@click.option("--seed", default=0, show_default=True)
@click.option("--data", multiple=True, help="Text file or folder to train on instead of the stdlib sources.")
@click.option("--eval-every", default=100, show_default=True, help="Inner steps between eval points of the curve.")
@click.option("--jobs", default=None, type=int, help="Methods run in parallel [default: CPU cores].")
@click.option("--json", "json_path", default=None, help="Write the report as JSON here.")
@click.option("--plot", "plot_path", default=None, help="PNG of eval loss against tokens [default: next to --json].")
def simulate(workers, steps, methods, model, batch_size, outer_period, fragments, tau, alpha, outer_lr,
             outer_momentum, warmup_steps, inner_lr, seed, data, eval_every, jobs, json_path, plot_path):
    """Compare data-parallel, DiLoCo and Streaming DiLoCo in one process on the same token budget."""
    from . import simulate as sim

    method_list = [m.strip() for m in methods.split(",")] if methods else list(sim.DEFAULT_METHODS)
    base = dict(seed=seed)
    for name, value in [("outer_period", outer_period), ("fragments", fragments), ("tau", tau),
                        ("alpha", alpha), ("outer_lr", outer_lr), ("outer_momentum", outer_momentum),
                        ("warmup_steps", warmup_steps)]:
        if value is not None:
            base[name] = value
    settings = sim.SimSettings(workers=workers, steps=steps, batch_size=batch_size, model=model,
                               eval_every=eval_every, data=list(data), base={**sim.DEFAULT_BASE, **base},
                               inner_lr=dict(sim.DEFAULT_INNER_LR))
    if workers < 1 or steps < 1 or batch_size < 1 or eval_every < 1:
        raise click.UsageError("--workers, --steps, --batch-size and --eval-every must be >= 1")
    lrs = _floats(inner_lr) if inner_lr else []
    jobs = jobs or os.cpu_count() or 1
    try:
        if len(lrs) > 1:
            report = sim.sweep(method_list, settings, lrs, jobs)
        else:
            if lrs:
                settings.inner_lr = {m: lrs[0] for m in method_list}
            report = sim.simulate(method_list, settings, jobs)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except sim.SimulationFailed as e:
        raise click.ClickException(str(e)) from None
    click.echo()
    if "sweep" in report:
        click.echo(sim.sweep_table(report))
        click.echo()
    click.echo(sim.summary_table(report))
    if json_path:
        sim.write_json(report, json_path)
        click.echo(f"report: {json_path}")
        plot_path = plot_path or os.path.splitext(json_path)[0] + ".png"
    if plot_path:
        sim.plot(report, plot_path)
        click.echo(f"plot: {plot_path}")


if __name__ == "__main__":
    sys.exit(main())
