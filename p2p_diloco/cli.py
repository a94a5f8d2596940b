"""`p2p-diloco`: one command, one sub-command per role."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading

import click

from .core.config import AUTO_CODEC, CODEC_NAMES, ConfigError
from .flag_checks import (check_dataset_flags, check_device_flags, check_fragments, check_identity_file,
                          check_join_files, check_links, check_output_dir, check_output_file, check_run_id_flag, fail,
                          parse_initial_peers, probe_bootstrap)
from .node.admission import MAX_SEATS
from .node.profiles import profile_option


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def diloco_options(f):
    """The Streaming DiLoCo knobs shared by simulate, host and local-swarm."""
    for decorator in reversed([
        click.option("--outer-period", "-H", default=None, type=int,
                     help="H, inner steps between syncs of a fragment [default: 60]."),
        click.option("--fragments", default=None, type=int, help="P, block fragments [default: 4]."),
        click.option("--tau", default=None, type=int, help="Overlap delay in inner steps [default: 1]."),
        click.option("--alpha", default=None, type=float, help="Merge weight of the local parameters [default: 0.5]."),
        click.option("--overlap", default=None, type=click.Choice(["plain", "keep", "eager"]),
                     help="The steps trained while a round's mean is in flight (it lands d steps after the round "
                          "started): plain merges them as the paper does (a share 1 - alpha of them lost), keep "
                          "keeps them (measured best), eager first merges this peer's own outer step at once and "
                          "corrects it when the mean lands (README: Late results) [default: keep]."),
        click.option("--max-delay", default=None, type=int,
                     help="The lateness bound: wait for a round's mean at the latest this many inner steps after the "
                          "round started (tau..H - 1; smaller costs less loss and more waiting: README, Late "
                          "results) [default: H - 1, before the fragment's next round]."),
        click.option("--outer-lr", default=None, type=float, help="Outer Nesterov learning rate [default: 0.7]."),
        click.option("--outer-momentum", default=None, type=float, help="Outer Nesterov momentum [default: 0.9]."),
        click.option("--warmup", "warmup_steps", default=None, type=int, help="Inner warmup steps [default: 100]."),
        click.option("--inner-optimizer", default=None, type=click.Choice(["adamw", "muon"]),
                     help="muon: Muon for the transformer blocks' matrices, AdamW for the rest (MuLoCo) "
                          "[default: adamw]."),
        click.option("--error-feedback/--no-error-feedback", default=None,
                     help="Carry what the codec did not send of each fragment's outer gradient into its next round "
                          "[default: off]."),
        click.option("--ef-decay", default=None, type=float,
                     help="With --error-feedback: the carried residual is first multiplied by this, in (0, 1] "
                          "(SparseLoCo's beta; with --outer-momentum 0 it takes the momentum's place) "
                          "[default: 1]."),
        click.option("--sync-stride", default=None, type=int,
                     help="S: each round averages every S-th value of its fragment, in turn, so S rounds cover it "
                          "once; the rest trains on locally (S times fewer bytes; core/round_subset.py) "
                          "[default: 1, the whole fragment]."),
        click.option("--weighting", default=None, type=click.Choice(["tokens", "uniform", "per_token"]),
                     help="Weight of a member's outer gradient in the mean: the tokens it trained since its last "
                          "round, uniform, or per_token (tokens, its outer gradient scaled to a full period's "
                          "tokens first) (README: Unequal peers) [default: tokens]."),
        click.option("--aggregation", default=None,
                     type=click.Choice(["mean", "clip", "trimmed", "winsorized", "centered"]),
                     help="How a reducer combines the members' outer gradients: mean (weighted), clip (each first "
                          "scaled to at most 2x the median size), trimmed (per value, the highest and lowest fifth "
                          "left out), winsorized (clamped to the others' range) or centered (a centered clip "
                          "around the median); outliers over 16x the median size are refused and weights capped "
                          "at 4x the median in every case (README: Public runs) [default: mean]."),
        click.option("--audit", default=None, type=click.FloatRange(0, 1),
                     help="Chance that a member of a round recomputes each other reducer's part from the members' "
                          "own bytes before anyone applies it: a reducer returning a wrong mean is caught, the "
                          "round applied by no member, the reducer banned (README: Public runs) [default: 0]."),
    ]):
        f = decorator(f)
    return f


_DILOCO_KEYS = ("outer_period", "fragments", "tau", "alpha", "outer_lr", "outer_momentum", "warmup_steps",
                "inner_optimizer", "error_feedback", "ef_decay", "sync_stride", "aggregation", "audit",
                "overlap", "weighting", "max_delay")


def _pop_diloco(kwargs: dict) -> dict:
    """The DiLoCo values the user gave (None = keep the default)."""
    return {k: v for k in _DILOCO_KEYS if (v := kwargs.pop(k)) is not None}


HOST_PORT = 31337


def network_options(default_port: int, port_help: str):
    """Where a peer listens and what it tells others (host, join)."""
    def apply(f):
        for decorator in reversed([
            click.option("--port", default=default_port, show_default=True, type=click.IntRange(0, 65535),
                         help=f"TCP port to listen on, on every interface (IPv4, and IPv6 where present); {port_help}"),
            click.option("--host-maddrs", multiple=True, help="Listen on exactly these multiaddrs instead of --port "
                         "(e.g. /ip4/127.0.0.1/tcp/0: this machine only); what the daemon sees is announced."),
            click.option("--announce-maddrs", multiple=True, help="Tell other peers these addresses first: your "
                         "public address behind NAT or port forwarding, e.g. /ip4/203.0.113.5/tcp/31337."),
        ]):
            f = decorator(f)
        return f
    return apply


def _listen(port: int, host_maddrs: tuple, announce_maddrs: tuple) -> tuple[list[str], list[str]]:
    """(listen multiaddrs, announced multiaddrs) from --port / --host-maddrs / --announce-maddrs."""
    from .swarm.addresses import AddressError, check_maddrs, listen_and_announce, port_of

    try:
        announce = check_maddrs(list(announce_maddrs), "--announce-maddrs")
        for m in announce:
            if port_of(m) == 0:
                raise AddressError(f"--announce-maddrs {m!r}: name the real port others connect to, not 0")
        if host_maddrs:
            return check_maddrs(list(host_maddrs), "--host-maddrs"), announce
        return listen_and_announce(port, announce)
    except AddressError as e:
        raise click.UsageError(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages, and the full detail of an error.")
def main(verbose: bool) -> None:
    """Decentralized training with Streaming DiLoCo: simulate it, or run peers."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1), help="Simulated workers M.")
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(min=1),
              help="Inner steps per worker (the token budget).")
@click.option("--methods", default=None, help="Comma-separated methods [default: data_parallel,diloco,"
              "streaming_diloco,streaming_diloco_ef]; the others (fp32, 2-bit, 1-bit and sparse payloads, Muon) are "
              "listed in the README (Fewer bytes) and by an unknown name's error.")
@click.option("--model", default="small", show_default=True,
              help="Model preset: tiny, small (0.2M), base (0.8M), large (4.8M), llama-20m, llama-150m, llama-1b; "
                   "or a transformers Llama config .json (byte-level vocabulary).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
              help="Sequences per worker per inner step.")
@diloco_options
@click.option("--inner-lr", default=None, help="Inner AdamW lr for every method [default: each method's best of "
              "the README sweep], or a comma list to sweep: each method runs with each value and reports its best.")
@click.option("--seed", default=0, show_default=True)
@click.option("--data", multiple=True, type=click.Path(exists=True),
              help="Text file or folder to train on instead of the stdlib sources.")
@click.option("--eval-every", default=100, show_default=True, type=click.IntRange(min=1),
              help="Inner steps between eval points of the curve.")
@click.option("--jobs", default=None, type=click.IntRange(min=1), help="Methods run in parallel [default: CPU cores].")
@click.option("--delay", default=None, type=click.IntRange(min=0),
              help="Each round's mean is ready this many inner steps after the round started, as late results land "
                   "in a swarm (taken at tau at the earliest, waited for at H - 1 at the latest) [default: at once].")
@click.option("--speeds", default=None,
              help="Comma list, one per worker: inner steps per tick of the swarm's clock, in (0, 1] (e.g. "
                   "1,1,0.5,0.1); rounds and learning rates follow the clock, a slow worker's part weighs its tokens "
                   "[default: all 1].")
@click.option("--fail", "fail_chance", default=0.0, type=click.FloatRange(0, 1, max_open=True),
              help="Chance that a worker misses a round (its part never arrives; it catches up from the swarm's "
                   "state, as in a swarm) [default: 0].")
@click.option("--group", default=None, type=click.IntRange(min=1),
              help="Each round a group of this many workers, drawn per round; the others miss it and catch up "
                   "[default: all].")
@click.option("--away", default=0, type=click.IntRange(0, 9),
              help="The last worker misses this many rounds of every fragment in a row, every 10 rounds, and cannot "
                   "download the states of the rounds it missed [default: 0].")
@click.option("--stale-anchor", default=None, type=click.Choice(["average", "sit_out"]),
              help="A worker behind the swarm that cannot fetch its newer state: average with its own older anchor, "
                   "or sit the round out (measured: README, Stale anchors) [default: the core's rule].")
@click.option("--lr-by-speed", is_flag=True,
              help="Each worker's inner lr divided by its --speeds value (Rescaled ASGD, arXiv 2605.13434; measured: "
                   "README, Unequal peers).")
@click.option("--correction", default=None, type=click.Choice(["heloco"]),
              help="Correct each outer gradient against the outer momentum before it is averaged (HeLoCo, arXiv "
                   "2606.00271; measured: README, Unequal peers) [default: none].")
@click.option("--age-decay", default=0.0, type=click.FloatRange(min=0),
              help="A part averaged from a stale anchor a rounds old weighs exp(-RATE a) under a cosine cutoff "
                   "(CGAD, arXiv 2605.09126; measured: README, Stale anchors) [default: 0, off].")
@click.option("--replay", "replay_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A finished swarm's directory (a local-swarm --workdir): train its model on its peers' data orders "
                   "with its schedule (who trained when, who took part in which round, when each mean landed) and "
                   "report its eval loss beside the swarm's. Give --data if the swarm trained on it; --overlap and "
                   "--max-delay replay it as if the run had had them (what-ifs).")
@click.option("--json", "json_path", default=None, help="Write the report as JSON here.")
@click.option("--plot", "plot_path", default=None,
              help="PNG of eval loss against tokens [default: next to --json, else ./simulate.png].")
def simulate(workers, steps, methods, model, batch_size, inner_lr, seed, data, eval_every, jobs, delay, speeds,
             fail_chance, group, away, stale_anchor, lr_by_speed, correction, age_decay, replay_dir, json_path,
             plot_path, **diloco):
    """Compare data-parallel, DiLoCo and Streaming DiLoCo in one process on the same token budget."""
    from .task import simulate as sim
    from .task.model import model_spec

    if replay_dir:
        _replay(replay_dir, data, eval_every, stale_anchor, json_path, plot_path,
                {k: v for k in _REPLAY_WHAT_IF if (v := diloco.get(k)) is not None})
        return
    method_list = [m.strip() for m in methods.split(",")] if methods else list(sim.DEFAULT_METHODS)
    given = _pop_diloco(diloco)
    base = dict(seed=seed, **given)
    settings = sim.SimSettings(workers=workers, steps=steps, batch_size=batch_size, model=model,
                               eval_every=eval_every, data=list(data), base=base,
                               inner_lr=dict(sim.DEFAULT_INNER_LR), delay=delay,
                               speeds=_floats(speeds) if speeds else None, fail=fail_chance, group=group, away=away,
                               stale_anchor=stale_anchor, lr_by_speed=lr_by_speed, correction=correction,
                               age_decay=age_decay)
    if lr_by_speed and not speeds:
        raise fail(ConfigError("--lr-by-speed divides each worker's lr by its --speeds value: give --speeds"),
                   usage=True)
    lrs = _floats(inner_lr) if inner_lr else []
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        check_output_file(path, option)
    try:  # what would stop a method's process at its start, said before any starts
        try:
            settings.script()
        except ValueError as e:
            raise ConfigError(f"--speeds/--fail/--group/--away: {e}") from None
        layers = model_spec(model).layers
        for m in method_list:
            if m not in sim.METHODS:
                raise ConfigError(f"--methods: unknown method {m!r}; choose from {', '.join(sim.METHODS)}")
            config = settings.config_for(m)
            if sim.METHODS[m] is not None:  # data-parallel has no fragments
                check_fragments(config.fragments, "fragments" in given, model, layers)
    except ConfigError as e:
        raise fail(e, usage=True) from None
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
    plot_path = plot_path or "simulate.png"
    if plot_path:
        sim.plot(report, plot_path)
        click.echo(f"plot: {plot_path}")


_REPLAY_WHAT_IF = ("overlap", "max_delay")  # what a replay may change of the run's config, to see what it would do
_REPLAY_TAKES = ("workers", "steps", "methods", "model", "batch_size", "inner_lr", "seed", "delay", "speeds",
                 "fail_chance", "group", "away", "lr_by_speed", "correction", "age_decay",
                 *(k for k in _DILOCO_KEYS if k not in _REPLAY_WHAT_IF))


def _replay(replay_dir, data, eval_every, stale_anchor, json_path, plot_path, what_if: dict) -> None:
    from .task import simulate as sim
    from .task.data import Corpus
    from .task.model import PRESETS
    from .task.replay import check_data, comparison_table, read_run

    context = click.get_current_context()
    given = [p.opts[0] for p in context.command.params if p.name in _REPLAY_TAKES
             and context.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        raise fail(ConfigError(f"--replay takes the run's own schedule, model and config: drop {', '.join(given)}"),
                   usage=True)
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        check_output_file(path, option)
    try:
        recorded = read_run(os.path.abspath(replay_dir))
        check_data(recorded, Corpus.load(list(data) or None).description)
    except ConfigError as e:
        raise fail(e, usage=True) from None
    spec = recorded.run.model
    name = next((n for n, s in PRESETS.items() if s == spec), f"{spec.describe()} (the run's)")
    settings = sim.SimSettings(workers=len(recorded.peers), steps=recorded.steps, batch_size=recorded.run.batch_size,
                               model=name, eval_every=eval_every, data=list(data),
                               stale_anchor=stale_anchor, replay=recorded.path, base=what_if)
    try:
        settings.config_for("streaming_diloco")  # (a what-if the run's config cannot take: said before it starts)
    except ConfigError as e:
        raise fail(e, usage=True) from None
    try:
        report = sim.replay(settings)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except sim.SimulationFailed as e:
        raise click.ClickException(str(e)) from None
    click.echo()
    click.echo(comparison_table(report))
    if json_path:
        sim.write_json(report, json_path)
        click.echo(f"report: {json_path}")
        plot_path = plot_path or os.path.splitext(json_path)[0] + ".png"
    if plot_path:
        sim.plot(report, plot_path)
        click.echo(f"plot: {plot_path}")


def _run_config(run_id, model, batch_size, inner_lr, codec, seed, total_steps, round_timeout, target_group_size,
                matchmaking_time, data, diloco_values, batch_tokens=None, tokenizer_dir=None):
    from .core.config import DiLoCoConfig
    from .task.model import model_spec
    from .task.tokenizer import has_tokenizer
    from .node.records import RecordError, RunConfig, check_run_id

    try:
        check_run_id(run_id)
        values = dict(diloco_values, codec=codec, seed=seed, total_steps=total_steps)
        if inner_lr is not None:
            values["inner_lr"] = inner_lr
        config = DiLoCoConfig(**values)
        spec = model_spec(model)
        spec = _with_tokenizer(spec, tokenizer_dir or (model if has_tokenizer(model) else None))
    except (ConfigError, RecordError) as e:
        raise click.UsageError(str(e)) from None
    check_fragments(config.fragments, "fragments" in diloco_values, model, spec.layers)
    if batch_tokens is not None:
        context = click.get_current_context(silent=True)
        if context is not None and context.get_parameter_source("batch_size") not in (
                None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP):
            raise click.UsageError("--batch-tokens and --batch-size both set the batch: give one")
        batch_size = -(-batch_tokens // spec.seq_len)
    if batch_size < 1 or round_timeout <= 0 or (target_group_size is not None and target_group_size < 2):
        raise click.UsageError("--batch-size must be >= 1, --round-timeout > 0, --target-group-size >= 2")
    if not 2.0 <= matchmaking_time < round_timeout:
        raise click.UsageError(f"--matchmaking-time must be >= 2 s and below --round-timeout ({round_timeout})")
    from .task.model import built_with, init_sha256

    try:
        initial = init_sha256(spec, config.seed, model if spec.weights else None)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    return RunConfig(run_id, config, spec, batch_size, data or "Python standard library sources", float(round_timeout),
                     target_group_size, float(matchmaking_time), init_sha256=initial, built_with=built_with())


def _with_tokenizer(spec, directory):
    """`spec` naming the tokenizer of `directory` (None: byte-level); ConfigError when its ids do not fit the
    model's vocabulary."""
    from dataclasses import replace

    from .task.tokenizer import check_fits, load_tokenizer

    tokenizer = load_tokenizer(directory)
    check_fits(tokenizer, spec.vocab_size, f"--model ({spec.describe()})")
    return replace(spec, tokenizer=tokenizer.sha256)


def run_options(f):
    """What a run is: published by the host, built by local-swarm."""
    for decorator in reversed([
        click.option("--run-id", default="default", show_default=True, help="Names the run; namespaces DHT keys."),
        click.option("--model", default="small", show_default=True,
                     help="Model preset (tiny, small, base, large, llama-20m, llama-150m, llama-1b), a transformers "
                          "config .json file of any causal LM, or a local model directory (config.json, and weights "
                          "to start from: every trainer then needs its own copy, join --model DIR)."),
        click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(exists=True, file_okay=False),
                     help="A local HF tokenizer directory (trainers need a copy and a --dataset) [default: the "
                          "--model directory's tokenizer, if it has one, else byte-level]."),
        click.option("--batch-size", default=4, show_default=True, help="Sequences per peer per inner step."),
        click.option("--batch-tokens", default=None, type=click.IntRange(min=1),
                     help="Tokens per peer per inner step, instead of --batch-size: the batch is this many tokens "
                          "rounded up to whole sequences (trainers reach it with --micro-batch accumulation)."),
        click.option("--inner-lr", default=None, type=float, help="Inner AdamW lr [default: the README sweep's best]."),
        click.option("--codec", default="fp4", show_default=True,
                     type=click.Choice([*CODEC_NAMES, AUTO_CODEC]),
                     help="Payload format on the wire (README: Fewer bytes; top4: the 4 largest of every 256 "
                          "values, best with --error-feedback); auto: each round's group picks fp16, int8 or fp4 "
                          "from its members' declared uplinks (join --bandwidth) and pace (README: Deadlines)."),
        click.option("--seed", default=0, show_default=True, help="Initial parameters of the run."),
        click.option("--round-timeout", default=60.0, show_default=True,
                     help="Seconds a peer waits for a round's group and all-reduce."),
        click.option("--target-group-size", default=None, type=int,
                     help="Peers a group waits for before it starts at once [default: whoever comes in time]."),
        click.option("--matchmaking-time", default=3.0, show_default=True,
                     help="Seconds a round's group waits for more peers before it starts (when not full)."),
        diloco_options,
    ]):
        f = decorator(f)
    return f


def _reader_dht(initial_peers: tuple, run_id: str, token: str | None):
    """(a client-mode DHT node of the run, the run key its --token names or None), for commands that only read
    the run's records (`status`, `monitor`); a bad flag or an unreachable peer is a clear error."""
    from .node.admission import AdmissionError, Token
    from .swarm.dht import BootstrapError, DHTStartError, start_dht

    check_run_id_flag(run_id)
    try:
        run_key = Token.parse(token.strip()).run_key if token else None
    except AdmissionError as e:
        raise click.UsageError(f"--token: {e}") from None
    peers = parse_initial_peers(initial_peers)
    probe_bootstrap(peers)
    try:
        return start_dht(peers, client_mode=True), run_key
    except (BootstrapError, DHTStartError) as e:
        raise fail(e) from None


def _eval_data(dataset, text_field, tokenizer_dir):
    """What the dashboard evaluates the agreed parameters on: the run -> held-out batches (`agreed_eval`);
    a --eval-dataset that cannot be read is a usage error now."""
    import functools

    if dataset is None and (text_field or tokenizer_dir):
        raise click.UsageError("--eval-text-field and --eval-tokenizer go with --eval-dataset")
    if dataset is not None:
        check_dataset_flags((), dataset, text_field, False)
    from .swarm.agreed_eval import held_out_batches

    return functools.partial(held_out_batches, dataset=dataset, text_field=text_field, tokenizer_dir=tokenizer_dir)


def compute_options(f):
    """How a trainer computes its steps (its own choice; the run's batch and hyperparameters stay the run's)."""
    from .task.precisions import PRECISIONS  # (not from task.device: the CLI's definition must not import torch)

    for decorator in reversed([
        click.option("--device", default=None, help="Train on this device (cpu, cuda, cuda:1, ...) [default: CUDA "
                     "when present, else the CPU]."),
        click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS),
                     help="The forward pass's arithmetic: bf16 autocast, or fp32; auto: bf16 on a GPU that supports "
                          "it, else fp32. Parameters, optimizer state and what goes to the swarm stay fp32."),
        click.option("--micro-batch", default=None, type=click.IntRange(min=1),
                     help="Sequences per forward/backward pass; their gradients add up to the run's batch (gradient "
                          "accumulation: a small GPU follows a run whose batch does not fit) [default: the whole "
                          "batch at once]."),
        click.option("--compile", "compile_model", is_flag=True,
                     help="torch.compile the model (faster steps on a GPU after a compile of a minute or so)."),
    ]):
        f = decorator(f)
    return f


def dashboard_options(default: int | None, help_text: str):
    def wrap(f):
        f = click.option("--eval-tokenizer", default=None, type=click.Path(exists=True, file_okay=False),
                         help="The run's tokenizer, for --eval-dataset (a run that names one).")(f)
        f = click.option("--eval-text-field", default=None, help="The --eval-dataset's column of text.")(f)
        f = click.option("--eval-dataset", default=None, metavar="SOURCE",
                         help="The dataset the run trains on (as join --dataset): the dashboard evaluates on its "
                              "held-out rows [default: the stdlib sources' held-out files, byte-level].")(f)
        f = click.option("--eval-every", default=60.0, show_default=True, type=click.FloatRange(min=0),
                         help="Seconds between two evals of the swarm's agreed parameters on the dashboard (each "
                              "fragment's agreed state downloaded, checked against its hash, evaluated on held-out "
                              "data on this machine's CPU); 0: none.")(f)
        f = click.option("--dashboard-host", default="127.0.0.1", show_default=True,
                         help="The address the dashboard listens on (0.0.0.0: every interface, for a public page; "
                              "it shows what the DHT records tell anyone who reads them).")(f)
        return click.option("--dashboard", default=default, show_default=default is not None, metavar="PORT",
                            type=click.IntRange(0, 65535), help=help_text)(f)
    return wrap


@main.command()
@profile_option
@run_options
@click.option("--total-steps", default=3000, show_default=True, help="Length of the inner lr schedule.")
@click.option("--initial-peers", multiple=True, help="Join an existing DHT (several hosts may serve one run).")
@network_options(HOST_PORT, "peers of other machines connect here: open it in the firewall.")
@click.option("--identity", "identity_path", default=None, help="Key file: keeps the peer id (and address) "
              "across restarts; created if missing.")
@click.option("--run-key", "run_key_path", default=None, help="Make the run admission-only: this Ed25519 key file "
              "(created if missing; keep it secret) signs the run config and the join tokens that `p2p-diloco admit` "
              "issues [default: no key; the run admits anyone who reaches its DHT].")
@click.option("--run-config", "run_config_path", default=None, hidden=True, help="A msgpack RunConfig (local-swarm).")
@click.option("--maddrs-file", default=None, hidden=True, help="Write the visible addresses here (local-swarm).")
@dashboard_options(None, "Serve the run's live dashboard (a web page of its DHT records) on this port.")
def host(run_id, model, tokenizer_dir, batch_size, batch_tokens, inner_lr, codec, seed, round_timeout,
         target_group_size, matchmaking_time, total_steps,
         initial_peers, port, host_maddrs, announce_maddrs, identity_path, run_key_path, run_config_path, maddrs_file,
         dashboard, dashboard_host, eval_every, eval_dataset, eval_text_field, eval_tokenizer, **diloco):
    """Bootstrap DHT node for a run: publishes the run config and stays up until Ctrl-C."""
    from .node.records import RecordError, RunConfig
    from .swarm.dht import BootstrapError, DHTStartError
    from .swarm.host import run_host

    if run_config_path:
        try:
            with open(run_config_path, "rb") as f:
                run = RunConfig.decode(f.read())
        except (OSError, RecordError) as e:
            raise click.UsageError(f"--run-config {run_config_path}: {e}") from None
    else:
        run = _run_config(run_id, model, batch_size, inner_lr, codec, seed, total_steps, round_timeout,
                          target_group_size, matchmaking_time, None, _pop_diloco(diloco), batch_tokens, tokenizer_dir)
    signed = None
    if run_key_path is not None:
        from .node.admission import AdmissionError, RunKey, sign_run_config

        try:
            key, created = RunKey.load_or_create(run_key_path)
        except AdmissionError as e:
            raise click.UsageError(str(e)) from None
        if created:
            click.echo(f"created the run key {run_key_path}: keep it secret; it admits peers to this run", err=True)
        run = dataclasses.replace(run, run_key=key.public.hex())
        signed = sign_run_config(run.encode(), key)
    if identity_path is not None:
        check_identity_file(identity_path)
    peers = parse_initial_peers(initial_peers)
    listen, announce = _listen(port, host_maddrs, announce_maddrs)
    if peers:
        probe_bootstrap(peers)
    from .node.dashboard import DashboardError
    from .task.tokenizer import has_tokenizer

    if dashboard is None and (eval_dataset or eval_tokenizer or eval_text_field):
        raise click.UsageError("--eval-dataset, --eval-tokenizer and --eval-text-field go with --dashboard PORT")
    if eval_dataset and eval_tokenizer is None and run.model.tokenizer:  # the host has the run's tokenizer at hand
        eval_tokenizer = tokenizer_dir or (model if has_tokenizer(model) else None)
    eval_data = _eval_data(eval_dataset, eval_text_field, eval_tokenizer)
    try:
        run_host(run, peers, listen, announce, identity_path, maddrs_file, signed=signed,
                 run_key_path=run_key_path, dashboard=None if dashboard is None else (dashboard_host, dashboard),
                 eval_every=eval_every, eval_data=eval_data)
    except (BootstrapError, DHTStartError, DashboardError) as e:
        raise fail(e) from None


@main.command()
@profile_option
@click.option("--initial-peers", multiple=True, required=True, help="Multiaddr of any live peer of the run.")
@click.option("--run-id", default="default", show_default=True)
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Inner steps to train [default: until Ctrl-C].")
@click.option("--bandwidth", default=None, type=click.FloatRange(min=0, min_open=True),
              help="This machine's uplink in Mbit/s, told to every group: smaller parts to reduce on a slow "
                   "uplink, deadlines that allow for it, and what this peer sends paced to 97 % of it "
                   "(README: Deadlines, Pacing and chunk size).")
@click.option("--client-mode", is_flag=True, help="Never accept connections: send parts and receive means only "
              "[default: accept them, unless a dial-back from the host finds this peer unreachable].")
@network_options(0, "0: any free one. Others must be able to connect to it, or this peer runs in client mode.")
@click.option("--data", multiple=True, type=click.Path(exists=True),
              help="Text file or folder to train on instead of the stdlib sources.")
@click.option("--dataset", default=None, metavar="SOURCE",
              help="Train on a dataset read through HF `datasets`: a local JSONL / Parquet / text file or folder, or "
                   "a hub dataset name (streamed; needs the network). Each peer reads its own stretch of it; the "
                   "position goes into checkpoints (README: Data).")
@click.option("--text-field", default=None, help="The dataset's column of text [default: text, else content].")
@click.option("--streaming", is_flag=True, help="Read a local --dataset as a stream too (a hub one always is).")
@click.option("--summary", "summary_path", default=None, help="Write a JSON summary here at the end.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads [default: torch's choice].")
@click.option("--step-delay", default=0.0, type=click.FloatRange(min=0), show_default=True,
              help="Sleep this many seconds after every inner step: a deliberately slow peer, for tests.")
@click.option("--data-seed", default=None, type=click.IntRange(0, 2**32 - 1),
              help="Seed of the order this peer reads its data in (local-swarm gives each trainer its own, so "
                   "identical swarms read alike) [default: from the peer id: no two peers read alike].")
@click.option("--checkpoint-dir", default=None, help="Save this peer's state here (safetensors + metadata, "
              "atomically) every --checkpoint-every applied rounds and on exit.")
@click.option("--checkpoint-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Applied rounds (all fragments together) between two checkpoints.")
@click.option("--resume", default=None, help="Start from the checkpoint in this directory (and keep saving there); "
              "the swarm's newer state wins at each fragment's next round.")
@click.option("--progress-json", is_flag=True, hidden=True)
@click.option("--global-steps", default=None, type=click.IntRange(min=1),
              help="Stop once the run's global step reaches this, after one last round of every fragment "
              "(peers given the same value stop together).")
@click.option("--wait-for-peers", default=1, type=click.IntRange(min=1), hidden=True,
              help="Start once this many peers are present (local-swarm).")
@click.option("--token", default=None, envvar="P2P_DILOCO_TOKEN",
              help="Join token from the run's host (`p2p-diloco admit`), for an admission-only run "
                   "[env: P2P_DILOCO_TOKEN].")
@click.option("--identity", "identity_path", default=None, help="Key file: trains under its peer id (the one a "
              "token for one peer admits; `p2p-diloco identity FILE` prints it); created if missing "
              "[default: a new identity each start].")
@click.option("--run-dir", default=None, help="Write this peer's metrics here, one JSON line per progress report "
              "(metrics-PEER_ID.jsonl; `p2p-diloco plot DIR` draws them).")
@click.option("--tensorboard", "tensorboard_dir", default=None,
              help="Also log the metrics to TensorBoard under this directory (needs `pip install tensorboard`).")
@click.option("--wandb", "wandb_project", default=None,
              help="Also log the metrics to this Weights & Biases project (needs `pip install wandb`).")
@compute_options
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="This machine's copy of the run's model directory, for a run that starts from pretrained weights "
                   "(and its tokenizer, if it holds one); checked against the run's hash of them.")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="This machine's copy of the run's tokenizer directory (a run that names one).")
def join(initial_peers, run_id, steps, bandwidth, client_mode, port, host_maddrs, announce_maddrs, data, dataset,
         text_field, streaming, summary_path, threads,
         step_delay, data_seed, checkpoint_dir, checkpoint_every, resume, progress_json, global_steps,
         wait_for_peers, token, identity_path, run_dir, tensorboard_dir, wandb_project, device, precision,
         micro_batch, compile_model, model_dir, tokenizer_dir):
    """Train with a run: read its config from the DHT, average fragments with its peers."""
    from .node import attacks, failpoints

    try:
        armed = failpoints.armed()
        attack = attacks.armed()
    except (failpoints.FailpointError, attacks.AttackError) as e:
        raise click.UsageError(str(e)) from None
    if attack:
        click.echo(f"ATTACK armed ({attacks.ENV}): this peer is malicious on purpose: "
                   f"{attacks.KINDS[attack.kind]}", err=True)
    if armed:
        action = "fails" if armed[0] in failpoints.ERROR_POINTS else "SIGKILLs itself"
        click.echo(f"failpoint {armed[0]}:{armed[1]} armed: this peer {action} at hit {armed[1]} of "
                   f"{armed[0]} ({failpoints.POINTS[armed[0]]})", err=True)
    initial_peers = parse_initial_peers(initial_peers)  # (first: a plain typo is refused before torch is imported)
    check_run_id_flag(run_id)
    from .node.admission import AdmissionError, Token

    if token:
        try:
            parsed = Token.parse(token.strip())
        except AdmissionError as e:
            raise click.UsageError(f"--token: {e}") from None
        if parsed.run_id != run_id:
            raise click.UsageError(f"--token is for run {parsed.run_id!r}, not --run-id {run_id!r}")
    if identity_path is not None:
        check_identity_file(identity_path)
    listen, announce = _listen(port, host_maddrs, announce_maddrs)
    check_dataset_flags(data, dataset, text_field, streaming)
    check_join_files(run_id, data, summary_path, checkpoint_dir, resume)
    check_device_flags(device, precision)
    from .node.metrics import MetricsError, check_loggers

    try:
        check_loggers(tensorboard_dir, wandb_project)
    except MetricsError as e:
        raise click.UsageError(str(e)) from None
    if run_dir is not None:
        check_output_dir("--run-dir", run_dir)
    probe_bootstrap(initial_peers)

    from .core.averaging import AveragingFailed
    from .node.checkpoint import CheckpointError
    from .node.records import RecordError
    from .swarm.dht import BootstrapError, DHTStartError
    from .swarm.peer import JoinOptions, run_peer

    opts = JoinOptions(initial_peers, run_id, steps, bandwidth, client_mode, listen, announce, list(data),
                       summary_path, progress_json, global_steps is not None, threads, global_steps=global_steps,
                       wait_for_peers=wait_for_peers,
                       step_delay=step_delay, data_seed=data_seed, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=checkpoint_every,
                       resume=resume, token=(token or "").strip(), identity_path=identity_path, run_dir=run_dir,
                       tensorboard_dir=tensorboard_dir, wandb_project=wandb_project, dataset=dataset,
                       text_field=text_field, streaming=streaming, device=device, precision=precision,
                       micro_batch=micro_batch, compile=compile_model, model_dir=model_dir,
                       tokenizer_dir=tokenizer_dir)
    try:
        summary = run_peer(opts)
    except (RecordError, TimeoutError, ConfigError, AveragingFailed, CheckpointError, BootstrapError,
            DHTStartError, AdmissionError, MetricsError) as e:
        raise fail(e) from None
    click.echo(f"done: {summary['inner_steps']} inner steps to global step {summary['global_step']}, "
               f"eval loss {summary['eval_loss']:.4f}, sent {summary['wire_bytes_sent'] / 1e6:.2f} MB"
               + (" (client mode)" if summary["client_mode"] else ""), err=progress_json)
    click.echo(f"rounds per fragment: applied {_slashed(summary['rounds'])} "
               f"(downloaded {_slashed(summary['rounds_recovered'])}), failed {_slashed(summary['rounds_failed'])}",
               err=progress_json)
    if summary["problem"]:
        raise click.ClickException(summary["problem"])


def _slashed(values: list[int]) -> str:
    return "/".join(map(str, values))


@main.command("local-swarm")
@profile_option
@click.option("--peers", default=4, show_default=True, help="Trainer processes.")
@click.option("--steps", default=1200, show_default=True, help="The global step every trainer stops at.")
@run_options
@click.option("--data", multiple=True, type=click.Path(exists=True),
              help="Text file or folder to train on instead of the stdlib sources.")
@click.option("--dataset", default=None, metavar="SOURCE",
              help="Every trainer reads this dataset through HF `datasets` (see `join --dataset`).")
@click.option("--dashboard", default=None, metavar="PORT", type=click.IntRange(1, 65535),
              help="The host serves the run's live dashboard at http://127.0.0.1:PORT/.")
@click.option("--timeout", default=1800.0, show_default=True, help="Give up after this many seconds.")
@click.option("--json", "json_path", default=None, help="Write the summary as JSON here.")
@click.option("--workdir", default=None, help="Where the peers' logs and summaries go [default: a new temp dir].")
@click.option("--progress-every", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between plain progress lines when the output is not a terminal (else bars).")
@click.option("--slow-peer-delay", default=0.0, type=click.FloatRange(min=0), show_default=True,
              help="The last peer sleeps this many seconds after every inner step (peers of different speeds).")
@click.option("--late-peer-after", default=0.0, type=click.FloatRange(min=0), show_default=True,
              help="The last peer joins this many seconds after the others started (a mid-run join).")
@click.option("--attacker", default="", metavar="ATTACK",
              help="The last peer is malicious on purpose, to see what the others withstand: scale:F (its outer "
                   "gradients x F), flip (sign-flipped), weight:W (it claims W tokens), lie (as a reducer it "
                   "returns negated means; see --audit), unadmitted (with --admission: it takes part with a token "
                   "stolen from another peer) or flood (it floods the others' averagers with oversized messages, "
                   "streams and DHT pings) (README: Public runs).")
@click.option("--admission", is_flag=True, help="An admission-only run: a run key in the workdir, a key file and a "
              "join token for each trainer (README: Hosting a public run).")
@click.option("--links", "links_path", default=None,
              help="TOML file of emulated WAN links (e.g. peers/links-mixed.toml): each member on a machine of its "
                   "own (a network namespace) behind its upload/download rate, delay and loss. Root only.")
@compute_options
def local_swarm(peers, steps, run_id, model, tokenizer_dir, batch_size, batch_tokens, inner_lr, codec, seed,
                round_timeout, target_group_size, matchmaking_time, data, dataset, dashboard, timeout, json_path,
                workdir, progress_every, slow_peer_delay, late_peer_after, attacker, admission, links_path, device,
                precision, micro_batch, compile_model, **diloco):
    """A host and N trainers as separate processes on 127.0.0.1 (or behind emulated WAN links, --links), all
    stopping at global step --steps.

    A peer that dies is reported and the others train on; exits 0 when at least two trainers (one, with
    --peers 1) finished holding the same state and none reported a problem, else 1 with the reason."""
    import json

    from .swarm.local_swarm import LocalSwarm, summary_table

    if peers < 1 or steps < 1:
        raise click.UsageError("--peers and --steps must be >= 1")
    if late_peer_after and peers < 2:
        raise click.UsageError("--late-peer-after needs --peers >= 2 (someone must be there to join)")
    check_output_file(json_path, "--json")
    from .node import attacks
    try:
        attacks.parse(attacker)
    except attacks.AttackError as e:
        raise click.UsageError(f"--attacker: {e}") from None
    if attacker and peers < 3:
        raise click.UsageError("--attacker needs --peers >= 3 (two honest peers, at least, to withstand it)")
    if attacker == "unadmitted" and not admission:
        raise click.UsageError("--attacker unadmitted needs --admission (a run that admits anyone admits it)")
    links = check_links(links_path, peers)
    if dashboard is not None and links is not None:
        raise click.UsageError("--dashboard with --links: the host runs on an emulated machine of its own; watch the "
                               "run with `p2p-diloco monitor --initial-peers ...` instead")
    check_dataset_flags(data, dataset, None, False)
    check_device_flags(device, precision)
    run = _run_config(run_id, model, batch_size, inner_lr, codec, seed, steps, round_timeout,
                      target_group_size or (peers if peers >= 2 else None), matchmaking_time, None,
                      _pop_diloco(diloco), batch_tokens, tokenizer_dir)
    if run.model.tokenizer and not dataset:
        raise click.UsageError("a tokenizer goes with --dataset (the stdlib sources and --data files are read as "
                               "bytes)")
    host_args = []
    if dataset and dashboard is not None:  # the host's dashboard evaluates on the same held-out rows
        eval_tokenizer = tokenizer_dir or (model if run.model.tokenizer and os.path.isdir(model) else None)
        host_args = ["--eval-dataset", dataset] + (["--eval-tokenizer", eval_tokenizer] if eval_tokenizer else [])
    trainer_args = ["--precision", precision] + (["--device", device] if device else []) \
        + (["--micro-batch", str(micro_batch)] if micro_batch else []) + (["--compile"] if compile_model else []) \
        + (["--model", model] if os.path.isdir(model) else []) \
        + (["--tokenizer", tokenizer_dir] if tokenizer_dir else [])
    swarm = LocalSwarm(run, peers, steps, workdir=workdir, data=list(data), dataset=dataset, dashboard=dashboard,
                       trainer_args=trainer_args, host_args=host_args,
                       slow_peer_delay=slow_peer_delay,
                       late_peer_after=late_peer_after, links=links, attacker=attacker, admission=admission)
    # SIGTERM must unwind like Ctrl-C, through the cleanup that stops every child (the host included)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if dashboard is not None:
        click.echo(f"dashboard: http://127.0.0.1:{dashboard}/ (served by the host while it lives)", err=True)
    try:
        report = swarm.run_all(timeout, progress_every=progress_every)
    except (RuntimeError, TimeoutError) as e:
        raise click.ClickException(str(e)) from None
    click.echo()
    click.echo(summary_table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        click.echo(f"report: {json_path}")
    if report["failure"]:
        raise click.ClickException(report["failure"])


@main.command()
@click.option("--run-key", "run_key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The run's key file (the one `host --run-key` created).")
@click.option("--run-id", default="default", show_default=True)
@click.option("--peer", "peer_id", default=None, help="Admit only this peer id (`p2p-diloco identity FILE` prints a "
              "trainer's; it then joins with --identity FILE) [default: anyone who presents the token].")
@click.option("--valid-for", default=168.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Hours the token admits its holder for.")
@click.option("--seats", default=None, type=click.IntRange(min=1, max=MAX_SEATS),
              help="A token for anyone, limited to this many identities: each trainer that presents it redeems it "
                   "at the host (join does that) for a token of its own, while a seat is free.")
def admit(run_key_path, run_id, peer_id, valid_for, seats):
    """Issue a join token for an admission-only run (printed on stdout; pass it to `join --token`)."""
    from .node.admission import AdmissionError, RunKey, Token
    from .node.seat_ledger import ledger_path

    check_run_id_flag(run_id)
    if seats is not None and peer_id is not None:
        raise click.UsageError("--seats limits a token for anyone; a token for one --peer has one seat already")
    if peer_id is not None:
        from .swarm.dht import is_peer_id

        if not is_peer_id(peer_id):
            raise click.UsageError(f"--peer {peer_id!r} is not a peer id (as `p2p-diloco identity FILE` prints "
                                   "it: Qm...)")
    try:
        token = RunKey.load(run_key_path).issue(run_id, peer_id, valid_for * 3600, seats=seats or 0)
    except AdmissionError as e:
        raise click.UsageError(str(e)) from None
    click.echo(token)
    click.echo(f"admits: {Token.parse(token).describe()}", err=True)
    if seats is not None:
        click.echo(f"the host running with --run-key {run_key_path} redeems it, and remembers the seats taken in "
                   f"{ledger_path(run_key_path)}; trainers must name that host in --initial-peers", err=True)
    elif peer_id is None:
        click.echo("anyone who holds this token joins, as many identities as they like: give it out with care",
                   err=True)


@main.command()
@click.argument("run_dir")
@click.option("--out", "out_dir", default=None, help="Where the PNGs go [default: RUN_DIR/plots].")
def plot(run_dir, out_dir):
    """Draw PNGs (loss, throughput, bytes, rounds per fragment, one line per peer) from the metrics-*.jsonl files
    in RUN_DIR (a local swarm's workdir, or the --run-dir of `join`)."""
    from .node.plots import PlotError, plot_run

    try:
        written, skipped = plot_run(run_dir, out_dir)
    except PlotError as e:
        raise click.UsageError(str(e)) from None
    for path in written:
        click.echo(path)
    if skipped:
        click.echo(f"skipped {skipped} line(s) that did not parse (a file cut short by a crash?)", err=True)


@main.command()
@click.argument("key_file")
def identity(key_file):
    """Print the peer id of KEY_FILE, a libp2p key (created if missing): `join --identity KEY_FILE` trains as it,
    and `admit --peer` admits it."""
    from .swarm.dht import create_identity, identity_peer_id

    check_identity_file(key_file)
    if not os.path.exists(key_file):
        create_identity(key_file)
        click.echo(f"created {key_file}", err=True)
    click.echo(str(identity_peer_id(key_file)))


@main.command()
@click.option("--initial-peers", multiple=True, required=True, help="Multiaddr of any live peer of the run.")
@click.option("--run-id", default="default", show_default=True)
@click.option("--token", default=None, envvar="P2P_DILOCO_TOKEN", help="A join token of the run (an admission-only "
              "run's records are read with the run key it names).")
@dashboard_options(8080, "Serve the live dashboard on this port (0: any free one).")
def monitor(initial_peers, run_id, token, dashboard, dashboard_host, eval_every, eval_dataset, eval_text_field,
            eval_tokenizer):
    """Watch a run from any machine: a live web page of its peers, clock, schedule and bytes, from the DHT."""
    from .node.dashboard import DashboardError
    from .swarm.monitor import watch

    eval_data = _eval_data(eval_dataset, eval_text_field, eval_tokenizer)
    dht, run_key = _reader_dht(initial_peers, run_id, token)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    try:
        try:
            watching, page = watch(dht, run_id, dashboard, dashboard_host, run_key=run_key, eval_every=eval_every,
                                   eval_data=eval_data)
        except DashboardError as e:
            raise fail(e) from None
        click.echo(f"dashboard of run {run_id!r}: http://{dashboard_host}:{page.port}/ (Ctrl-C stops it)")
        while not stop.wait(1.0):
            watching.prepare_eval()  # (in this, the main thread: it starts the evaluator's averager processes)
        page.close()
        watching.stop()
    finally:
        dht.shutdown()


@main.command()
@click.option("--initial-peers", multiple=True, required=True, help="Multiaddr of any live peer of the run.")
@click.option("--run-id", default="default", show_default=True)
@click.option("--token", default=None, envvar="P2P_DILOCO_TOKEN", help="A join token of the run (an admission-only "
              "run's config is read with the run key it names).")
def status(initial_peers, run_id, token):
    """Who is in the run: step, rounds, throughput and bytes, read from the DHT."""
    from .node.admission import AdmissionError
    from .node.records import RecordError
    from .swarm.dht import fetch_progress, fetch_run_config

    dht, run_key = _reader_dht(initial_peers, run_id, token)
    try:
        try:
            run = fetch_run_config(dht, run_id, timeout=10, run_key=run_key)
            click.echo(f"run {run.run_id}: model {run.model.to_dict()}, H={run.diloco.outer_period}, "
                       f"fragments={run.diloco.fragments}, codec={run.diloco.codec}, "
                       + ("admission-only" if run.admission_only else "admits anyone"))
        except (RecordError, TimeoutError, AdmissionError) as e:
            click.echo(f"run config: {e}", err=True)
        peers = fetch_progress(dht, run_id)
        click.echo(f"{len(peers)} peer(s)")
        for p in peers:
            click.echo(f"  {p.peer_id}  step {p.step:6d}  rounds {'/'.join(map(str, p.rounds)):>10}  "
                       f"{p.tokens_per_s:8.0f} tok/s  sent {p.bytes_sent / 1e6:8.2f} MB  "
                       f"recv {p.bytes_received / 1e6:8.2f} MB")
    finally:
        dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
