"""``python -m clfast``: continual-learning experiments with clfast's modules on continuum scenarios.

Trains one model per method and seed on a scenario, evaluates every task after every epoch, and writes the
accuracy matrices, metrics, a summary table, ``results.json`` / CSV files and figures to ``--out``, after each
run. With no arguments it runs the demo: split Fashion-MNIST (5 tasks x 2 classes), finetune / replay / ewc / si
/ ocar / cbp, an MLP, one epoch per task.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import ops
from .._distributed import rank_and_world
from .._version import __version__
from . import data, io, loop, methods, models, plots, scenarios

DEMO_METHODS = "finetune,replay,ewc,si,ocar,cbp"
PRESETS = {
    # the small ConvNet (BaseNet), plain SGD lr 0.002, batch 256, 5 epochs per task, EWC strength 1000,
    # OCAR damping 1e-2
    "seed": dict(model="basenet", lr=0.002, momentum=0.0, batch_size=256, epochs=5, ewc_lambda=1000.0,
                 si_strength=1.0, ocar_damping=1e-2),
    # momentum SGD for one epoch per task; strengths that stay stable over the split scenario at this step size
    # (--stiffness cap lowers them where a longer scenario makes them too stiff)
    "demo": dict(model="mlp", lr=0.01, momentum=0.9, batch_size=128, epochs=1, ewc_lambda=100.0, si_strength=0.5,
                 ocar_damping=0.1),
}


SEED_MAX = 2 ** 32 - 1  # continuum's permutations seed numpy's RandomState


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the flag has one (a preset's flags list the presets' values instead)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clfast", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--dataset", choices=data.DATASETS, default=None,
                   help="read from --data-dir, never downloaded (default: fashion-mnist)")
    p.add_argument("--scenario", choices=scenarios.SCENARIOS, default="split",
                   help="split: class-incremental; permuted: pixel permutations; fellowship: MNIST, Fashion-MNIST, "
                        "KMNIST in turn")
    p.add_argument("--methods", default=DEMO_METHODS,
                   help=f"comma-separated; each one of {', '.join(methods.names())} or a '+' combination")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="defaults for the model, optimizer, epochs and method strengths; explicit flags override them")
    p.add_argument("--model", choices=sorted(models.MODELS), default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per task")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tasks", type=int, default=5, help="tasks of the split and permuted scenarios")
    p.add_argument("--buffer-size", type=int, default=1000, help="replay memory of replay and ocar (samples)")
    p.add_argument("--stiffness", choices=("cap", "fail"), default="cap",
                   help="when an EWC or SI penalty gets too stiff for SGD's step size (lr x curvature >= 2 (1 + "
                        "momentum), where SGD diverges): halve its strength below that and record it, or fail the run")
    p.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: every method runs once per seed")
    p.add_argument("--out", default="out", help="output folder; must be empty (or see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="clear --out's earlier results first")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the interrupted run in DIR from its last finished (method, seed); no other flags")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=ops.BACKENDS, default=None, help="native kernels or pure-torch references")
    p.add_argument("--data-dir", default=None,
                   help=f"folder with the dataset's files (default: {data.DEFAULT_DIR} for fashion-mnist, else ./data"
                        " or $CLFAST_DATA_DIR)")
    p.add_argument("--fraction", type=float, default=1.0, help="use this fraction of the data (quick runs)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--numerics", choices=("portable", "native"), default="portable",
                   help="portable: the same numbers on every x86-64 CPU with AVX2 at one thread count (MKL's "
                        "reproducible AVX2 path, ATen's and oneDNN's AVX2 kernels); native: the CPU's widest kernels")
    methods.add_arguments(p)
    for action in p._actions:  # each preset's value of the flags presets set
        if action.dest in PRESETS["demo"]:
            values = ", ".join(f"{name}: {preset[action.dest]}" for name, preset in sorted(PRESETS.items()))
            action.help = f"{action.help + ' ' if action.help else ''}(preset {values})"
    return p


def _seeds(p: argparse.ArgumentParser, args: argparse.Namespace) -> List[int]:
    if args.seeds is not None and args.seed is not None:
        p.error("--seed and --seeds: give one of them")
    if args.seeds is None:
        seeds = [0 if args.seed is None else args.seed]
        flag = "--seed"
    else:
        flag = "--seeds"
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            p.error(f"--seeds {args.seeds}: not a comma-separated list of integers")
        if not seeds or len(set(seeds)) != len(seeds):
            p.error(f"--seeds {args.seeds}: give distinct seeds")
    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad:
        p.error(f"{flag} {bad[0]}: seeds are integers in [0, {SEED_MAX}]")
    return seeds


def _device(p: argparse.ArgumentParser, name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        p.error(f"--device {name}: not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {name}: the runner trains on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")


def parse_args(argv: Optional[Sequence[str]] = None, p: Optional[argparse.ArgumentParser] = None):
    """The flags, the preset's values filled in, every value checked (a one-line error naming the flag, exit 2)."""
    p = p or parser()
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--buffer-size", args.buffer_size), ("--tasks", args.tasks)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.momentum < 1:
        p.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 < args.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {args.fraction}")
    args.seeds = _seeds(p, args)
    args.seed = args.seeds[0]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        p.error("--methods is empty")
    if len(set(args.methods)) != len(args.methods):
        p.error("--methods names a method twice")
    for m in args.methods:
        try:
            methods.parse(m)
        except ValueError as exc:
            p.error(f"--methods: {exc}")
    error = methods.check(args)
    if error:
        p.error(error)
    if args.scenario == "fellowship":
        if args.dataset not in (None,):
            p.error("--dataset: the fellowship scenario is MNIST, Fashion-MNIST and KMNIST; leave --dataset out")
    else:
        args.dataset = args.dataset or "fashion-mnist"
        classes = data.NUM_CLASSES[args.dataset]
        if args.scenario == "split" and classes % args.tasks:
            p.error(f"--tasks {args.tasks} does not divide {args.dataset}'s {classes} classes")
        shape = data.SHAPES[args.dataset]
        if args.model == "basenet" and shape != (28, 28, 1):
            p.error(f"--model basenet takes 28x28 grey images, not {args.dataset}'s")
    _device(p, args.device)
    if args.backend == "native" and not ops.native_available():
        p.error("--backend native: the extension is not built (make build), use --backend reference")
    return args


def _parse(argv: List[str]):
    """(args, results document or None): --resume reads the folder's own command line."""
    p = parser()
    if "--resume" not in argv and not any(a.startswith("--resume=") for a in argv):
        args = parse_args(argv, p)
        args.created_out = not os.path.exists(args.out)
        try:
            io.prepare(args.out, args.overwrite)
        except io.OutError as exc:
            p.error(str(exc))
        return args, None
    first = p.parse_args(argv)
    others = [a for a in argv if a.startswith("--") and a.split("=")[0] != "--resume"]
    if others:
        p.error(f"--resume continues the run with its own flags; leave out {' '.join(others)}")
    try:
        doc = io.read(first.resume)
        io.check_writable(first.resume)
    except io.OutError as exc:
        p.error(str(exc))
    args = parse_args(doc["argv"], p)
    args.out = first.resume
    return args, doc


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: what has finished is saved."""


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _launch():
        return _entry(argv)
    # A torchrun worker: this process is the run. It leaves without the interpreter's teardown, where gloo's
    # threads can abort it ("terminate called without an active exception") after the results are written, which
    # torchrun would report as this rank failing.
    try:
        code = _entry(argv)
    except SystemExit as exc:  # argparse has printed its error (or the help)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    dist.barrier()  # torchrun stops every rank once one exits non-zero: none leaves before rank 0 has reported
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _entry(argv: List[str]) -> int:
    args, doc = _parse_on_first_rank(argv)
    before = _portable_numerics() if args.numerics == "portable" else {}
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: no handler
        previous = None
    try:
        if _rank() == 0:
            return _main(args, argv, doc)
        # rank 0 reports; the other ranks' errors still reach stderr
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return _main(args, argv, doc)
    finally:  # the libraries have read the variables by now; a caller's environment is left as it was
        _restore(before)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# -- torchrun: every rank runs the experiment, on its share of each batch; rank 0 alone writes and reports --------

def _launch() -> bool:
    """Under ``torchrun`` with several processes (WORLD_SIZE > 1), joins their process group (gloo for CPU
    tensors, NCCL for CUDA ones); True when this call initialised it (then this process is a torchrun worker)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return True


def _rank() -> int:
    return rank_and_world()[0]


def _world() -> int:
    return rank_and_world()[1]


def _parse_on_first_rank(argv: List[str]):
    """_parse on rank 0 (which alone reads and prepares --out), its outcome sent to every rank: the same
    arguments, or the same exit (an error printed once)."""
    if _world() == 1:
        return _checked_for_ranks(*_parse(argv))
    box: List = [None]
    if _rank() == 0:
        try:
            box = [("ok", _parse(argv))]
        except SystemExit as exc:
            box = [("exit", exc.code)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "exit":
        raise SystemExit(value)
    return _checked_for_ranks(*value)


def _checked_for_ranks(args: argparse.Namespace, doc: Optional[Dict]):
    """The per-rank device (``cuda`` is each rank's own, ``cuda:LOCAL_RANK``) and what cannot run on several."""
    world = _world()
    args.world_size = world
    if world == 1:
        return args, doc
    if args.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device != "cuda":
            _exit_all(args, f"--device {args.device}: with {world} processes each rank takes the GPU of its "
                            "LOCAL_RANK; give --device cuda")
        if local >= torch.cuda.device_count():
            _exit_all(args, f"--device cuda: LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA device(s); run "
                            "as many processes per node as GPUs")
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if args.model == "dan" and any("ocar" in methods.parse(m) for m in args.methods):
        _exit_all(args, "--model dan: OCAR's ema Fisher recomputes a DAN layer on the rank's own batch statistics, "
                        "which sync_batchnorm does not reach; run ocar on one process or on another model")
    return args, doc


def _exit_all(args: argparse.Namespace, message: str) -> None:
    """Every rank exits 2 (each decides it alike), as :func:`_refuse` says."""
    raise SystemExit(_refuse(args, message))


class Progress:
    """One flushed line per task on stderr (and per epoch, for epochs over EPOCH_LINE_S), with the elapsed time
    and an ETA over the whole experiment; on a terminal, a progress bar too."""

    EPOCH_LINE_S = 30.0

    def __init__(self, total_steps: int) -> None:
        self.total, self.done, self.start = max(1, total_steps), 0, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.bar = None

    def begin(self, label: str, steps: int, num_tasks: int, epochs: int) -> "Progress":
        self.label, self.num_tasks, self.epochs, self.epoch_start = label, num_tasks, epochs, time.perf_counter()
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=label, leave=False, file=sys.stderr)
        return self

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()

    def epoch(self, task: int, epoch: int, loss: float, accuracy: float) -> None:
        took, self.epoch_start = time.perf_counter() - self.epoch_start, time.perf_counter()
        last = epoch == self.epochs - 1
        if not last and took < self.EPOCH_LINE_S:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, self.done) * (self.total - self.done)
        at = f"task {task + 1}/{self.num_tasks}" + (f" epoch {epoch + 1}/{self.epochs}" if self.epochs > 1 else "")
        line = (f"  {self.label} | {at} | loss {loss:.4g} | accuracy on it {100 * accuracy:.1f}% | "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _config(args, scenario) -> Dict:
    config = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "resume", "created_out")}
    config.update(backend=ops.backend(), world_size=_world(), num_tasks=len(scenario.train), task_il=scenario.task_il,
                  classes_per_task=[t.classes for t in scenario.train],
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), num_threads=torch.get_num_threads(),
                  numerics_env={k: os.environ.get(k) for k in PORTABLE_NUMERICS}, cpu=_cpu())
    return config


def _main(args: argparse.Namespace, argv: List[str], doc: Optional[Dict]) -> int:
    backend = ops.backend()
    if args.backend:
        ops.set_backend(args.backend)
    try:
        return _experiment(args, argv, doc)
    finally:  # a caller's backend is left as it was
        ops.set_backend(backend)


def _experiment(args: argparse.Namespace, argv: List[str], doc: Optional[Dict]) -> int:
    resumed = doc is not None
    first = _rank() == 0  # under torchrun rank 0 alone writes the results and draws the figures
    if not resumed:
        doc = io.metadata(argv, torch.get_num_threads(), args.device)
    doc.setdefault("resumed_at", [])
    if resumed:
        doc["resumed_at"].append(io.now())
    runs: Dict[str, List[Dict]] = {m: list(doc.get("methods", {}).get(m, {}).get("runs", [])) for m in args.methods}
    todo = [(s, m) for s in args.seeds for m in args.methods if s not in [r["seed"] for r in runs[m]]]
    dataset = args.dataset or "mnist+fashion-mnist+kmnist"
    print(f"clfast {__version__}: {args.scenario} {dataset}, model {args.model}, {args.epochs} epoch(s) per task, "
          f"SGD lr {args.lr} momentum {args.momentum}, batch {args.batch_size}, seeds {args.seeds}, backend "
          f"{ops.backend()}, device {args.device}, numerics {args.numerics} "
          f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
          + (f" in each of {_world()} processes)" if _world() > 1 else ")")
          + (f"; resuming {len(todo)} of {len(args.seeds) * len(args.methods)} runs" if resumed else ""), flush=True)
    scenario, built_for, progress = None, None, None
    try:
        for seed in args.seeds:
            if not any(s == seed for s, _ in todo):
                continue
            key = seed if args.scenario == "permuted" or args.fraction < 1 else None  # what the data depends on
            if scenario is None or key != built_for:
                try:
                    scenario = scenarios.build(args.scenario, args.dataset or "fashion-mnist", args.data_dir,
                                               tasks=args.tasks, seed=seed, fraction=args.fraction)
                except (FileNotFoundError, ValueError) as exc:
                    return _refuse(args, str(exc))
                built_for = key
                problem = loop.empty_share(scenario, args.batch_size, _world())  # the same verdict on every rank
                if problem:
                    return _refuse(args, problem)
                doc["config"] = _config(args, scenario)
                if first:
                    io.write_results(args.out, _with_methods(doc, runs, args.methods), scenario.task_il)
            steps = args.epochs * sum(-(-len(t.y) // args.batch_size) for t in scenario.train)
            if progress is None and first:
                progress = Progress(steps * len(todo))
            for method in args.methods:
                if (seed, method) not in todo:
                    continue
                label = f"[{todo.index((seed, method)) + 1}/{len(todo)}] {method} seed {seed}"
                if progress is not None:
                    progress.begin(label, steps, len(scenario.train), args.epochs)
                try:
                    record = loop.train(method, scenario, args, seed, progress)
                except loop.RunFailed as exc:
                    record = {"seed": seed, "status": "failed", "error": str(exc),
                              "failed_at": {"task": exc.task, "step": exc.step}}
                finally:
                    if progress is not None:
                        progress.end()
                reports = record.pop("_reports", {})
                runs[method].append(record)
                if not first:
                    continue
                io.write_results(args.out, _with_methods(doc, runs, args.methods), scenario.task_il)
                if "fisher" in reports and not args.no_plots and seed == args.seeds[0]:
                    plots.fisher(args.out, method, seed, reports["fisher"])
                _report(method, seed, record, scenario.task_il)
    except KeyboardInterrupt as exc:
        done = sum(len(r) for r in runs.values())
        doc["interrupted_at"] = io.now()
        if not first:
            return 130
        if scenario is not None:
            io.write_results(args.out, _with_methods(doc, runs, args.methods), scenario.task_il)
        io.clear_partial(args.out)
        why = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        if scenario is None and not resumed:
            print(f"\n{why} before any run started", file=sys.stderr, flush=True)
        else:
            print(f"\n{why}: the {done} finished run(s) of {len(args.seeds) * len(args.methods)} are saved in "
                  f"{os.path.abspath(args.out)}; continue with: python -m clfast --resume {args.out}",
                  file=sys.stderr, flush=True)
        return 130
    scenario = None
    _trim()  # the runs' freed memory goes back to the system before the figures are drawn
    doc = _with_methods(doc, runs, args.methods)
    doc["finished_at"], doc["complete"] = io.now(), True
    doc.pop("interrupted_at", None)
    task_il = doc["config"]["task_il"]
    if first:
        io.write_results(args.out, doc, task_il)
    if first and not args.no_plots:
        plots.draw(args.out, doc)
    print()
    print(io.table(doc["methods"], task_il))
    print(f"\nresults, CSV files{'' if args.no_plots else ' and figures'} in {os.path.abspath(args.out)}")
    failed = [m for m, e in doc["methods"].items() if e["status"] != "ok"]
    if failed and first:
        print(f"failed: {', '.join(failed)} (see above; their numbers are not results)", file=sys.stderr)
    return 1 if failed else 0


def _refuse(args: argparse.Namespace, message: str) -> int:
    """Exit 2 before any run, leaving no output folder behind that this command created (every rank returns it)."""
    if _rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
        if getattr(args, "created_out", False) and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # nothing is left behind
    return 2


def _trim() -> None:
    """Returns the heap's free pages to the system (glibc's malloc_trim), so what is drawn next does not add to
    the memory the finished runs left resident."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _with_methods(doc: Dict, runs: Dict[str, List[Dict]], order: List[str]) -> Dict:
    doc["methods"] = {m: io.method_entry(runs[m]) for m in order if runs[m]}
    return doc


def _report(method: str, seed: int, r: Dict, task_il: bool) -> None:
    if r["status"] != "ok":
        print(f"  {method:<14} seed {seed}: failed: {r['error']}", flush=True)
        return
    til = f", task-IL {100 * r['average_accuracy_task_il']:.1f}%" if task_il else ""
    print(f"  {method:<14} seed {seed}: average accuracy {100 * r['average_accuracy']:.1f}%{til}, "
          f"BWT {100 * r['bwt']:.1f}%, forgetting {100 * r['forgetting']:.1f}%, {r['wall_time_s']:.1f} s", flush=True)


# --numerics portable. Each library reads its variable when it first computes, so they are set before the data
# loads; one the user has set is kept. Without them MKL, ATen and oneDNN pick their kernels by CPU, and the
# demo's accuracies differed between an AVX-512 and an AVX2 CPU. MKL honours AVX2 on Intel CPUs only (elsewhere
# it picks by CPU); MKL_CBWR=COMPATIBLE is the same on every vendor, at a large cost in GEMM time.
PORTABLE_NUMERICS = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _portable_numerics() -> Dict[str, Optional[str]]:
    """Sets PORTABLE_NUMERICS where unset (x86-64 only); returns the previous values, for _restore."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    before = {k: os.environ.get(k) for k in PORTABLE_NUMERICS}
    for k, v in PORTABLE_NUMERICS.items():
        os.environ.setdefault(k, v)
    return before


def _cpu() -> str:
    """The CPU's vendor and model, as results.json records them (reproducibility depends on the vendor)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return " ".join(v for v in (info.get("vendor_id"), info.get("model name")) if v) or platform.processor()


def _restore(before: Dict[str, Optional[str]]) -> None:
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
