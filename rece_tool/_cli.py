"""The `rece-tool` command line: parses, calls the library, maps errors to exit codes.

Exit codes: 0 all passed · 1 a gate failed (or a signature did not verify) · 2 bad input ·
3 internal error · 130 interrupted. No traceback unless --debug.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import warnings
from pathlib import Path

# Before torch loads OpenMP: its idle threads otherwise spin for a while after every parallel
# op, taking the cores the background copy and hashing threads need (measured: a third more
# CPU time and a quarter more wall time per checkpoint on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from . import __version__
from .errors import (EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_OK, BadInput,
                     ReceError, SigningError)

EXIT_INTERRUPTED = 130
SIGNING_KEY_ENV = "RECE_SIGNING_KEY"
PASSWORD_ENV = "RECE_SIGNING_KEY_PASSWORD"


def _say(message: str) -> None:
    click.echo(message, err=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _guarded(fn):
    """Run a command; turn every outcome into one stderr line and an exit code."""
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            code = fn(*args, **kwargs)
        except ReceError as exc:
            if debug:
                raise
            _say(f"rece-tool: error: {exc.diagnostics()}")
            code = exc.exit_code
        except KeyboardInterrupt:
            _say("rece-tool: interrupted; no partial output was left behind")
            code = EXIT_INTERRUPTED
        except Exception as exc:  # the last line of defence: no traceback for users
            if debug:
                raise
            _say(f"rece-tool: internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                 "for a traceback, and report it)")
            code = EXIT_INTERNAL
        sys.exit(code or EXIT_OK)
    return click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)


def _progress(quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return functools.partial(tqdm, file=sys.stderr, leave=False, dynamic_ncols=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rece-tool")
def main() -> None:
    """Erase concepts from Stable Diffusion checkpoints with RECE, audit them, sign the release."""
    warnings.filterwarnings("ignore", category=FutureWarning)


# --- sanitize ----------------------------------------------------------------------------------

def _signing_key(manifest, require: bool):
    from .signing import load_private_key

    env = os.environ.get(SIGNING_KEY_ENV)
    path = Path(env) if env else manifest.signing_key
    if path is None:
        if require:
            raise SigningError("no signing key configured", path=manifest.path, field="output.signing_key",
                               hint=f"set output.signing_key in the manifest or {SIGNING_KEY_ENV}; "
                                    "make one with `rece-tool keygen DIR`")
        return None
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = load_private_key(path, password.encode() if password is not None else None)
    except SigningError as exc:
        if env and not exc.field:
            exc.field = SIGNING_KEY_ENV  # say where the path came from
        raise
    if key.warning:
        _say(f"rece-tool: warning: {key.warning}")
    return key


@main.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@click.option("--only", multiple=True, metavar="NAME", help="Sanitize only this checkpoint (repeatable).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the resolved plan and exit.")
@click.option("--overwrite", is_flag=True, help="Replace existing output folders.")
@click.option("--junit", type=click.Path(path_type=Path), help="Write each gate as a JUnit test case.")
@click.option("--require-signature", is_flag=True, help="Fail (exit 2) when no signing key is configured.")
@click.option("--shard", metavar="I/N|auto", help="Do only checkpoints k with k mod N = I (auto: "
              "Kubernetes JOB_COMPLETION_INDEX or Slurm SLURM_ARRAY_TASK_ID).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_guarded
def sanitize(manifest_path: Path, only, device, dry_run, overwrite, junit, require_signature, shard, quiet):
    """Erase the manifest's concept sets from its checkpoints, audit, write, sign."""
    from . import manifest as manifest_mod
    from . import report
    from .checkpoint.layout import open_checkpoint
    from .output import check_destination
    from .resume import already_done
    from .sanitize import Options, plan, sanitize_checkpoints
    from .shard import parse_shard, select

    manifest = manifest_mod.load(manifest_path)
    checkpoints = list(manifest.checkpoints)
    if only:
        known = {c.name for c in checkpoints}
        for name in only:
            if name not in known:
                raise BadInput(f"no checkpoint named {name!r}", path=manifest_path, field="--only",
                               hint=f"defined: {', '.join(sorted(known))}")
        checkpoints = [c for c in checkpoints if c.name in only]
    if shard:
        index, count = parse_shard(shard)
        checkpoints = select(checkpoints, index, count)
        _say(f"rece-tool: shard {index}/{count}: {', '.join(c.name for c in checkpoints) or 'no checkpoints'}")
    if dry_run:
        click.echo(json.dumps({"manifest": str(manifest_path), "output_dir": str(manifest.output_dir),
                               "checkpoints": plan(manifest, checkpoints)}, indent=2))
        return EXIT_OK
    if junit and not junit.parent.is_dir():
        raise BadInput(f"folder {junit.parent} does not exist", path=junit, field="--junit")
    options = Options(device=device, overwrite=overwrite, quiet=quiet,
                      signing_key=_signing_key(manifest, require_signature), progress=_progress(quiet),
                      embedders={} if len(checkpoints) > 1 else None)
    # Every cheap refusal before any compute: a bad second checkpoint must not fail late.
    skipped: dict[str, str] = {}
    for spec in checkpoints:
        open_checkpoint(spec.path)
        if not overwrite and (manifest.output_dir / spec.name).exists():
            reason = already_done(manifest, spec, will_sign=options.signing_key is not None)
            if reason:
                skipped[spec.name] = reason
                continue
        check_destination(manifest.output_dir, spec.name, overwrite)
    for spec in checkpoints:
        if spec.name in skipped:
            _say(f"{spec.name}: skipped, {skipped[spec.name]} ({manifest.output_dir / spec.name}/; "
                 "--overwrite redoes it)")
    results = []
    for result in sanitize_checkpoints(manifest, [c for c in checkpoints if c.name not in skipped], options):
        for line in report.text_summary(result.audit, result.folder):
            _say(line)
        results.append(result)
    if junit:
        report.write_junit(junit, [(r.name, r.gates) for r in results])
    return EXIT_OK if all(r.passed for r in results) else EXIT_GATE_FAILED


# --- inspect -----------------------------------------------------------------------------------

@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_guarded
def inspect(checkpoint: Path, as_json: bool):
    """Layout, family, dtype, K/V count, share of parameters edited, provenance."""
    from .checkpoint.layout import open_checkpoint
    from .provenance import read_provenance

    ck = open_checkpoint(checkpoint)
    info = {**ck.describe(), "provenance": read_provenance(ck.metadata)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return EXIT_OK
    note = "" if ck.kv_count == ck.family.real_kv_count else f" (the real {ck.family.title} has {ck.family.real_kv_count})"
    click.echo(f"{checkpoint}\n  layout        {ck.layout.name}\n  family        {ck.family.title} "
               f"({ck.family.modelspec_architecture})\n  context dim   {ck.kv_width}\n"
               f"  K/V dtype     {', '.join(ck.kv_dtypes)}\n  K/V matrices  {ck.kv_count}{note}"
               f"{f' + {ck.ema_count} EMA twins' if ck.ema_count else ''}\n"
               f"  UNet params   {ck.unet_params:,} ({100 * info['share_of_unet_modified']:.2f}% in K/V)")
    prov = info["provenance"]
    if prov:
        click.echo(f"  sanitized by  {prov.get('rece.tool')} on {prov.get('modelspec.date')}")
        for cs in prov.get("rece.concept_sets", []):
            click.echo(f"    {cs['name']}: erase {', '.join(cs['erase'])} (epochs {cs['epochs']}, reg {cs['reg']})")
        click.echo(f"  source sha256 {prov.get('rece.source_sha256')}")
    else:
        click.echo("  provenance    none (not sanitized by rece-tool)")
    return EXIT_OK


# --- keys and signatures -----------------------------------------------------------------------

@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@_guarded
def keygen(directory: Path):
    """Make an EC P-256 signing key pair (PEM) in DIRECTORY."""
    from .signing import keygen as make_keys

    private, public = make_keys(directory)
    click.echo(f"private key: {private} (mode 0600; keep it secret, point output.signing_key or "
               f"{SIGNING_KEY_ENV} at it)\npublic key:  {public} (give it to your consumers)")
    return EXIT_OK


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--public-key", required=True, type=click.Path(path_type=Path), help="The signer's public key (PEM).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_guarded
def verify(folder: Path, public_key: Path, as_json: bool):
    """Check a sanitized output folder: signature, then that the model and its audit log agree."""
    from .verify import verify_output

    outcome = verify_output(folder, public_key)
    if as_json:
        click.echo(json.dumps(outcome.as_dict(), indent=2))
    else:
        for line in outcome.lines():
            click.echo(line)
    return EXIT_OK if outcome.ok else EXIT_GATE_FAILED


if __name__ == "__main__":  # pragma: no cover
    main()
