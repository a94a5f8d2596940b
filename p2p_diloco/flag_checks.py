"""Checks of the CLI's flags and files, run before anything starts (no daemon, no process, no download).

What a user can get wrong is refused in one line that names the flag or file and
what would be right; the traceback only under --verbose. A usage error exits 2,
anything else 1.
"""

from __future__ import annotations

import logging
import os

import click

from .core.config import ConfigError

log = logging.getLogger(__name__)


def fail(e: Exception, usage: bool = False) -> click.ClickException:
    """`e` as the one line click prints (a usage error exits 2, else 1); with --verbose, its traceback too."""
    log.debug("%s: %s", type(e).__name__, e, exc_info=e)
    return click.UsageError(str(e)) if usage else click.ClickException(str(e))


def parse_initial_peers(initial_peers: tuple) -> list[str]:
    """--initial-peers, each a multiaddr with the peer id to join through; a usage error otherwise. What is
    plainly no multiaddr (no leading "/") is refused before hivemind is imported (seconds: it imports torch)."""
    for text in initial_peers:
        if not text.startswith("/"):
            raise click.UsageError(f"--initial-peers {text!r} is not a multiaddr (it must begin with /, as in "
                                   "/ip4/203.0.113.5/tcp/31337/p2p/<peer id>: copy it whole from what the host "
                                   "printed)")
    from .swarm.dht import BootstrapError, check_initial_peers

    try:
        return check_initial_peers(list(initial_peers))
    except BootstrapError as e:
        raise fail(e, usage=True) from None


def probe_bootstrap(initial_peers: list[str]) -> None:
    """The last check before a peer starts: one of its initial peers accepts a TCP connection (refused: at once;
    silent: within a few seconds), else an error naming each address and what to check."""
    from .swarm.dht import bootstrap_unreachable, probe_initial_peers

    problems = probe_initial_peers(initial_peers)
    if problems:
        raise fail(bootstrap_unreachable(initial_peers, problems))


def check_output_file(path: str | None, option: str) -> None:
    """A file written at the end (after minutes of work) must be writable now: its folder exists."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise click.UsageError(f"{option} {path}: a directory; name a file")
    if not os.path.isdir(folder):
        raise click.UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.UsageError(f"{option} {path}: the folder {folder} is not writable by this user")


def check_output_dir(option: str, path: str) -> None:
    """A directory written to during a run: an existing writable one, or one that can be made (its nearest
    existing parent is a writable directory)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise click.UsageError(f"{option} {path}: not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise click.UsageError(f"{option} {path}: not writable by this user")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise click.UsageError(f"{option} {path}: cannot be created ({parent} is not a writable directory)")


def check_fragments(fragments: int, given: bool, model: str, layers: int) -> None:
    """Block fragments are whole transformer blocks: P <= the model's blocks (`core.fragments`)."""
    if fragments > layers:
        from .task.model import PRESETS

        bigger = ", ".join(f"{name}: {spec.layers}" for name, spec in PRESETS.items() if spec.layers >= fragments)
        raise click.UsageError(
            f"--fragments {fragments}{'' if given else ' (the default)'} is more than the {layers} transformer blocks "
            f"of --model {model}: use --fragments 0 to {layers} (0: plain DiLoCo, one fragment)"
            + (f", or a --model with more blocks ({bigger})" if bigger else ""))


def check_identity_file(path: str) -> None:
    """--identity: a key file to read, or one to create in a folder that exists."""
    if os.path.isdir(path):
        raise click.UsageError(f"--identity {path}: a directory; name a key file (created if missing)")
    if os.path.exists(path):
        from .swarm.dht import identity_peer_id

        try:
            identity_peer_id(path)
        except OSError as e:
            raise click.UsageError(f"--identity {path}: cannot read it ({e.strerror})") from None
        except Exception as e:
            raise click.UsageError(f"--identity {path}: not a key file (it does not parse: {e}); name a file that "
                                   "does not exist yet, and a new key is written there") from None
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.UsageError(f"--identity {path}: the folder {folder} does not exist (the key file is created "
                               "if missing, its folder is not)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.UsageError(f"--identity {path}: cannot create the key file, {folder} is not writable")


def check_run_id_flag(run_id: str) -> None:
    """--run-id names DHT keys: refused before the DHT starts, not after."""
    from .node.records import RecordError, check_run_id

    try:
        check_run_id(run_id)
    except RecordError as e:
        raise click.UsageError(f"--run-id: {e}") from None


def check_join_files(run_id: str, data: tuple, summary_path: str | None, checkpoint_dir: str | None,
                resume: str | None) -> None:
    """What join reads and writes on this machine, checked before it touches the network: the checkpoint to
    resume from (whole, of this run), where checkpoints and the summary go, the data (text, two files or more)."""
    from .node.checkpoint import CheckpointError, check_checkpoint_dir, check_checkpoint_target

    def check(option: str, function, *args, usage: bool = True) -> None:
        try:
            function(*args)
        except CheckpointError as e:  # its message starts with the directory or file
            raise fail(CheckpointError(f"{option} {e}"), usage=usage) from None

    if resume is not None:  # a damaged checkpoint is no usage error: exit 1, as when it is found at load
        check("--resume", check_checkpoint_dir, resume, run_id, usage=False)
    if checkpoint_dir is not None:
        check("--checkpoint-dir", check_checkpoint_target, checkpoint_dir)
    elif resume is not None:  # it saves where it resumed from
        check("--resume", check_checkpoint_target, resume)
    check_output_file(summary_path, "--summary")
    if data:
        from .task.data import Corpus

        try:
            Corpus.load(list(data), max_bytes=1)
        except ConfigError as e:
            raise fail(ConfigError(f"--data: {e}"), usage=True) from None


def check_links(path: str | None, peers: int):
    """--links: None, or (the host's link, each trainer's link) from a valid links file, on a machine where
    namespaces can be made (root); else one line naming the file, the key and the reason."""
    if path is None:
        return None
    from .emulation.links import LinksError, read_links
    from .emulation.wan import available

    try:
        links = read_links(path, peers)
    except LinksError as e:
        raise fail(e, usage=True) from None
    reason = available()
    if reason:
        raise fail(RuntimeError(f"--links {path}: emulated links cannot be made here: {reason}"))
    return links


def check_device_flags(device: str | None, precision: str) -> None:
    """--device names one this machine has, and --precision is one it can run there."""
    from .task.device import pick_device, resolve_precision

    try:
        resolved = pick_device(device)
    except ValueError as e:
        raise click.UsageError(f"--device: {e}") from None
    try:
        resolve_precision(precision, resolved)
    except ValueError as e:
        raise click.UsageError(f"--precision: {e}") from None


def check_dataset_flags(data: tuple, dataset: str | None, text_field: str | None, streaming: bool) -> None:
    """--dataset with its companions, and the dataset itself (loaded once: a missing field or a malformed file is
    a usage error before the network is touched)."""
    if dataset is None:
        for flag, given in (("--text-field", text_field), ("--streaming", streaming)):
            if given:
                raise click.UsageError(f"{flag} goes with --dataset")
        return
    if data:
        raise click.UsageError("--data and --dataset: give one of them (files of text, or a dataset)")
    from .task.dataset import TextDataset

    try:
        TextDataset.load(dataset, text_field, streaming or None)
    except ConfigError as e:
        raise fail(e, usage=True) from None
