"""The experiment runner end to end on a tiny generated Fashion-MNIST."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clfast import data, run

from test_data import fake_fmnist  # noqa: F401  (fixture)

pytest.importorskip("continuum")

QUICK = ["--epochs", "1", "--batch-size", "32", "--buffer-size", "50", "--fisher-samples", "64",
         "--cbp-maturity", "5", "--cbp-rate", "0.01", "--no-plots"]


def _run(tmp_path, data_dir, *extra, name="out"):
    out = tmp_path / name
    code = run.main(["--data-dir", str(data_dir), "--out", str(out), *QUICK, *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text()), out


def test_every_method_runs_and_writes_well_formed_results(tmp_path, fake_fmnist):  # noqa: F811
    methods = "finetune,replay,ewc,si,ocar,cbp,cbp+replay,ewc+replay"
    results, out = _run(tmp_path, fake_fmnist, "--methods", methods)
    assert list(results["methods"]) == methods.split(",")
    assert results["config"]["scenario"] == "split" and results["config"]["num_tasks"] == 5
    for name, r in results["methods"].items():
        assert len(r["acc_matrix"]) == 5 and all(len(row) == 5 for row in r["acc_matrix"])
        assert 0 <= r["average_accuracy"] <= 1 and 0 <= r["average_accuracy_task_il"] <= 1
        assert r["steps_per_s"] > 0 and r["wall_time_s"] > 0 and len(r["curves"]) == 5
        assert (out / f"{name.replace('+', '_')}_acc_matrix.csv").exists()
    assert (out / "summary.txt").read_text().count("\n") == len(methods.split(",")) + 2


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or
                    torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="an x86-64 CPU with AVX2")
def test_portable_numerics_pick_the_avx2_kernels_everywhere(tmp_path, fake_fmnist):  # noqa: F811
    """In a fresh process, as `python -m clfast` runs: MKL, ATen and oneDNN take their AVX2 code paths whatever
    the CPU has (so an AVX-512 and an AVX2 machine give the same numbers); --numerics native leaves them be;
    the caller's environment is restored."""
    env = {k: v for k, v in os.environ.items() if k not in run.PORTABLE_NUMERICS}
    code = ("import json, os, sys; from clfast import run; code = run.main(sys.argv[1:]); "
            "assert not any(k in os.environ for k in run.PORTABLE_NUMERICS); sys.exit(code)")
    config = {}
    for numerics in ("portable", "native"):
        out = tmp_path / numerics
        r = subprocess.run([sys.executable, "-c", code, "--data-dir", str(fake_fmnist), "--out", str(out), *QUICK,
                            "--methods", "finetune", "--numerics", numerics], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        config[numerics] = json.loads((out / "results.json").read_text())["config"]
    assert config["portable"]["cpu_capability"] == "AVX2"
    assert config["portable"]["numerics_env"] == run.PORTABLE_NUMERICS
    assert config["native"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert all(v is None for v in config["native"]["numerics_env"].values())


DEMO = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo" / "results.json"


def test_make_run_reproduces_the_stored_demo(tmp_path):
    """`make run`'s experiment on the real Fashion-MNIST gives benchmarks/results/demo's accuracy matrices exactly,
    at the thread count they were recorded with, on a CPU of the same vendor (MKL's portable path is per vendor)."""
    stored = json.loads(DEMO.read_text())
    config = stored["config"]
    if not all(os.path.exists(os.path.join(data.DEFAULT_DIR, f)) for f in data.FILES.values()):
        pytest.skip(f"Fashion-MNIST is not in {data.DEFAULT_DIR} (make data installs it)")
    if run._cpu().split()[:1] != config["cpu"].split()[:1]:
        pytest.skip(f"recorded on {config['cpu']!r}, this CPU is {run._cpu()!r}")
    threads = str(config["num_threads"])
    env = {k: v for k, v in os.environ.items() if k not in run.PORTABLE_NUMERICS}
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONPATH=os.pathsep.join([str(DEMO.parents[3])] + env.get("PYTHONPATH", "").split(os.pathsep)))
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "clfast", "--data-dir", data.DEFAULT_DIR, "--out", str(out),
                        "--no-plots"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    new = json.loads((out / "results.json").read_text())
    assert new["config"]["cpu_capability"] == config["cpu_capability"]
    assert list(new["methods"]) == config["methods"]
    for method, result in stored["methods"].items():
        for key in ("acc_matrix", "acc_matrix_task_il"):
            assert new["methods"][method][key] == result[key], (method, key)


def test_seeded_rerun_is_identical(tmp_path, fake_fmnist):  # noqa: F811
    a, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,si,ocar", name="a")
    b, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,si,ocar", name="b")
    for name in a["methods"]:
        assert a["methods"][name]["acc_matrix"] == b["methods"][name]["acc_matrix"]


def test_reference_backend_gives_the_same_accuracies(tmp_path, fake_fmnist):  # noqa: F811
    native, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,ewc,si,cbp", name="n")
    ref, _ = _run(tmp_path, fake_fmnist, "--methods", "replay,ewc,si,cbp", "--backend", "reference", name="r")
    for name in native["methods"]:
        for x, y in zip(native["methods"][name]["acc_matrix"], ref["methods"][name]["acc_matrix"]):
            assert x == pytest.approx(y, abs=0.03)


def test_permuted_scenario_and_plots(tmp_path, fake_fmnist):  # noqa: F811
    results, out = _run(tmp_path, fake_fmnist, "--scenario", "permuted", "--tasks", "3", "--methods", "ewc",
                        "--ewc-representation", "kfac")
    r = results["methods"]["ewc"]
    assert len(r["acc_matrix"]) == 3 and "average_accuracy_task_il" not in r
    out2 = tmp_path / "plots"
    assert run.main(["--data-dir", str(fake_fmnist), "--out", str(out2), *QUICK[:-1], "--methods",
                     "finetune,ewc"]) == 0
    for png in ("mean_accuracy.png", "task_accuracy.png", "fisher_ewc.png"):
        assert (out2 / png).stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--methods", "magic"], "unknown method part"),
    (["--epochs", "0"], "must be >= 1"),
    (["--scenario", "cifar"], "invalid choice"),
    (["--methods", "ocar+replay"], "ocar already replays"),
])
def test_bad_cli_input_is_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert run.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_a_diverging_method_is_reported_and_the_others_still_run(tmp_path, fake_fmnist, capsys):  # noqa: F811
    out = tmp_path / "div"
    code = run.main(["--data-dir", str(fake_fmnist), "--out", str(out), *QUICK, "--methods", "finetune,si",
                     "--si-strength", "1e12", "--lr", "0.5"])
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["finetune"] and "NaN" in results["config"]["failed"]["si"]
    assert "si             failed" in capsys.readouterr().out


def test_dan_model_runs_and_matches_reference_backend(tmp_path, fake_fmnist):  # noqa: F811
    native, _ = _run(tmp_path, fake_fmnist, "--model", "dan", "--methods", "finetune,replay,si", name="native")
    ref, _ = _run(tmp_path, fake_fmnist, "--model", "dan", "--methods", "finetune,replay,si", "--backend",
                  "reference", name="ref")
    for name, r in native["methods"].items():
        assert len(r["acc_matrix"]) == 5
        assert r["average_accuracy"] == pytest.approx(ref["methods"][name]["average_accuracy"], abs=0.02)


def test_dan_model_refuses_fisher_methods_clearly(tmp_path, fake_fmnist, capsys):  # noqa: F811
    code = run.main(["--data-dir", str(fake_fmnist), "--out", str(tmp_path / "o"), *QUICK, "--model", "dan",
                     "--methods", "finetune,ewc"])
    assert code == 1
    assert "nngeometry's Fisher does not cover" in capsys.readouterr().out
