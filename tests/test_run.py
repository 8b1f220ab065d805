"""The experiment runner end to end on tiny generated datasets (and the real Fashion-MNIST where installed)."""
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clfast.experiments import cli, data, io, loop, methods, scenarios

from test_data import fake_datasets, fake_fmnist  # noqa: F401  (fixtures)

pytest.importorskip("continuum")

ROOT = Path(__file__).resolve().parents[1]
# small steps of momentum SGD that every method learns the generated tasks with
QUICK = ["--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--momentum", "0.5", "--buffer-size", "50",
         "--fisher-samples", "64", "--ewc-lambda", "10", "--si-strength", "0.1", "--cbp-maturity", "5",
         "--cbp-rate", "0.01", "--no-plots"]
# fields that differ between two runs of the same experiment: clocks and timings
TIMINGS = {"started_at", "finished_at", "interrupted_at", "resumed_at", "wall_time_s", "consolidation_s", "steps_per_s",
           "peak_rss_mb",
           "command", "argv"}


def _run(tmp_path, data_dir, *extra, name="out", code=0):
    out = tmp_path / name
    assert cli.main(["--data-dir", str(data_dir), "--out", str(out), *QUICK, *extra]) == code
    return json.loads((out / "results.json").read_text()), out


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in cli.PORTABLE_NUMERICS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def _strip(doc):
    """``doc`` without clocks and timings, for comparing two runs of one experiment."""
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in TIMINGS}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def test_every_method_runs_and_writes_well_formed_results(tmp_path, fake_fmnist):  # noqa: F811
    names = "finetune,replay,ewc,si,ocar,cbp,cbp+replay,ewc+replay"
    doc, out = _run(tmp_path, fake_fmnist, "--methods", names)
    assert doc["schema_version"] == io.SCHEMA_VERSION and doc["complete"] is True
    assert set(doc["versions"]) >= {"clfast", "torch", "nngeometry", "continuum", "python"}
    assert doc["versions"]["torch"] == torch.__version__.split("+")[0] or doc["versions"]["torch"]
    assert doc["command"][1:3] == ["-m", "clfast"] and doc["threads"] == torch.get_num_threads()
    assert doc["device"] == "cpu" and doc["started_at"] <= doc["finished_at"]
    assert doc["git_commit"] is None or len(doc["git_commit"]) == 40
    assert list(doc["methods"]) == names.split(",")
    assert doc["config"]["scenario"] == "split" and doc["config"]["num_tasks"] == 5
    for name, entry in doc["methods"].items():
        assert entry["status"] == "ok" and entry["error"] is None and entry["seeds"] == [0]
        assert entry["average_accuracy"]["n"] == 1 and entry["average_accuracy"]["std"] == 0
        (r,) = entry["runs"]
        assert r["status"] == "ok" and r["seed"] == 0
        assert len(r["acc_matrix"]) == 5 and all(len(row) == 5 for row in r["acc_matrix"])
        assert entry["average_accuracy"]["mean"] == r["average_accuracy"] == np.mean(r["acc_matrix"][-1])
        assert 0 <= r["average_accuracy_task_il"] <= 1 and len(r["baseline"]) == 5
        assert r["steps_per_s"] > 0 and r["wall_time_s"] > 0 and len(r["curves"]) == 5
        assert (out / f"{io.safe(name)}_seed0_acc_matrix.csv").exists()
    assert (out / "summary.txt").read_text().count("\n") == len(names.split(",")) + 2


def test_results_schema_is_documented_in_the_readme(tmp_path, fake_fmnist):  # noqa: F811
    doc, _ = _run(tmp_path, fake_fmnist, "--methods", "ewc")
    readme = (ROOT / "README.md").read_text()
    schema = readme[readme.index("### results.json"):]
    schema = schema[:schema.index("\n## ")]
    entry = doc["methods"]["ewc"]
    keys = set(doc) | set(entry) | set(entry["runs"][0]) | set(doc["versions"])
    missing = sorted(k for k in keys if f"`{k}`" not in schema)
    assert not missing, f"README's results.json section does not describe {missing}"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or
                    torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="an x86-64 CPU with AVX2")
def test_portable_numerics_pick_the_avx2_kernels_everywhere(tmp_path, fake_fmnist):  # noqa: F811
    """In a fresh process, as `python -m clfast` runs: MKL, ATen and oneDNN take their AVX2 code paths whatever
    the CPU has (so an AVX-512 and an AVX2 machine give the same numbers); --numerics native leaves them be;
    the caller's environment is restored."""
    code = ("import json, os, sys; from clfast.experiments import cli; code = cli.main(sys.argv[1:]); "
            "assert not any(k in os.environ for k in cli.PORTABLE_NUMERICS); sys.exit(code)")
    config = {}
    for numerics in ("portable", "native"):
        out = tmp_path / numerics
        r = subprocess.run([sys.executable, "-c", code, "--data-dir", str(fake_fmnist), "--out", str(out), *QUICK,
                            "--methods", "finetune", "--numerics", numerics], env=_env(), capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        config[numerics] = json.loads((out / "results.json").read_text())["config"]
    assert config["portable"]["cpu_capability"] == "AVX2"
    assert config["portable"]["numerics_env"] == cli.PORTABLE_NUMERICS
    assert config["native"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert all(v is None for v in config["native"]["numerics_env"].values())


DEMO = ROOT / "benchmarks" / "results" / "demo" / "results.json"


def test_make_run_reproduces_the_stored_demo(tmp_path):
    """`make run`'s experiment on the real Fashion-MNIST gives benchmarks/results/demo's accuracy matrices exactly,
    at the thread count they were recorded with, on a CPU of the same vendor (MKL's portable path is per vendor)."""
    stored = json.loads(DEMO.read_text())
    config = stored["config"]
    if not all(os.path.exists(os.path.join(data.DEFAULT_DIR, f)) for f in data.FILES.values()):
        pytest.skip(f"Fashion-MNIST is not in {data.DEFAULT_DIR} (make data installs it)")
    if cli._cpu().split()[:1] != config["cpu"].split()[:1]:
        pytest.skip(f"recorded on {config['cpu']!r}, this CPU is {cli._cpu()!r}")
    threads = str(config["num_threads"])
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "clfast", "--data-dir", data.DEFAULT_DIR, "--out", str(out),
                        "--no-plots"], env=_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    new = json.loads((out / "results.json").read_text())
    assert new["config"]["cpu_capability"] == config["cpu_capability"]
    assert list(new["methods"]) == config["methods"]
    for method, entry in stored["methods"].items():
        for key in ("acc_matrix", "acc_matrix_task_il"):
            assert new["methods"][method]["runs"][0][key] == entry["runs"][0][key], (method, key)


def test_seeded_rerun_is_identical(tmp_path, fake_fmnist):  # noqa: F811
    a, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,si,ocar", name="a")
    b, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,si,ocar", name="b")
    assert _strip(a["methods"]) == _strip(b["methods"])


def test_reference_backend_gives_the_same_accuracies(tmp_path, fake_fmnist):  # noqa: F811
    native, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,ewc,si,cbp", name="n")
    ref, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,ewc,si,cbp", "--backend", "reference", name="r")
    for name in native["methods"]:
        a, b = (doc["methods"][name]["runs"][0]["acc_matrix"] for doc in (native, ref))
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=0.03)


def test_several_seeds_give_mean_and_std(tmp_path, fake_fmnist):  # noqa: F811
    doc, out = _run(tmp_path, fake_fmnist, "--methods", "finetune,si", "--seeds", "0,1")
    for name, entry in doc["methods"].items():
        assert entry["seeds"] == [0, 1] and [r["seed"] for r in entry["runs"]] == [0, 1]
        assert entry["runs"][0]["baseline"] != entry["runs"][1]["baseline"]  # the seeds differ
        for key in ("average_accuracy", "bwt"):
            a, b = (r[key] for r in entry["runs"])
            assert entry[key] == pytest.approx({"mean": (a + b) / 2, "std": abs(a - b) / 2 ** 0.5, "n": 2})
        for key in ("average_accuracy_task_il", "bwt", "forgetting", "fwt"):
            assert set(entry[key]) == {"mean", "std", "n"}
    # one seed of the pair is the same run as --seed alone
    single, _ = _run(tmp_path, fake_fmnist, "--methods", "finetune", "--seed", "1", name="one")
    assert _strip(single["methods"]["finetune"]["runs"][0]) == _strip(doc["methods"]["finetune"]["runs"][1])
    table = (out / "summary.txt").read_text()
    assert "±" in table.splitlines()[2]


def test_figures_are_drawn_for_each_method_with_bands(tmp_path, fake_fmnist, monkeypatch):  # noqa: F811
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    saved = {}
    real = plt.Figure.savefig

    def keep(fig, path, *a, **k):
        saved[os.path.basename(str(path))] = fig
        return real(fig, path, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    out = tmp_path / "plots"
    assert cli.main(["--data-dir", str(fake_fmnist), "--out", str(out), *QUICK[:-1], "--methods", "finetune,ewc",
                     "--seeds", "0,1"]) == 0
    for png in ("acc_matrix_finetune.png", "acc_matrix_ewc.png", "average_accuracy.png", "task_accuracy.png",
                "fisher_ewc.png"):
        assert (out / png).stat().st_size > 5000, png
    for ax in saved["average_accuracy.png"].axes:  # a std band per method, class-IL and task-IL
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2
        assert ax.get_xlabel() == "tasks trained" and ax.get_ylabel()
    heat = saved["acc_matrix_ewc.png"].axes[0]
    assert heat.get_xlabel() == "evaluated on task" and len(heat.texts) == 25  # every cell annotated
    from PIL import Image

    width, height = Image.open(out / "task_accuracy.png").size
    assert width <= 2200 and height >= 400  # readable panels, not a 2304x360 strip
    boundaries = [line for line in saved["task_accuracy.png"].axes[0].lines if line.get_linestyle() == "--"]
    assert len(boundaries) == 4


def test_the_fisher_figure_has_labelled_axes_on_a_log_scale(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import LogNorm
    import matplotlib.pyplot as plt

    from clfast import EWC
    from clfast.experiments import plots
    from clfast.experiments.models import MLP

    torch.manual_seed(0)
    model = MLP(hidden=8)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for representation in ("diag", "kfac"):
        ewc = EWC(model, representation)
        ewc.consolidate(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
        shown = []
        real = plt.Figure.savefig

        def keep(fig, *a, **k):
            shown.append(fig)
            return real(fig, *a, **k)

        plt.Figure.savefig = keep
        try:
            plots.fisher(str(tmp_path), representation, 0, ewc.fishers[0])
        finally:
            plt.Figure.savefig = real
        images = [ax for ax in shown[0].axes if ax.images]
        assert len(images) == (2 if representation == "kfac" else 1)
        for ax in images:
            assert ax.get_xlabel() and ax.get_ylabel()
            assert isinstance(ax.images[0].norm, LogNorm)


def test_permuted_scenario(tmp_path, fake_fmnist):  # noqa: F811
    doc, _ = _run(tmp_path, fake_fmnist, "--scenario", "permuted", "--tasks", "3", "--methods", "ewc",
                  "--ewc-representation", "kfac")
    r = doc["methods"]["ewc"]["runs"][0]
    assert len(r["acc_matrix"]) == 3 and "average_accuracy_task_il" not in r
    assert "average_accuracy_task_il" not in doc["methods"]["ewc"]


def test_scenarios_are_held_as_bytes(fake_fmnist):  # noqa: F811
    """Every task is stored as uint8 and converted per batch, to the values continuum's ToTensor gives."""
    from continuum import Permutations
    from continuum.datasets import InMemoryDataset

    s = scenarios.build("permuted", "fashion-mnist", str(fake_fmnist), tasks=3, seed=4)
    assert all(t.x.dtype == torch.uint8 for t in s.train + s.test)
    x_tr, y_tr, _, _ = data.load_fashion_mnist(str(fake_fmnist))
    taskset = Permutations(InMemoryDataset(x_tr, y_tr), nb_tasks=3, seed=4)[2]
    x, _, _ = next(iter(torch.utils.data.DataLoader(taskset, batch_size=len(y_tr))))
    assert torch.equal(s.train[2].inputs(slice(None), "cpu"), x)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "magic"], "--methods: unknown method part"),
    (["--methods", "ocar+replay"], "ocar already replays"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--scenario", "cifar"], "--scenario: invalid choice"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--seed", "-1"], "--seed -1"),
    (["--seeds", "0,x"], "--seeds 0,x"),
    (["--seeds", "1,1"], "--seeds 1,1"),
    (["--seed", "1", "--seeds", "2,3"], "--seed and --seeds"),
    (["--lr", "nan"], "--lr must be"),
    (["--momentum", "-1"], "--momentum must be in [0, 1)"),
    (["--ewc-lambda", "-5"], "--ewc-lambda must be >= 0"),
    (["--ewc-gamma", "2"], "--ewc-gamma must be in [0, 1]"),
    (["--si-strength", "-1"], "--si-strength must be >= 0"),
    (["--si-epsilon", "0"], "--si-epsilon must be > 0"),
    (["--ocar-damping", "0"], "--ocar-damping must be > 0"),
    (["--cbp-rate", "5"], "--cbp-rate must be in [0, 1]"),
    (["--cbp-decay", "1"], "--cbp-decay must be in [0, 1)"),
    (["--fisher-samples", "0"], "--fisher-samples must be >= 1"),
    (["--tasks", "3"], "--tasks 3 does not divide"),
    (["--scenario", "fellowship", "--dataset", "mnist"], "--dataset: the fellowship scenario"),
    (["--dataset", "cifar10", "--model", "basenet"], "--model basenet takes 28x28"),
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--resume", "/nonexistent"], "--resume /nonexistent: no results.json"),
    (["--resume", "/tmp", "--epochs", "2"], "--resume continues the run with its own flags"),
])
def test_bad_cli_input_is_a_one_line_error_before_any_data_is_loaded(tmp_path, argv, message, capsys):
    # the data folder does not exist: a value checked after loading would give the missing-data error instead
    where = [] if "--resume" in argv else ["--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        cli.main([*where, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_help_shows_each_presets_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(preset demo: 0.01, seed: 0.002)" in text and "(default: None)" not in text
    assert "(preset demo: 100.0, seed: 1000.0)" in text


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_a_failed_method_is_never_a_result_and_the_others_still_run(tmp_path, fake_fmnist, capsys):  # noqa: F811
    doc, out = _run(tmp_path, fake_fmnist, "--methods", "si,finetune", "--si-strength", "1e12", "--stiffness",
                    "fail", code=1)
    assert doc["methods"]["finetune"]["status"] == "ok" and doc["complete"] is True
    si = doc["methods"]["si"]
    assert si["status"] == "failed" and si["average_accuracy"] is None and si["error"].startswith("seed 0: task 1/5")
    (run,) = si["runs"]
    assert run["status"] == "failed" and "acc_matrix" not in run and "average_accuracy" not in run
    assert run["failed_at"]["task"] == 1 and run["failed_at"]["step"] > 0  # at the first consolidation
    assert f"si             seed 0: failed: task 1/5, step {run['failed_at']['step']}" in capsys.readouterr().out
    assert (out / "summary.txt").read_text().splitlines()[2].startswith("si              failed: seed 0")
    assert not list(out.glob("si_*.csv"))


def test_a_diverging_run_is_failed_at_the_step_it_went_non_finite(tmp_path, fake_fmnist):  # noqa: F811
    doc, _ = _run(tmp_path, fake_fmnist, "--methods", "finetune", "--lr", "1e4", code=1)
    run = doc["methods"]["finetune"]["runs"][0]
    assert "the loss is" in run["error"] and run["failed_at"]["task"] == 1
    assert f"task 1/5, step {run['failed_at']['step']}: the loss is" in run["error"]


def test_a_non_finite_loss_names_the_step_it_went_non_finite():
    model = torch.nn.Linear(2, 2)
    strategy = loop.Strategy(model=model, args=None, device=torch.device("cpu"), generator=torch.Generator())
    strategy.step = 10
    with pytest.raises(loop.Diverged, match="the loss is inf"):
        loop._check_finite(model, torch.tensor([1.0, 2.0, float("inf"), float("nan")]), strategy)
    assert strategy.step == 9  # steps 7..10 were the epoch's; the third went non-finite
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(loop.Diverged, match="parameter weight is not finite"):
        loop._check_finite(model, torch.ones(3), strategy)


def test_a_method_that_learns_nothing_is_failed(tmp_path, fake_fmnist):  # noqa: F811
    doc, _ = _run(tmp_path, fake_fmnist, "--methods", "finetune", "--lr", "1e-9", code=1)
    run = doc["methods"]["finetune"]["runs"][0]
    assert run["failed_at"]["task"] == 1 and "at chance" in run["error"]


def test_out_must_be_writable_and_empty(tmp_path, fake_fmnist, capsys):  # noqa: F811
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "exists and is not a folder"),
                         (tmp_path / "file" / "sub", "cannot create it")):
        with pytest.raises(SystemExit):
            cli.main(["--data-dir", str(fake_fmnist), "--out", str(out)])
        assert message in capsys.readouterr().err
    _, out = _run(tmp_path, fake_fmnist, "--methods", "finetune,replay")
    with pytest.raises(SystemExit):
        cli.main(["--data-dir", str(fake_fmnist), "--out", str(out), *QUICK])
    assert "is not empty" in capsys.readouterr().err
    # --overwrite clears the earlier run's files: no replay CSV is left next to the new results
    doc, _ = _run(tmp_path, fake_fmnist, "--methods", "finetune", "--overwrite")
    assert list(doc["methods"]) == ["finetune"] and not list(out.glob("replay_*"))
    (out / "notes.md").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(["--data-dir", str(fake_fmnist), "--out", str(out), "--overwrite", *QUICK])
    assert "holds files clfast did not write (notes.md)" in capsys.readouterr().err
    assert (out / "notes.md").exists() and (out / "results.json").exists()


def _wait_for(path, test, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            return False
        try:
            if test(json.loads(path.read_text())):
                return True
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_keeps_finished_runs_and_resume_completes_them(tmp_path, fake_fmnist, sig):  # noqa: F811
    # 8 runs: the interrupt, sent once the first has finished, reaches a run still going even on a busy machine
    flags = ["--data-dir", str(fake_fmnist), *QUICK, "--epochs", "2", "--methods", "finetune,si", "--seeds", "0,1,2,3"]
    out = tmp_path / "run"
    # a process started in the background inherits SIGINT ignored, and Python then installs no handler for it
    proc = subprocess.Popen([sys.executable, "-m", "clfast", "--out", str(out), *flags], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    header = proc.stdout.readline()  # flushed at the start, before any training
    assert header.startswith("clfast ") and proc.poll() is None
    assert _wait_for(out / "results.json", lambda d: "finetune" in d["methods"], proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert f"--resume {out}" in stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is False and doc["interrupted_at"] and doc["finished_at"] is None
    finished = [(r["seed"], m) for m, e in doc["methods"].items() for r in e["runs"]]
    assert 1 <= len(finished) < 8 and (0, "finetune") in finished
    assert all(len(r["acc_matrix"]) == 5 for e in doc["methods"].values() for r in e["runs"])
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # resume finishes the rest; the result is the uninterrupted run's
    r = subprocess.run([sys.executable, "-m", "clfast", "--resume", str(out)], env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {8 - len(finished)} of 8 runs" in r.stdout
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["complete"] is True and len(resumed["resumed_at"]) == 1
    whole = tmp_path / "whole"
    r = subprocess.run([sys.executable, "-m", "clfast", "--out", str(whole), *flags], env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _strip(resumed) == _strip(json.loads((whole / "results.json").read_text()))
    # nothing left to resume
    r = subprocess.run([sys.executable, "-m", "clfast", "--resume", str(out)], env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0 and "resuming 0 of 8 runs" in r.stdout


def test_progress_is_one_flushed_line_per_task_when_not_a_terminal(tmp_path, fake_fmnist):  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "clfast", "--data-dir", str(fake_fmnist), "--out", str(tmp_path / "o"),
                        *QUICK, "--methods", "finetune,replay"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "| task " in line]
    assert len(lines) == 2 * 5
    assert lines[0].lstrip().startswith("[1/2] finetune seed 0 | task 1/5") and "ETA" in lines[0]
    assert "elapsed" in lines[-1] and "\r" not in r.stderr


def test_import_clfast_leaves_the_runner_alone():
    code = "import sys, clfast; sys.exit(any(m.startswith('clfast.experiments') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], env=_env()).returncode == 0


def test_a_plugin_file_adds_a_method(tmp_path, fake_fmnist, monkeypatch):  # noqa: F811
    """A method is one file: a Plugin subclass with a name, its flags and checks, found without registration."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "halve.py").write_text(
        "from clfast.experiments.methods import Plugin\n"
        "class HalvePlugin(Plugin):\n"
        "    name = 'halve'\n"
        "    help = 'halves the loss'\n"
        "    calls = []\n"
        "    @staticmethod\n"
        "    def add_arguments(group):\n"
        "        group.add_argument('--halve-by', type=float, default=2.0)\n"
        "    def before_backward(self, strategy):\n"
        "        self.calls.append(strategy.step)\n"
        "        strategy.loss = strategy.loss / strategy.args.halve_by\n")
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path / "plugins")])
    assert "halve" in methods.names()
    doc, _ = _run(tmp_path, fake_fmnist, "--methods", "halve+replay", "--halve-by", "1.5")
    assert doc["methods"]["halve+replay"]["status"] == "ok"
    plugin = methods.registry()["halve"]
    assert plugin.calls == list(range(doc["methods"]["halve+replay"]["runs"][0]["steps"]))


@pytest.mark.parametrize("dataset", ["mnist", "kmnist", "cifar10"])
def test_datasets_on_disk_run(tmp_path, fake_datasets, dataset):  # noqa: F811
    doc, _ = _run(tmp_path, fake_datasets, "--dataset", dataset, "--methods", "finetune", "--epochs", "3")
    assert doc["config"]["dataset"] == dataset and doc["methods"]["finetune"]["status"] == "ok"


def test_fellowship_runs_from_local_files(tmp_path, fake_datasets):  # noqa: F811
    doc, _ = _run(tmp_path, fake_datasets, "--scenario", "fellowship", "--methods", "finetune", "--epochs", "3")
    assert doc["config"]["num_tasks"] == 3 and doc["config"]["classes_per_task"][2] == list(range(20, 30))


def test_fellowship_without_files_names_them_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--scenario", "fellowship", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    assert "MNIST/raw/train-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # neither a data folder nor the output folder


def test_dan_model_runs_and_matches_reference_backend(tmp_path, fake_fmnist):  # noqa: F811
    native, _ = _run(tmp_path, fake_fmnist, "--model", "dan", "--methods", "finetune,replay,si", name="native")
    ref, _ = _run(tmp_path, fake_fmnist, "--model", "dan", "--methods", "finetune,replay,si", "--backend",
                  "reference", name="ref")
    for name, entry in native["methods"].items():
        a, b = entry["runs"][0], ref["methods"][name]["runs"][0]
        assert len(a["acc_matrix"]) == 5
        assert a["average_accuracy"] == pytest.approx(b["average_accuracy"], abs=0.02)


def test_dan_model_runs_the_fisher_methods(tmp_path, fake_fmnist):  # noqa: F811
    """EWC (diag and per-neuron KFAC) and OCAR (ema and exact) on the DAN, its Fisher by clfast.fisher."""
    doc, _ = _run(tmp_path, fake_fmnist, "--model", "dan", "--methods", "ewc,ocar", name="defaults")
    kfac, _ = _run(tmp_path, fake_fmnist, "--model", "dan", "--methods", "ewc,ocar", "--ewc-representation", "kfac",
                   "--ocar-fisher", "exact", name="kfac")
    for result in (doc, kfac):
        for name in ("ewc", "ocar"):
            run = result["methods"][name]["runs"][0]
            assert result["methods"][name]["status"] == "ok" and len(run["acc_matrix"]) == 5
            assert all(math.isfinite(a) for row in run["acc_matrix"] for a in row if a is not None)
        assert result["methods"]["ewc"]["runs"][0]["consolidation_s"] > 0


def test_dan_model_refuses_nngeometrys_fisher_clearly(tmp_path, fake_fmnist, capsys):  # noqa: F811
    doc, _ = _run(tmp_path, fake_fmnist, "--model", "dan", "--methods", "finetune,ewc", "--fisher-backend",
                  "nngeometry", code=1)
    assert "nngeometry's FIM cannot hook clfast.nn DAN layers" in doc["methods"]["ewc"]["error"]
    assert "use fisher_backend='auto' or 'clfast'" in capsys.readouterr().out


def test_largest_eigenvalue_of_summed_fishers_matches_the_dense_matrices():
    from clfast import EWC
    from clfast.experiments.methods.ewc import largest_eigenvalue

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    loaders = [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 12) + k,
                                                                          torch.randint(0, 3, (40,))), batch_size=20)
               for k in range(2)]
    for representation in ("diag", "kfac", "dense", "blockdiag"):
        ewc = EWC(model, representation, mode="online", gamma=0.5)
        for loader in loaders:
            ewc.consolidate(loader)
        dense = sum(c * f.to_torch().double() for c, f in zip(ewc.coefficients, ewc.fishers))
        if representation in ("kfac", "blockdiag"):  # per layer block: the largest over the blocks
            sizes = [6 * 12 + 6, 3 * 6 + 3]
            blocks, start = [], 0
            for n in sizes:
                blocks.append(dense[start:start + n, start:start + n])
                start += n
            expected = max(float(torch.linalg.eigvalsh(b)[-1]) for b in blocks)
        else:
            expected = float(torch.linalg.eigvalsh(dense)[-1])
        assert ewc.coefficients == [0.5, 1.0]
        assert largest_eigenvalue(ewc.fishers, ewc.coefficients) == pytest.approx(expected, rel=1e-4), representation


@pytest.mark.parametrize("flags, message", [
    (["--methods", "ewc", "--ewc-representation", "kfac", "--ewc-lambda", "1e6"], "EWC's penalty is too stiff"),
    (["--methods", "si", "--si-strength", "1e6"], "SI's penalty is too stiff"),
])
def test_a_penalty_too_stiff_for_the_step_size_is_capped_or_fails(tmp_path, fake_fmnist, flags, message):  # noqa: F811
    """Heavy-ball SGD diverges on a quadratic once lr x curvature >= 2 (1 + momentum): past that, the strength is
    halved below the limit and the change recorded (--stiffness cap), or the run fails when it is consolidated,
    naming a strength that would be stable (--stiffness fail)."""
    doc, _ = _run(tmp_path, fake_fmnist, *flags, name="capped")
    (run,) = next(iter(doc["methods"].values()))["runs"]
    first = run["strength_changes"][0]
    assert first["task"] == 1 and first["flag"] == flags[-2] and first["from"] == 1e6
    assert first["to"] == pytest.approx(1e6 * first["limit"] / first["curvature"] / 2)
    assert all(c["task"] < 5 for c in run["strength_changes"])  # none after the last task
    doc, _ = _run(tmp_path, fake_fmnist, *flags, "--stiffness", "fail", code=1)
    (run,) = next(iter(doc["methods"].values()))["runs"]
    assert run["failed_at"]["task"] == 1 and message in run["error"]
    flag = flags[-2]
    stable = float(run["error"].split(f"{flag} below ")[1].split()[0])
    assert 0 < stable < 1e6
    doc = json.loads((tmp_path / "stable" / "results.json").read_text()) if cli.main(
        ["--data-dir", str(fake_fmnist), "--out", str(tmp_path / "stable"), *QUICK, *flags[:-1], str(stable / 2)]) \
        in (0, 1) else None
    (run,) = next(iter(doc["methods"].values()))["runs"]
    assert run["status"] == "ok" or run["failed_at"]["task"] > 1  # past the task whose bound it was


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs gloo")
def test_torchrun_with_two_processes_gives_one_processs_results(tmp_path, fake_fmnist):  # noqa: F811
    """Each rank trains on its half of every batch; rank 0 alone writes. The methods are deterministic, so the
    accuracies equal one process's on the same global batches (up to a prediction flipped by rounding)."""
    flags = ["--data-dir", str(fake_fmnist), *QUICK, "--methods", "finetune,replay,ewc,si,cbp", "--tasks", "2"]
    one, _ = _run(tmp_path, fake_fmnist, "--methods", "finetune,replay,ewc,si,cbp", "--tasks", "2", name="one")
    out = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "clfast", "--out", str(out), *flags], env=_env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".json") == ["results.json"]
    assert r.stdout.count("average accuracy") == 5  # rank 0 alone reports
    two = json.loads((out / "results.json").read_text())
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    for method, entry in one["methods"].items():
        a, b = entry["runs"][0], two["methods"][method]["runs"][0]
        assert a["status"] == b["status"] == "ok", (method, b.get("error"))
        assert a["steps"] == b["steps"]
        for key in ("acc_matrix", "acc_matrix_task_il"):  # 150 test images per task: at most one flipped
            np.testing.assert_allclose(b[key], a[key], atol=0.01, err_msg=f"{method} {key}")
        assert [c["flag"] for c in a["strength_changes"]] == [c["flag"] for c in b["strength_changes"]]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs gloo")
def test_torchrun_refuses_a_batch_some_rank_would_get_nothing_of(tmp_path, fake_fmnist):  # noqa: F811
    out = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "clfast", "--out", str(out), "--data-dir", str(fake_fmnist), *QUICK, "--batch-size", "1",
                        "--methods", "cbp"], env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("--batch-size 1 is smaller than the 2 processes") == 1  # said once, by rank 0
    assert not out.exists()
