"""Peer profiles: TOML fills options, flags win, and anything wrong names the file and the key."""

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from p2p_diloco.cli import main
from p2p_diloco.node.profiles import profile_option

PEERS = Path(__file__).resolve().parent.parent / "peers"


@click.command("join")
@profile_option
@click.option("--initial-peers", multiple=True, required=True)
@click.option("--steps", type=int, default=None)
@click.option("--client-mode", is_flag=True)
@click.option("--bandwidth", type=float, default=None)
@click.option("--secret", hidden=True, default=None)
def probe(initial_peers, steps, client_mode, bandwidth, secret):
    click.echo(f"{list(initial_peers)} {steps} {client_mode} {bandwidth}")


def run(tmp_path, text, *args):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return CliRunner().invoke(probe, ["--profile", str(path), *args])


def test_profile_values_become_defaults_and_flags_win(tmp_path):
    text = 'role = "join"\ninitial_peers = ["/ip4/1.2.3.4/tcp/1/p2p/X"]\nsteps = 5\nclient_mode = true\n'
    r = run(tmp_path, text)
    assert r.exit_code == 0 and r.output.strip() == "['/ip4/1.2.3.4/tcp/1/p2p/X'] 5 True None"
    r = run(tmp_path, text, "--steps", "7", "--bandwidth", "3")
    assert r.exit_code == 0 and r.output.strip() == "['/ip4/1.2.3.4/tcp/1/p2p/X'] 7 True 3.0"


@pytest.mark.parametrize("text,message", [
    ('stepz = 5\n', "unknown key 'stepz' for `join`"),
    ('secret = "x"\n', "unknown key 'secret'"),
    ('role = "host"\n', "role = 'host', but this is `join`"),
    ('steps = "many"\n', "key 'steps': 'many' is not a valid integer"),
    ('steps = [1, 2]\n', "key 'steps': expected one value"),
    ('initial_peers = "/ip4/x"\n', "key 'initial_peers' takes a list"),
    ('steps = \n', "is not valid TOML"),
])
def test_bad_profiles_are_refused_by_name(tmp_path, text, message):
    r = run(tmp_path, text)
    assert r.exit_code == 2 and message in r.output and "p.toml" in r.output


def test_missing_profile_file(tmp_path):
    r = CliRunner().invoke(probe, ["--profile", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "cannot read" in r.output


@pytest.mark.parametrize("name", sorted(p.name for p in PEERS.glob("*.toml")))
def test_shipped_profiles_load_for_their_role(name):
    role = next(line.split('"')[1] for line in (PEERS / name).read_text().splitlines() if line.startswith("role"))
    r = CliRunner().invoke(main, [role, "--profile", str(PEERS / name), "--help"])
    assert r.exit_code == 0, r.output
