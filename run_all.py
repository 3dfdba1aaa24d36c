#!/usr/bin/env python
"""Run the gpt2opt notebooks in order with papermill, one profile of parameters, into a new run directory.

    python run_all.py                                   # the offline `quick` profile, all stages
    python run_all.py --profile gpu-offline             # any CUDA GPU, no network
    python run_all.py --only 01_distill,02_compare      # a subset (later stages read earlier ones' artifacts)
    python run_all.py --only 02_compare --out reports/quick/<run>   # add a stage to an existing run
    python run_all.py --resume reports/quick/<run>      # finish an interrupted run (finished stages are kept)
    python run_all.py --list                            # profiles and stages

Every parameter is validated against the stage's config dataclass before anything runs. Executed notebooks (and
an HTML copy) land in reports/<profile>/<UTC time>-<git sha>/ with each stage's artifacts and a summary.json.
A notebook executes into <run>/.partial/ and is renamed into place when it ends, so a killed run never leaves a
half-written notebook where a finished one belongs; `--resume` sets such a stage aside (<run>/_interrupted/) and
runs it again. A stage counts as finished only when its <stage>/MANIFEST.json (written last: every file's size and
hash, and the parameters it ran with) still matches its files; a damaged one is set aside and rerun on --resume,
with the finished stages that read it. One process writes a run at a time (a flock on <run>/.lock); --resume
refuses parameters (params.json) that differ from those a finished stage ran with.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from gpt2opt_lib import config  # noqa: E402
from gpt2opt_lib.tracking import replace_durably, write_atomic, write_json  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
NEEDS = config.STAGE_NEEDS  # which earlier stages' artifacts each stage reads from the run directory


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None,
                    help="params/<profile>.yaml (default: quick; with --out of an existing run, that run's profile) "
                         "or a path to a YAML")
    ap.add_argument("--only", default="", help="comma-separated stages to run, e.g. 01_distill,02_compare")
    ap.add_argument("--out", default="", help="run directory (default: a new reports/<profile>/<UTC time>-<sha>/)")
    ap.add_argument("--resume", default="", metavar="RUN_DIR",
                    help="finish an interrupted run: keep its completed stages, rerun the rest with its parameters")
    ap.add_argument("--nproc", type=int, default=0, metavar="N",
                    help="run 01's student training data-parallel on N processes (torchrun; one per GPU)")
    ap.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    ap.add_argument("--list", action="store_true", help="list profiles and stages, then exit")
    return ap.parse_args(argv)


def available_stages() -> list[str]:
    return [s for s in config.STAGES if (NOTEBOOKS / f"{s}.ipynb").exists() and s in config.STAGE_CONFIGS]


def select_stages(only: str) -> list[str]:
    stages = available_stages()
    if not only:
        return stages
    picked = [s.strip() for s in only.split(",") if s.strip()]
    bad = [s for s in picked if s not in stages]
    if bad:
        raise config.ConfigError(f"--only: unknown stage(s) {bad}; available: {stages}")
    return [s for s in stages if s in picked]  # always in pipeline order


def export_html(nb_path: Path) -> Path | None:
    try:
        import nbformat
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nbformat.read(nb_path, as_version=4))
        return write_atomic(nb_path.with_suffix(".html"), lambda f: f.write(body))
    except Exception as e:  # a report without its HTML copy is still a report
        print(f"  (HTML export of {nb_path.name} failed: {e})")
        return None


def set_aside(run_dir: Path, stage: str) -> Path | None:
    """Move what an interrupted or failed stage left (its folder, notebook, HTML, partial notebook) out of the way
    into <run>/_interrupted/<stage>-<UTC time>/: nothing is deleted, nothing half-done is mistaken for a result."""
    leftovers = [run_dir / stage, run_dir / f"{stage}.ipynb", run_dir / f"{stage}.html",
                 run_dir / ".partial" / f"{stage}.ipynb"]
    leftovers = [p for p in leftovers if p.exists()]
    if not leftovers:
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = run_dir / "_interrupted" / f"{stage}-{stamp}"
    dest.mkdir(parents=True)
    for p in leftovers:
        shutil.move(str(p), str(dest / p.name))
    return dest


def plan(args) -> tuple[str, list[str], dict, Path | None]:
    """Profile, stages, validated parameters and the run directory (None: a new one), all checked before
    anything is created."""
    if args.resume:
        if args.out:
            raise config.ConfigError("--resume names the run directory; leave --out out")
        run = Path(args.resume).resolve()
        if not (run / "params.json").exists():
            raise config.ConfigError(f"--resume {args.resume}: not a run directory (no params.json)")
        config.check_writable_dir(run, "--resume")
        where = run / "params.json"
        saved = config.read_run_json(where)
        if not (isinstance(saved, dict) and saved and all(isinstance(v, dict) for v in saved.values())):
            raise config.ConfigError(f"{where} is damaged (not a mapping of stage: parameters); restore it (each "
                                     f"finished stage's parameters are in <stage>/{config.MANIFEST}) or start a new run")
        summary = config.read_run_json(run / "summary.json") if (run / "summary.json").exists() else {}
        profile = summary.get("profile") if isinstance(summary, dict) else None
        profile = profile or next(iter(saved.values())).get("profile", "quick")
        config.check_profile_name(profile, str(where))
        if args.profile is not None and Path(args.profile).stem != profile:
            raise config.ConfigError(f"--resume {args.resume} is a {profile!r} run; --profile {args.profile} would "
                                     f"mix profiles in one report: drop --profile (a run resumes with its own)")
        stages = select_stages(args.only) if args.only else [s for s in available_stages() if s in saved]
        params = {}
        for s in stages:  # the run's own parameters, revalidated; a stage it never planned gets its profile's
            params[s] = (config.validate(config.STAGE_CONFIGS[s], saved[s], f"{where} [{s}]")
                         if s in saved else config.stage_parameters(profile, s))
        # every up-front check a new run makes, on the run's parameters (all its stages: the kept ones are read)
        known = {s: v for s, v in saved.items() if s in config.STAGE_CONFIGS}
        _check_up_front({**{s: config.validate(config.STAGE_CONFIGS[s], v, f"{where} [{s}]")
                            for s, v in known.items()}, **params}, str(where))
        return profile, stages, params, run
    stages = select_stages(args.only)
    if not stages:
        raise config.ConfigError(f"--only {args.only!r} names no stage; available: {available_stages()}")
    args.profile = _profile_for_out(args)
    params = {s: config.stage_parameters(args.profile, s) for s in stages}
    _check_up_front(params, args.profile if Path(args.profile).suffix
                    else str(config.PARAMS_DIR / f"{args.profile}.yaml"))
    out = Path(args.out).resolve() if args.out else None
    # where the run will be written must be a writable directory: refused here, before anything is created
    if out is not None:
        config.check_writable_dir(out, "--out")
    else:
        config.check_writable_dir(config.REPORTS_DIR / Path(args.profile).stem, "reports directory")
    for s in stages:
        if out and ((out / f"{s}.ipynb").exists() or config.stage_complete(out, s)):
            raise config.ConfigError(f"{out / (s + '.ipynb')} exists: runs are never overwritten; choose another "
                                     f"--out, leave it out for a new run directory, or --resume {out}")
    return Path(args.profile).stem, stages, params, out


def _check_up_front(params: dict[str, dict], where: str) -> None:
    """What can be refused before anything runs, for a new run and a resumed one alike: lengths vs the models'
    context where the architecture is known before training (random:/scratch: models of 01), a tokenizer named as
    a local folder that is not one, a files:<glob> corpus that matches nothing."""
    import glob

    full = {s: config.as_dict(config.STAGE_CONFIGS[s](**v)) for s, v in params.items()}  # defaults filled in
    for s, v in full.items():
        tok = v["tokenizer"]
        if tok not in ("gpt2", "offline") and _names_local_path(tok) and not Path(tok).expanduser().is_dir():
            raise config.ConfigError(f"{where} [{s}]: parameter 'tokenizer'={tok!r} names a local folder that does "
                                     f"not exist (a tokenizer folder has tokenizer.json or vocab.json + merges.txt)")
        if v["corpus"].startswith("files:") and not any(
                Path(f).is_file() for f in glob.iglob(v["corpus"][len("files:"):], recursive=True)):
            raise config.ConfigError(f"{where} [{s}]: parameter 'corpus'={v['corpus']!r} matches no files")
    if "01_distill" not in full:
        return
    d = full["01_distill"]
    from gpt2opt_lib.models import arch_config

    student_spec = {"random": "random:" + d["student"].removeprefix("random:"),
                    "teacher-layers": d["teacher"]}.get(d["student_init"])
    for role, spec, scope in (("teacher", d["teacher"], ("01_distill",)), ("student", student_spec, None)):
        if spec and spec.startswith(("random:", "scratch:")):
            try:
                n_pos = arch_config(spec.split(":", 1)[1]).n_positions
            except ValueError as e:
                raise config.ConfigError(f"{where} [01_distill]: {role} {spec!r}: {e}") from None
            config.check_context(full, n_pos, f"the {role} {spec}", where, scope)


def _names_local_path(name: str) -> bool:
    """A name that can only mean a folder on this machine (a hub id is `name` or `org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or Path(name).exists()


def _profile_for_out(args) -> str:
    """Stages added to an existing run (--out RUN) take that run's profile: a stage measured with other parameters
    than the stages it reads would make the run's report lie. An explicit, different --profile is refused."""
    run = Path(args.out) if args.out else None
    if run is None or not (run / "summary.json").exists():
        return args.profile or "quick"
    run_profile = config.read_run_json(run / "summary.json").get("profile")
    if args.profile is None or not run_profile:
        return args.profile or run_profile or "quick"
    if Path(args.profile).stem != run_profile:
        raise config.ConfigError(f"--out {args.out} is a {run_profile!r} run; --profile {args.profile} would mix "
                                 f"profiles in one report: drop --profile, or choose another --out")
    return args.profile


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("profiles:", ", ".join(config.list_profiles()))
        print("stages:  ", ", ".join(available_stages()))
        return 0
    import papermill  # noqa: F401  (missing: fail here, before a run directory exists)

    _lock_existing(args)  # one writer per run: taken before the run's state is read
    # validate every stage's parameters before running anything
    profile, stages, params, out = plan(args)
    done, redo = _resume_plan(out, stages) if args.resume else ([], {})
    if args.nproc:  # the profile's nproc, overridden for every stage that runs now (validated like the rest)
        for s in params:
            if s not in done and "nproc" in config.fields(config.STAGE_CONFIGS[s]):
                params[s] = config.validate(config.STAGE_CONFIGS[s], {**params[s], "nproc": args.nproc}, "--nproc")
    for s in stages:  # checked before any directory is made
        missing = [n for n in NEEDS.get(s, []) if n not in stages and not (out and config.stage_complete(out, n))]
        if missing:
            raise config.ConfigError(f"{s} reads the artifacts of {missing}, which neither run now nor exist in "
                                     f"{out or 'a new run directory'}: add them to --only, or pass --out with a run "
                                     f"directory that has them")
    if out is not None:
        _check_drift(out, stages, params, done, str(out / "params.json") if args.resume else args.profile)
    run_dir = out or config.new_run_dir(profile)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.lock_run(run_dir, "run_all")  # already held for an existing run; a new one is locked here
    os.environ[config.LOCK_ENV] = f"{os.getpid()}:{run_dir.resolve()}"  # the kernels write under this lock
    summary_path = run_dir / "summary.json"
    summary = config.read_run_json(summary_path) if summary_path.exists() else {"profile": profile,
                                                                               "run_dir": str(run_dir), "stages": {}}
    summary.setdefault("stages", {})
    from gpt2opt_lib.env import env_stamp

    summary["env"] = env_stamp(profile, params[stages[0]]["seed"] if stages and "seed" in params[stages[0]] else None)
    old_params = config.read_run_json(run_dir / "params.json") if (run_dir / "params.json").exists() else {}
    write_json(run_dir / "params.json", {**old_params, **params})
    print(f"run directory: {run_dir}\nprofile: {profile}   stages: {', '.join(stages)}")
    if done:
        print(f"resume: keeping the completed stage(s) {', '.join(done)}")
    for s, why in redo.items():
        print(f"resume: {s} runs again: {why}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    os.environ.update(env)  # the kernel inherits it: notebooks import gpt2opt_lib from this checkout
    user_threads = os.environ.get("OMP_NUM_THREADS")  # set by the user: always wins
    active = _register_active()
    try:
        return _run_stages(args, stages, params, done, run_dir, summary, summary_path, user_threads)
    finally:
        if active is not None:
            active.unlink(missing_ok=True)
        config.release_run(run_dir)


def _lock_existing(args) -> None:
    """Lock the existing run named by --resume or --out (ConfigError when another writer holds it)."""
    run, what = (args.resume, "--resume") if args.resume else (args.out, "--out")
    if not run or not Path(run).is_dir() or (args.resume and not (Path(run) / "params.json").exists()):
        return  # a new run is locked when it is made; plan() refuses what is not a run
    config.check_writable_dir(run, what)
    config.lock_run(run, what)


def _resume_plan(run: Path, stages: list[str]) -> tuple[list[str], dict[str, str]]:
    """(stages kept, {stage run again: why}) for --resume: a stage is kept only when it is verified complete
    (config.stage_problem) and every stage it reads is kept too; what a rerun stage left is set aside later."""
    done, redo = [], {}
    for s in stages:
        why = config.stage_problem(run, s)
        stale = [n for n in NEEDS.get(s, []) if n in redo]
        if why is None and not stale:
            done.append(s)
        elif why is None:
            redo[s] = f"it reads {', '.join(stale)}, which runs again"
        elif why != "no results.json" or (run / s / config.MANIFEST).exists():
            redo[s] = f"its results are not complete ({why})"
        else:
            redo[s] = why
    return done, {s: w for s, w in redo.items() if w != "no results.json"}


def _check_drift(run: Path, stages: list[str], params: dict, done: list[str], where: str) -> None:
    """Parameters that cannot drift within a run: a kept stage's parameters (params.json) must be the ones it ran
    with (its manifest); a stage that runs now must share the common parameters of the stages it reads."""
    for s in done:
        rec = (config.read_manifest(run, s) or {}).get("parameters")
        bad = config.changed_keys(rec, config.full_parameters(s, params[s])) if rec is not None else []
        if bad:
            raise config.ConfigError(f"{where} [{s}]: the finished {s} ran with other parameters ({', '.join(bad)} "
                                     f"changed since); restore them (they are in {s}/{config.MANIFEST}), or start a "
                                     f"new run")
    for s in stages:
        if s in done:
            continue
        reads = [n for n in NEEDS.get(s, []) if n not in stages or n in done]
        running = {n: params[n] for n in NEEDS.get(s, []) if n in stages and n not in done}
        drift = config.common_drift(run, s, params[s], needs=[n for n in reads if config.stage_complete(run, n)],
                                    running=running)
        if drift:
            raise config.ConfigError(f"{where} [{s}]: {drift}")


def _run_stages(args, stages, params, done, run_dir, summary, summary_path, user_threads) -> int:
    import papermill as pm

    for i, stage in enumerate(stages, 1):
        if stage in done:
            entry = summary["stages"].setdefault(stage, {"notebook": f"{stage}.ipynb", "status": "ok"})
            if not args.no_html and (run_dir / f"{stage}.ipynb").exists() and not (run_dir / f"{stage}.html").exists():
                html = export_html(run_dir / f"{stage}.ipynb")  # a run killed between notebook and HTML
                entry["html"] = html.name if html else None
            _collect(run_dir, stage, entry)
            write_json(summary_path, summary)
            write_index(run_dir)
            print(f"[{i}/{len(stages)}] {stage}: completed earlier, kept")
            continue
        aside = set_aside(run_dir, stage) if args.resume else None
        if aside:
            print(f"[{i}/{len(stages)}] {stage}: the earlier attempt is set aside in {aside.relative_to(run_dir)}; "
                  f"running it again")
        out_nb = run_dir / f"{stage}.ipynb"
        partial = run_dir / ".partial" / f"{stage}.ipynb"
        partial.parent.mkdir(exist_ok=True)
        if not user_threads:  # the kernel's torch reads it at import: a fair share of the cores
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cpu_share())
        print(f"[{i}/{len(stages)}] {stage} ..." + ("" if user_threads else f" ({os.environ['OMP_NUM_THREADS']} CPU "
                                                                             f"threads)"), flush=True)
        t0 = time.time()
        entry = {"notebook": out_nb.name}
        try:
            pm.execute_notebook(str(NOTEBOOKS / f"{stage}.ipynb"), str(partial),
                                parameters={**params[stage], "run_dir": str(run_dir)}, cwd=str(ROOT),
                                kernel_name="python3", progress_bar=True, log_output=False)
            entry["status"] = "ok"
        except pm.PapermillExecutionError as e:
            entry.update(status="failed", error=f"{e.ename}: {e.evalue}", failed_cell=e.exec_count)
            print(f"\nFAILED: {stage} (cell [{e.exec_count}]): {e.ename}: {e.evalue}\n"
                  f"  executed notebook with the traceback: {out_nb}", file=sys.stderr)
        except Exception as e:  # kernel died, notebook unreadable, ...
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
            print(f"\nFAILED: {stage}: {type(e).__name__}: {e}", file=sys.stderr)
        if partial.exists():
            replace_durably(partial, out_nb)  # the whole executed notebook appears at once
        try:
            partial.parent.rmdir()  # only if empty: no stray .partial/ is left in a run directory
        except OSError:
            pass
        entry["duration_s"] = round(time.time() - t0, 1)
        if not args.no_html and out_nb.exists():
            html = export_html(out_nb)
            entry["html"] = html.name if html else None
        if entry["status"] == "ok":
            _collect(run_dir, stage, entry)
        summary["stages"][stage] = entry
        write_json(summary_path, summary)
        write_index(run_dir)
        if entry["status"] == "ok" and (run_dir / stage / "results.json").exists():
            config.write_manifest(run_dir / stage)  # last: every file the stage left, and its parameters
        print(f"  {entry['status']} in {entry['duration_s']} s", flush=True)
        if entry["status"] != "ok":
            print(f"stopped; everything written so far is kept in {run_dir}; after a fix: "
                  f"python run_all.py --resume {run_dir}", file=sys.stderr)
            return 1
    print(f"done: {summary_path}\nreport: {run_dir / 'index.html'}")
    return 0


ACTIVE_DIR = Path(tempfile.gettempdir()) / "gpt2opt-active-runs"  # one empty file per running run_all (its pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def cpu_share(active_dir: Path = ACTIVE_DIR, cpus: int | None = None) -> int:
    """CPU threads for this run's next notebook: the machine's cores split evenly between the run_all processes
    running now (entries of dead processes are dropped). Two runs at once each taking every core ran ~5x slower
    than one alone (oversubscription); recomputed at every stage, since each stage starts a fresh kernel."""
    cpus = cpus or os.cpu_count() or 1
    n = 0
    for f in active_dir.glob("*"):
        if f.name.isdigit() and _alive(int(f.name)):
            n += 1
        else:
            f.unlink(missing_ok=True)
    return max(1, cpus // max(1, n))


def _register_active(active_dir: Path = ACTIVE_DIR) -> Path | None:
    try:
        active_dir.mkdir(parents=True, exist_ok=True)
        entry = active_dir / str(os.getpid())
        entry.touch()
        return entry
    except OSError:  # no shared temp dir: no sharing, nothing else changes
        return None


def write_index(run_dir: Path) -> None:
    """The run's one-page report (index.html), refreshed after every stage; a report never fails the run."""
    try:
        from gpt2opt_lib import report

        report.write_index(run_dir)
    except Exception as e:
        print(f"  (index.html not written: {type(e).__name__}: {e})", file=sys.stderr)


def _collect(run_dir: Path, stage: str, entry: dict) -> None:
    """Copy a completed stage's metrics (and 05's gains) from its results.json into the summary entry."""
    res_path = run_dir / stage / "results.json"
    if res_path.exists():
        res = config.read_run_json(res_path)
        entry["metrics"] = res.get("metrics", {})
        for key in ("gains", "gains_table", "gains_caption"):
            if key in res:
                entry[key] = res[key]
        entry["results"] = str(res_path.relative_to(run_dir))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a disk that fills or turns read-only mid-run: one line; what was written is kept
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
