"""The notebooks in notebooks/ run top to bottom (each ends with cells of asserts), offline, writing nothing there."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(path.name for path in NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


def read(name: str):
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed(name):
    """A reader on the web sees the results: every code cell ran, in order, without errors or third-party noise, up
    to the final checks (``test_notebook_runs`` executes them again)."""
    nb = read(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "all checks passed" in text and "Tip:" not in text and "\x1b[" not in text
    assert "assert" in code[-1].source or "assert" in code[-2].source  # ends with its checks


def test_quickstart_hydra_says_why_its_kl_can_be_negative():
    """Its KL curve (TRL's k1 estimator) can dip below zero: the notebook says why, and draws k3 next to it."""
    nb = read("quickstart_hydra.ipynb")
    text = "".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert "Why the KL can be negative" in text and "objective/kl_k3" in text
    assert any("kl_k3" in cell.source and "ax2.plot" in cell.source for cell in nb.cells if cell.cell_type == "code")


def test_the_quickstarts_are_collected():
    assert {"quickstart.ipynb", "quickstart_hydra.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for key, value in KERNEL_ENV.items():
        monkeypatch.setenv(key, value)  # the kernel is a child process: it inherits os.environ
    before = sorted(p.name for p in NOTEBOOKS_DIR.iterdir())
    nb = read(name)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{err}", pytrace=False)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("all checks passed" in o.get("text", "") for o in outputs if o.output_type == "stream")
    assert sorted(p.name for p in NOTEBOOKS_DIR.iterdir()) == before  # runs write to temp dirs only
